"""Shared test set-up: hypothesis profiles and tolerance helpers.

Profiles: ``dev`` (quick, the default outside CI) and ``ci`` (hundreds of examples per property; ``make test``
selects it through HYPOTHESIS_PROFILE=ci).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

if os.environ.get("FLOWLOSS_REQUIRE_CUDA") == "1" and not torch.cuda.is_available():
    raise RuntimeError("FLOWLOSS_REQUIRE_CUDA=1 (make test-gpu) but torch sees no CUDA device")

# Absolute/relative tolerances per input dtype, against the float64 reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1e-4, 1e-5),  # inputs are rounded to bf16 first; accumulation is fp32
    torch.float16: (1e-4, 1e-5),
}


# Gradients land in the leaf's dtype: a bf16/fp16 leaf holds its gradient rounded to 8/11 mantissa bits.
GRAD_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1e-3, 8e-3),
    torch.float16: (1e-3, 1e-3),
}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype,
    what: str,
    scale: float = 1.0,
    grad: bool = False,
):
    """Compare in float64 with the tolerance of ``dtype``; the message names the formula under test.

    ``scale`` multiplies the absolute tolerance (use the magnitude of the terms that cancel); ``grad`` selects
    the gradient tolerances (the gradient of a low-precision leaf is rounded to its dtype).
    """
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound).item()) if err.numel() else 0
        raise AssertionError(
            f"{what}: max abs error {err.max().item():.3e} (at flat index {worst}: got "
            f"{a.flatten()[worst].item():.10g}, expected {e.flatten()[worst].item():.10g}); "
            f"tolerance atol={atol * scale:.1e} rtol={rtol:.1e} for {dtype}"
        )


def close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """Compare in float64 with explicit tolerances; NaN/inf positions must agree exactly (NaN with NaN, inf
    with the same inf); the message names the formula under test and the worst element."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    same_special = (a == e) | (a.isnan() & e.isnan())
    if not bool((a.isfinite() == e.isfinite()).all() and (same_special | e.isfinite()).all()):
        raise AssertionError(f"{what}: non-finite values differ:\n got {a}\n expected {e}")
    fin = e.isfinite()
    err = torch.where(fin, (a - e).abs(), torch.zeros_like(a))
    bound = atol + rtol * e.abs().nan_to_num(0.0, 0.0, 0.0)
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: max abs error {err.max().item():.3e} (at flat index {worst}: got "
            f"{a.flatten()[worst].item():.10g}, expected {e.flatten()[worst].item():.10g}); "
            f"tolerance atol={atol:.1e} rtol={rtol:.1e}"
        )


def op_node(output: torch.Tensor):
    """The autograd node of the flowloss custom op behind ``output`` (searched through views/where nodes)."""
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "flowloss" in type(node).__name__:
            return node
        todo.extend(n for n, _ in node.next_functions)
    raise AssertionError(f"no flowloss op in the autograd graph of {output.grad_fn}")
