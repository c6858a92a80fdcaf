"""``flowloss bench``: microbenchmarks of the log-prob ops and the trajectory-balance loss, and (``--op step``) one
whole RL update of a transformer per loss path. ``docs/benchmarks.md`` describes the method and every field.

Modules, each importing only those above it:

- `flowloss.bench.timing`, `flowloss.bench.memory`, `flowloss.bench.reference`: median and p20/p80 of repeated
  calls; peak extra memory of one call; the float64 reference behind the error columns;
- `flowloss.bench.step_model`: ``--op step``'s model (a ``transformers`` Qwen2 from a config) and its batch;
- `flowloss.bench.config`: the run's settings (`BenchConfig`), their defaults and checks;
- `flowloss.bench.impls`: the implementations compared (flowloss, naive PyTorch, ``torch.compile``, TRL / verl /
  OpenRLHF / Liger / Cut Cross-Entropy / flash-attn when installed), each with the reason it is skipped;
- `flowloss.bench.step_paths`: the loss paths of one RL update; `flowloss.bench.step`: their checks, timing and
  memory;
- `flowloss.bench.runner`: builds each case's inputs and measures every implementation on them;
- `flowloss.bench.report` (JSON, tables), `flowloss.bench.plot` (PNG), `flowloss.bench.cli` (the subcommand).
"""

from flowloss.bench.config import BenchConfig
from flowloss.bench.runner import run_suite

__all__ = ["BenchConfig", "run_suite"]
