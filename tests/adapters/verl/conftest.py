"""verl on this CPU machine: a CPU "platform" set before any test imports verl's workers.

verl 0.9 resolves its accelerator through ``verl.plugin.platform`` and falls back to CUDA when it finds none; its
engine modules read the device name at import time. A small CPU platform (gloo, ``"cpu"`` devices), set here
before the test modules import ``verl.workers``, lets verl's own FSDP2 engine build, train and infer on CPU in
one process (a world of one rank). Test scaffolding only: nothing in flowloss uses it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

# pytest puts tests/adapters on sys.path for its conftest.py; there, tests/adapters/trl would import as a
# namespace package `trl`, and verl's model patching (which imports TRL's value head when `trl` is importable)
# would fail. The framework tests never import from that folder by name.
_ADAPTER_TESTS = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ADAPTER_TESTS]

try:
    from verl.plugin.platform import PlatformBase, set_platform
except Exception:  # verl missing or broken: the tests report it (require_framework)
    PlatformBase = None  # type: ignore[assignment,misc]

if PlatformBase is not None:

    class PlatformCPU(PlatformBase):  # type: ignore[misc,valid-type]
        """verl's platform interface answered for the CPU (gloo collectives, no device memory)."""

        device_name = property(lambda self: "cpu")
        vendor_name = property(lambda self: "cpu")
        device_module = property(lambda self: torch.cpu)

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    set_platform(PlatformCPU())
