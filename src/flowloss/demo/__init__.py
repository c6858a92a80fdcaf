"""``flowloss demo``: distribution matching (FlowRL) vs reward maximization (GRPO) with a known target.

* `flowloss.demo.problem`: the tabular autoregressive policy, the multimodal reward, the exact target.
* `flowloss.demo.baselines`: the GRPO-style clipped policy-gradient loss (the BASELINE, not FlowRL).
* `flowloss.demo.train`: one training run per method from the same start, scored exactly.
* `flowloss.demo.report`: rich table, PNG plot, JSON.
* `flowloss.demo.cli`: the ``flowloss demo`` subcommand (``--task bandit``, the default, or ``--task sequences``).

``--task sequences``, a tiny causal LM (needs ``transformers``, the ``step`` extra):

* `flowloss.demo.sequence_task`: the digit-sum task, its enumerable answer space, the skewed warm-start data.
* `flowloss.demo.sequence_model`: the Qwen2 model, warm start, sampling, log-probs, the exact answer distribution.
* `flowloss.demo.sequence_metrics`: exact scores (mean reward, expected distinct correct answers, top share, KL).
* `flowloss.demo.sequence_train`: FlowRL and GRPO from the same reference, scored along the way.
* `flowloss.demo.sequence_trl`: the same comparison through ``FlowRLTrainer`` and TRL's ``GRPOTrainer``.
* `flowloss.demo.sequence_report`: rich table, PNG plot, JSON.
"""

from flowloss.demo.train import DemoConfig, DemoResult, MethodResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "MethodResult", "run_demo"]
