"""`flowloss.ops.dispatch.choose`: which implementation runs, per family, device and dtype, without a GPU.

CUDA tensors are FakeTensors on ``cuda:0`` (shape, dtype and device only); the device's properties come from a
stand-in for ``torch.cuda.get_device_properties``, so each GPU target (and ROCm) can be posed on a CPU machine.
"""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch

from flowloss.ops import dispatch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("dispatch on CUDA tensors: run without the interpreter (make test-core)", allow_module_level=True)
if not dispatch.triton_available():
    pytest.skip("triton is not installed: impl='auto' never picks it", allow_module_level=True)

from flowloss.kernels import configs

KIB = 1024
GPUS = {  # (major, minor, name, opt-in shared memory per block)
    "sm_75": (7, 5, "Tesla T4", 64 * KIB),
    "sm_80": (8, 0, "NVIDIA A100-SXM4-80GB", 163 * KIB),
    "sm_89": (8, 9, "NVIDIA L4", 99 * KIB),
    "sm_90": (9, 0, "NVIDIA H200", 227 * KIB),
    "sm_70": (7, 0, "Tesla V100-SXM2-32GB", 96 * KIB),
}


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """A fresh one-time-warning record and device cache per test; TF32 off, as PyTorch's default."""
    dispatch._WARNED.clear()
    configs._device_info.cache_clear()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved
    configs._device_info.cache_clear()


def gpu(monkeypatch, name: str, *, hip: str | None = None, smem: int | None = None) -> None:
    """Make ``torch.cuda.get_device_properties`` describe this GPU (an AMD one with ``hip``)."""
    if hip is not None:
        props = types.SimpleNamespace(name="AMD Instinct MI300X", major=9, minor=4, gcnArchName=hip,
                                      shared_memory_per_block_optin=64 * KIB)  # fmt: skip
    else:
        major, minor, full, optin = GPUS[name]
        props = types.SimpleNamespace(name=full, major=major, minor=minor, shared_memory_per_block_optin=smem or optin)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.version, "hip", "6.3" if hip is not None else None)


def cuda(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(*shape, dtype=dtype, device="cuda:0")


def choose(kind, impl, t, name="x"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = dispatch.choose(kind, impl, [(name, t)])
    return got, [w for w in caught if issubclass(w.category, dispatch.FallbackWarning)]


@pytest.fixture
def linear_verified(monkeypatch):
    """Pretend the fused lm_head family has run on a GPU (it has not), so `auto` would pick it."""
    monkeypatch.setitem(dispatch.GPU_VERIFIED, "linear", "test")


@pytest.mark.parametrize("name", ["sm_75", "sm_80", "sm_89", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_auto_runs_the_verified_logits_kernels_on_every_checked_gpu(monkeypatch, name, dtype):
    gpu(monkeypatch, name)
    assert choose("logits", "auto", cuda(4, 8, dtype=dtype)) == ("triton", [])


def test_auto_falls_back_with_one_warning_on_an_unchecked_gpu(monkeypatch):
    gpu(monkeypatch, "sm_70")
    got, caught = choose("logits", "auto", cuda(4, 8))
    assert got == "chunked" and len(caught) == 1
    text = str(caught[0].message)
    assert "Tesla V100-SXM2-32GB (sm_70)" in text and "impl='chunked'" in text, text
    assert choose("logits", "auto", cuda(4, 8)) == ("chunked", []), "the warning is issued once"
    with pytest.raises(ValueError, match=r"sm_70.*impl='chunked'"):
        dispatch.choose("logits", "triton", [("logits", cuda(4, 8))])


def test_a_device_with_less_shared_memory_than_its_target_has_no_configuration(monkeypatch):
    gpu(monkeypatch, "sm_89", smem=48 * KIB)
    got, caught = choose("logits", "auto", cuda(4, 8))
    assert got == "chunked" and "48 KiB" in str(caught[0].message)


def test_fp32_on_the_fused_lm_head_needs_tf32(monkeypatch, linear_verified):
    gpu(monkeypatch, "sm_89")
    got, caught = choose("linear", "auto", cuda(4, 8, dtype=torch.float32), "hidden")
    assert got == "chunked" and len(caught) == 1
    assert "allow_tf32" in str(caught[0].message) and "impl='chunked'" in str(caught[0].message)
    with pytest.raises(ValueError, match="TF32"):
        dispatch.choose("linear", "triton", [("hidden", cuda(4, 8, dtype=torch.float32))])
    torch.backends.cuda.matmul.allow_tf32 = True  # (the fixture restores it)
    assert choose("linear", "auto", cuda(4, 8, dtype=torch.float32), "hidden") == ("triton", [])
    assert choose("linear", "auto", cuda(4, 8, dtype=torch.bfloat16), "hidden") == ("triton", [])


def test_set_float32_matmul_precision_high_counts_as_tf32(monkeypatch):
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert configs.tf32_allowed()


def test_no_fused_lm_head_on_sm75(monkeypatch, linear_verified):
    gpu(monkeypatch, "sm_75")
    got, caught = choose("linear", "auto", cuda(4, 8, dtype=torch.float16), "hidden")
    assert got == "chunked" and "sm_75" in str(caught[0].message) and "FMA" in str(caught[0].message)
    assert choose("logits", "auto", cuda(4, 8, dtype=torch.float16)) == ("triton", []), "the logits kernels run"


def test_rocm_is_refused_by_auto_and_allowed_on_request(monkeypatch):
    gpu(monkeypatch, "", hip="gfx942:sramecc+:xnack-")
    got, caught = choose("logits", "auto", cuda(4, 8))
    assert got == "chunked" and "ROCm" in str(caught[0].message) and "gfx942" in str(caught[0].message)
    assert choose("logits", "triton", cuda(4, 8)) == ("triton", [])
    gpu(monkeypatch, "", hip="gfx90a")
    configs._device_info.cache_clear()
    with pytest.raises(ValueError, match="gfx90a"):
        dispatch.choose("logits", "triton", [("logits", cuda(4, 8))])


def test_families_that_never_ran_on_a_gpu_fall_back_silently(monkeypatch):
    gpu(monkeypatch, "sm_90")
    assert dispatch.GPU_VERIFIED["linear"] is None and dispatch.GPU_VERIFIED["tb_loss"] is None
    assert choose("linear", "auto", cuda(4, 8), "hidden") == ("chunked", [])
    assert choose("tb_loss", "auto", cuda(4, 8), "logprobs") == ("pytorch", [])
    assert choose("linear", "triton", cuda(4, 8), "hidden") == ("triton", [])


def test_cpu_and_float64_take_the_fallback_silently(monkeypatch):
    gpu(monkeypatch, "sm_90")
    assert choose("logits", "auto", torch.zeros(4, 8)) == ("chunked", [])
    assert choose("logits", "auto", cuda(4, 8, dtype=torch.float64)) == ("chunked", [])


def test_the_device_maps_to_its_target(monkeypatch):
    for name in ("sm_75", "sm_80", "sm_89", "sm_90"):
        gpu(monkeypatch, name)
        configs._device_info.cache_clear()
        assert configs.target_for(torch.device("cuda", 0)).name == name
    gpu(monkeypatch, "sm_70")
    configs._device_info.cache_clear()
    with pytest.raises(configs.NoConfig, match="sm_70"):
        configs.target_for(torch.device("cuda", 0))


def test_the_launchers_refuse_what_the_dispatcher_refuses():
    """On a GPU target without a configuration for the dtype, the kernel launcher raises `NoConfig` (the first
    call would otherwise fail with Triton's OutOfResources); an explicit tuning is the caller's to answer for."""
    from flowloss.kernels import linear_logprob_forward

    meta = dict(device="meta", dtype=torch.float32)
    h, w, y = torch.empty(4, 8, **meta), torch.empty(16, 8, **meta), torch.empty(4, dtype=torch.int64, device="meta")
    with configs.compiling_for(configs.TARGETS["sm_89"]), pytest.raises(configs.NoConfig, match="TF32"):
        linear_logprob_forward(h, w, None, y)
    with configs.compiling_for(configs.TARGETS["sm_75"]), pytest.raises(configs.NoConfig, match="sm_75"):
        linear_logprob_forward(h.half(), w.half(), None, y)


def test_tf32_on_the_fused_lm_head_needs_triton_3_6(monkeypatch, linear_verified):
    """Older Triton spills 432-640 B per thread in the TF32 dW GEMM (offline lane with 3.3.1 and 3.4.0)."""
    gpu(monkeypatch, "sm_89")
    torch.backends.cuda.matmul.allow_tf32 = True  # (the fixture restores it)
    monkeypatch.setattr(configs, "_triton_version", lambda: (3, 4))
    got, caught = choose("linear", "auto", cuda(4, 8, dtype=torch.float32), "hidden")
    assert got == "chunked" and "triton >= 3.6" in str(caught[0].message)
    assert choose("linear", "auto", cuda(4, 8, dtype=torch.bfloat16), "hidden") == ("triton", [])
