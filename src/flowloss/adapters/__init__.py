"""Framework adapters: ``trl``, ``verl`` and ``openrlhf`` (each imports its framework, on demand) and ``common``.

``flowloss.adapters.common`` holds what the three share and imports no framework: ``AdapterConfig`` (the loss's
``flowloss.FlowRLOptions`` + ``LogZHeadOptions`` + a framework's extras, from a dict, a namespace or
``--flowrl.*`` flags), the log-Z head attachment and saving, the decoder hidden-state hook, the weight-sync
filter and the normalizer. Each framework module keeps only the translation of that framework's tensors and
config.
"""
