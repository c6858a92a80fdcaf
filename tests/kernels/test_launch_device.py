"""Every launcher launches under the device of its tensors (Triton launches on the *current* device).

No GPU: a fake Triton driver (`tests.kernels.offline_compile.FakeDriver`) holds the "current device", the JIT's
cache hook records each launch with the device the JIT saw, and nothing is compiled or run. Part 1 runs every
launcher on meta tensors with ``launch.on_device`` replaced by a stand-in that switches the fake driver to device
1, as ``torch.cuda.device(cuda:1)`` would: a launcher that launches outside its guard records device 0 and fails.
Part 2 checks the guard itself on a (fake) ``cuda:1`` tensor, ``torch.cuda.device`` patched to switch the same
driver. Runs without Triton's interpreter (``make test-core``): the interpreter never asks a driver.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("launches are captured from the JIT; the interpreter bypasses it", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from flowloss.kernels import launch
from flowloss.kernels.configs import TARGETS, compiling_for

from tests.kernels.offline_compile import FakeDriver, capture, gpu_target

META = "meta"
KERNELS = {
    "_logprob_forward_kernel",
    "_logprob_backward_kernel",
    "_linear_logprob_partial_kernel",
    "_linear_logprob_combine_kernel",
    "_linear_logprob_dz_kernel",
    "_live_tiles_kernel",
    "_linear_logprob_dweight_kernel",
    "_linear_logprob_dhidden_kernel",
    "_tb_forward_kernel",
    "_tb_backward_kernel",
}


def _run_every_launcher() -> None:
    """The six launchers once each on meta tensors (small shapes, every kernel they launch)."""
    from flowloss.kernels import (
        linear_logprob_backward,
        linear_logprob_forward,
        logprob_backward,
        logprob_forward,
        tb_backward,
        tb_forward,
    )

    n, h, v = 256, 64, 1000
    y = torch.empty(n, dtype=torch.int64, device=META)
    g = torch.empty(n, device=META)
    x = torch.empty(n, v, dtype=torch.bfloat16, device=META)
    _, lse2, ent = logprob_forward(x, y, with_entropy=True)
    logprob_backward(x, y, lse2, g, entropy=ent, grad_entropy=g)
    hid = torch.empty(n, h, dtype=torch.bfloat16, device=META)
    w = torch.empty(v, h, dtype=torch.bfloat16, device=META)
    for order in (torch.empty(n, dtype=torch.int64, device=META), None):  # with and without tile compaction
        b = torch.empty(v, dtype=torch.bfloat16, device=META)
        _, lse2, ent = linear_logprob_forward(hid, w, b, y, with_entropy=True, order=order)
        linear_logprob_backward(hid, w, b, y, lse2, g, entropy=ent, grad_entropy=g, order=order)
    lp = torch.empty(8, 32, device=META)
    mask = torch.empty(8, 32, dtype=torch.bool, device=META)
    r = torch.empty(8, device=META)
    kw = dict(eps_low=0.2, eps_high=0.28, token_clip_mask=True, length_normalization=True)
    per_seq, stats = tb_forward(
        lp, lp, r, r, mask, lp, lp, mode="sequence_clipped", max_weight=10.0, tis_cap=2.0, penalty="squared",
        linex_alpha=1.0, huber_delta=1.0, beta=15.0, **kw,
    )  # fmt: skip
    tb_backward(per_seq, stats, lp, mask, r, lp, torch.float32, **kw)


def test_every_launch_runs_under_its_launchers_device_guard(monkeypatch):
    """With the guard standing for ``cuda:1`` and ``cuda:0`` current, every kernel of every launcher is launched
    while device 1 is current."""
    driver = FakeDriver(gpu_target("sm_90"), device=0)

    @contextlib.contextmanager
    def switch_to_device_1(tensor):
        saved, driver.device = driver.device, 1
        try:
            yield
        finally:
            driver.device = saved

    monkeypatch.setattr(launch, "on_device", switch_to_device_1)
    with compiling_for(TARGETS["sm_90"]), capture(driver.target, driver=driver) as launches:
        _run_every_launcher()
    kernels = {x.kernel for x in launches}
    assert kernels == KERNELS, f"expected a launch of each kernel, got {sorted(kernels)}"
    wrong = sorted({x.kernel for x in launches if x.device != 1})
    assert not wrong, f"launched on the current device (0), not the tensors' (1): {wrong}"


def test_on_device_makes_the_tensors_device_current(monkeypatch):
    """``launch.on_device(t)`` for a ``cuda:1`` tensor switches the current device to 1 for the block and back;
    for CPU and meta tensors (the interpreter, offline compiles) it changes nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    driver = FakeDriver(gpu_target("sm_90"), device=0)

    class FakeCudaDevice:  # torch.cuda.device, switching the fake driver instead of a CUDA context
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.saved, driver.device = driver.device, self.index

        def __exit__(self, *exc):
            driver.device = self.saved

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_1 = torch.empty(3, device="cuda:1")
    with launch.on_device(on_1):
        assert driver.get_current_device() == 1
    assert driver.get_current_device() == 0
    for t in (torch.empty(3), torch.empty(3, device=META)):
        with launch.on_device(t):
            assert driver.get_current_device() == 0
