"""Launch configurations per GPU target: which tiles, warps and stages each kernel family uses where.

A configuration is valid on a target when it compiles there, fits the target's shared memory per block and does
not spill more than `MAX_SPILL_BYTES` per thread. `tests/kernels/test_offline_compile.py` checks exactly that for
every configuration below, offline (no GPU: Triton compiles for any target), for every target in `TARGETS`. A
device is matched to a target by its compute capability (or its ``gcnArchName`` on ROCm); a device without a
matching target has no configuration, and the dispatcher (`flowloss.ops.dispatch`) sends its tensors to the
PyTorch fallback, saying why.

==================  =========  ===============================================================================
target              smem/blk   examples
==================  =========  ===============================================================================
``sm_75``           64 KiB     T4, RTX 20
``sm_80``           163 KiB    A100, A30
``sm_86``           99 KiB     A10, A40, RTX 30
``sm_89``           99 KiB     L4, L40S, RTX 40
``sm_90``           227 KiB    H100, H200, GH200
``sm_100``          227 KiB    B200, GB200
``sm_120``          99 KiB     RTX 50, RTX PRO 6000 Blackwell
``gfx942``          64 KiB     MI300X, MI300A (LDS); compiled offline only, never the default
==================  =========  ===============================================================================

Per family:

- ``"logits"`` (`logprob_forward` / `logprob_backward`): no matmul; ``block_v = 4096`` columns, 8 warps on every
  target and dtype (the configuration measured on an H200).
- ``"linear"`` (the fused lm_head): 128 x 128 logit tiles on tensor cores. bf16/fp16: 64-deep K steps, 3 stages.
  fp32 only where the user allowed TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``, or
  ``torch.set_float32_matmul_precision("high")``) and triton is 3.6 or newer: 32-deep K steps, 3 stages, TF32
  tensor cores. fp32 without TF32
  would run the dot products on FMA units (and spill: 5.8-17 KiB per thread at these tiles), so there is none: the
  chunked path (cuBLAS) is the fp32 path. No configuration on ``sm_75``: Triton emits no tensor-core code there
  (FMA loops only), the chunked path's cuBLAS GEMMs are faster.
- ``"tb_loss"`` (the fused trajectory-balance kernels): ``block_and_warps`` of ``tb_loss.py`` (at most 2,048 tokens
  and 8 warps per block), no shared-memory tiles: every target.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

KIB = 1024
# Spill (stack) bytes per thread a configuration may use: a few registers' worth, not a hot loop's working set.
MAX_SPILL_BYTES = 256


@dataclass(frozen=True)
class Target:
    """A GPU compile target: what ``triton.backends.compiler.GPUTarget(backend, arch, warp_size)`` takes, and the
    opt-in shared memory (LDS on AMD) one block may use there."""

    name: str  # "sm_89", "gfx942"
    backend: str  # "cuda" or "hip"
    arch: int | str  # 89, "gfx942"
    warp_size: int
    smem_per_block: int  # bytes
    examples: str


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sm_75", "cuda", 75, 32, 64 * KIB, "T4, RTX 20"),
        Target("sm_80", "cuda", 80, 32, 163 * KIB, "A100, A30"),
        Target("sm_86", "cuda", 86, 32, 99 * KIB, "A10, A40, RTX 30"),
        Target("sm_89", "cuda", 89, 32, 99 * KIB, "L4, L40S, RTX 40"),
        Target("sm_90", "cuda", 90, 32, 227 * KIB, "H100, H200, GH200"),
        Target("sm_100", "cuda", 100, 32, 227 * KIB, "B200, GB200"),
        Target("sm_120", "cuda", 120, 32, 99 * KIB, "RTX 50, RTX PRO 6000 Blackwell"),
        Target("gfx942", "hip", "gfx942", 64, 64 * KIB, "MI300X, MI300A"),
    )
}
# Targets `impl="auto"` may use: compiled and checked offline, and the backend has run these kernels. ROCm has not.
AUTO_BACKENDS = ("cuda",)

HALF = (torch.bfloat16, torch.float16)
LOGITS = {"block_v": 4096, "num_warps": 8}
_LINEAR_TILES = {"block_n": 128, "block_v": 128, "num_warps": 8, "num_stages": 3}
LINEAR_HALF = {**_LINEAR_TILES, "block_k": 64}
LINEAR_TF32 = {**_LINEAR_TILES, "block_k": 32, "allow_tf32": True}
LINEAR_TENSOR_CORE_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx942")
# The backward GEMMs (dW, dH) sum over the recompute's 128-wide tiles, so each pipeline stage holds two 128 x 128
# operand tiles (64 KiB at bf16, 128 KiB at fp32 with block_h = 128): the stages (and, for TF32, block_h = 64)
# are what fits each target's shared memory. (half, tf32) stages; None: no TF32 configuration there.
_GEMM_STAGES: dict[str, tuple[int, int | None]] = {
    "sm_80": (3, 2),
    "sm_86": (2, 1),
    "sm_89": (2, 1),
    "sm_90": (3, 2),
    "sm_100": (3, 2),
    "sm_120": (2, 1),
    "gfx942": (2, None),
}


# The TF32 dW GEMM spills 432-640 B per thread with Triton 3.3.1 and 3.4.0 on sm_80/86/89/120; 3.6.0 and 3.9.0
# compile it within MAX_SPILL_BYTES (the offline compile lane, run with each).
TF32_MIN_TRITON = (3, 6)


def _triton_version_str() -> str:
    import triton

    return triton.__version__


def _triton_version() -> tuple[int, int]:
    major, minor = _triton_version_str().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


class NoConfig(ValueError):
    """No checked launch configuration for this target and dtype; the message says why."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def linear_config(target: Target, dtype: torch.dtype, *, allow_tf32: bool) -> tuple[dict, dict]:
    """``(forward tuning, backward tuning)`` of the fused lm_head kernels on ``target``, or `NoConfig`."""
    if target.name not in LINEAR_TENSOR_CORE_TARGETS:
        raise NoConfig(
            f"the fused lm_head kernels have no tensor-core configuration on {target.name} ({target.examples}): "
            "Triton emits FMA loops there"
        )
    half_stages, tf32_stages = _GEMM_STAGES[target.name]
    if dtype in HALF:
        return dict(LINEAR_HALF), {**LINEAR_HALF, "block_h": 128, "gemm_num_warps": 8, "gemm_num_stages": half_stages}
    if dtype != torch.float32:
        raise NoConfig(f"the fused lm_head kernels take bfloat16, float16 or float32, got {_name(dtype)}")
    if not allow_tf32:
        raise NoConfig(
            "fp32 on the fused lm_head kernels runs on tensor cores only as TF32, which is off "
            "(torch.backends.cuda.matmul.allow_tf32 = False); allow TF32 or use the chunked path (cuBLAS fp32)"
        )
    if tf32_stages is None:
        raise NoConfig(f"the fused lm_head kernels have no TF32 configuration on {target.name}")
    if _triton_version() < TF32_MIN_TRITON:
        raise NoConfig(
            f"the fused lm_head's TF32 configuration needs triton >= {'.'.join(map(str, TF32_MIN_TRITON))} (older "
            f"versions spill 432-640 B per thread in its dW GEMM), this is {_triton_version_str()}"
        )
    return dict(LINEAR_TF32), {**LINEAR_TF32, "block_h": 64, "gemm_num_warps": 8, "gemm_num_stages": tf32_stages}


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls (either of PyTorch's two switches)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


@dataclass(frozen=True)
class Device:
    """What the configuration choice needs to know of a device: its target (None when there is none) and why not."""

    target: Target | None
    description: str  # "NVIDIA L4 (sm_89)"
    reason: str | None  # why there is no target


def _cuda_target(major: int, minor: int) -> Target | None:
    return TARGETS.get(f"sm_{10 * major + minor}")


@functools.cache
def _device_info(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if torch.version.hip is not None:
        arch = str(getattr(props, "gcnArchName", "")).split(":")[0]
        target = TARGETS.get(arch)
        desc = f"{props.name} ({arch or 'unknown gfx'})"
    else:
        target = _cuda_target(props.major, props.minor)
        desc = f"{props.name} (sm_{props.major}{props.minor})"
    reason = None
    if target is None:
        checked = ", ".join(TARGETS)
        reason = f"no launch configuration was compiled and checked for {desc} (checked: {checked})"
    elif smem is not None and smem < target.smem_per_block:
        reason = (
            f"{desc} reports {smem // KIB} KiB of shared memory per block, less than the "
            f"{target.smem_per_block // KIB} KiB its configurations were checked against"
        )
        target = None
    return Device(target, desc, reason)


def device_info(device: torch.device) -> Device:
    """The `Device` of a CUDA (or ROCm) ``device`` (cached per device index; reads no device memory)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_info(index)


def target_for(device: torch.device) -> Target:
    """The target of a CUDA device, or `NoConfig` saying why it has none."""
    info = device_info(device)
    if info.target is None:
        raise NoConfig(info.reason)
    return info.target


# Offline compiles (tests/kernels/test_offline_compile.py) run the real launchers on meta tensors, which then stand
# for a device of this target.
_ASSUMED: ContextVar[Target | None] = ContextVar("flowloss_assumed_target", default=None)


@contextlib.contextmanager
def compiling_for(target: Target) -> Iterator[None]:
    """Within the block, launches on meta tensors pick the configurations of ``target`` (offline compiles)."""
    token = _ASSUMED.set(target)
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def launch_target(tensor: torch.Tensor) -> Target | None:
    """The target a launch on ``tensor``'s device compiles for: its device's (`NoConfig` if it has none), the
    assumed one for meta tensors (`compiling_for`), None on CPU (Triton's interpreter: no hardware limits)."""
    if tensor.device.type == "cuda":
        return target_for(tensor.device)
    if tensor.device.type == "meta":
        return _ASSUMED.get()
    return None


def linear_tuning(hidden: torch.Tensor, tuning: dict, *, backward: bool) -> dict:
    """The fused lm_head's configuration (forward, or ``backward``) for a launch on ``hidden``'s device: the
    target's (`linear_config`, with ``tuning["allow_tf32"]`` or `tf32_allowed`), ``{}`` on CPU (the launcher's
    defaults). `NoConfig` (no target, or none for this dtype) propagates, unless the caller gave a ``tuning`` of
    its own: then the launcher's defaults and that tuning are used, and the caller answers for them."""
    try:
        target = launch_target(hidden)
        if target is None:
            return {}
        allow_tf32 = tuning.get("allow_tf32", tf32_allowed())
        return linear_config(target, hidden.dtype, allow_tf32=allow_tf32)[int(backward)]
    except NoConfig:
        if tuning:
            return {}
        raise


__all__ = [
    "KIB",
    "MAX_SPILL_BYTES",
    "TARGETS",
    "Device",
    "NoConfig",
    "Target",
    "compiling_for",
    "device_info",
    "launch_target",
    "linear_config",
    "linear_tuning",
    "target_for",
    "tf32_allowed",
]
