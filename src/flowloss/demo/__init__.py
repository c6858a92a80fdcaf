"""``flowloss demo``: distribution matching (FlowRL) vs reward maximization (GRPO) with a known target.

* `flowloss.demo.problem`: the tabular autoregressive policy, the multimodal reward, the exact target.
* `flowloss.demo.baselines`: the GRPO-style clipped policy-gradient loss (the BASELINE, not FlowRL).
* `flowloss.demo.train`: one training run per method from the same start, scored exactly.
* `flowloss.demo.report`: rich table, PNG plot, JSON.
* `flowloss.demo.cli`: the ``flowloss demo`` subcommand.
"""

from flowloss.demo.train import DemoConfig, DemoResult, MethodResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "MethodResult", "run_demo"]
