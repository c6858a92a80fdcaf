"""Per-token log-prob ops, one job per module.

* ``token_logprobs`` / ``fused_linear``: the public functions (validation, label resolution, dispatch);
* ``library``: the ``torch.library`` operators and their autograd (what ``torch.compile`` sees); it imports the
  Triton implementations on first use;
* ``chunked``: the PyTorch row-block implementations; ``_block_math``: one block's math; ``_rows``: row blocks;
* ``triton_logprobs`` (and ``triton_linear``): the Triton implementations, imported on first use;
* ``dispatch``: ``impl=`` resolution (per device and dtype, from ``flowloss.kernels.configs``), the fallback
  warnings and the one Triton-availability check;
* ``fused_tb``: the trajectory-balance loss's per-sequence terms as one custom op (two Triton launches).
"""
