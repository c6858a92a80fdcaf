"""``flowloss bench``: microbenchmarks of the log-prob ops and the trajectory-balance loss, and (``--op step``) one
whole RL update of a transformer per loss path.

One module per job:

- `flowloss.bench.config` - the run's settings (`BenchConfig`) and their checks;
- `flowloss.bench.impls` - the implementations compared (flowloss, naive PyTorch, ``torch.compile``,
  TRL / verl / OpenRLHF / Liger / flash-attn when installed), each with the reason it is skipped;
- `flowloss.bench.timing` - median and p20/p80 of repeated calls (CUDA events or ``perf_counter``);
- `flowloss.bench.memory` - peak extra memory of one call (CUDA allocator, or the CPU allocator's
  counters read through the PyTorch profiler);
- `flowloss.bench.reference` - the float64 reference (vectorized in row chunks) behind the error columns;
- `flowloss.bench.runner` - builds the inputs of each case and measures every implementation;
- `flowloss.bench.step_model` - ``--op step``'s model (a ``transformers`` Qwen2 from a config, random weights)
  and its GRPO-style group batch; `flowloss.bench.step` - the update's paths, checks and measurements;
- `flowloss.bench.report` - the rich table and the JSON file; `flowloss.bench.plot` - the PNG;
- `flowloss.bench.cli` - the ``bench`` subcommand.
"""

from flowloss.bench.config import BenchConfig
from flowloss.bench.runner import run_suite

__all__ = ["BenchConfig", "run_suite"]
