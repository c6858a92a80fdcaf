"""OpenRLHF adapter tests: stand-ins for GPU-only imports, a one-process gloo group, the adapter module.

openrlhf imports flash_attn and vllm at module level; where they are not installed (any CPU machine) the
minimal stand-ins in ``standins/`` are put on ``sys.path`` (they raise if any of their functions is called).
OpenRLHF's trainer calls ``torch.distributed.barrier()``: a one-process gloo group over a file store (no
network) serves it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.adapters.conftest import require_framework

STANDINS = Path(__file__).parent / "standins"
for _module in ("flash_attn", "vllm"):
    if importlib.util.find_spec(_module) is None and str(STANDINS) not in sys.path:
        sys.path.insert(0, str(STANDINS))


@pytest.fixture(scope="session")
def process_group(tmp_path_factory):
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def adapter(process_group):
    """``flowloss.adapters.openrlhf`` (OpenRLHF's CUDA calls on CPU: see ``cpu_compat`` in the example)."""
    require_framework("openrlhf.trainer.ray.ppo_actor")
    return require_framework("flowloss.adapters.openrlhf")


EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "openrlhf_flowrl.py"


@pytest.fixture()
def example(adapter):
    """``examples/openrlhf_flowrl.py`` as a module: the tiny policy, OpenRLHF's args, the trainer, the batches."""
    spec = importlib.util.spec_from_file_location("openrlhf_flowrl_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
