"""The offline compile lane (``make test-offline-compile``): every launch the production launchers make, compiled
for every GPU target in `flowloss.kernels.configs.TARGETS` with Triton's bundled toolchain, no GPU needed.

Per target: no compile error, shared memory within the target's per-block limit, at most
`configs.MAX_SPILL_BYTES` of spill (stack) per thread; on sm_90, wgmma and pipelined loads in the matmul kernels
and 16-byte vector accesses in the streaming ones. What is compiled and how: `tests.kernels.offline_compile`.
About 250 CPU-seconds (two worker processes, a fresh Triton cache); skipped unless ``FLOWLOSS_OFFLINE_COMPILE=1``
(the Makefile target sets it), so ``make test-core`` does not run it a second time.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("FLOWLOSS_OFFLINE_COMPILE") != "1" or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the offline compile lane runs on its own: make test-offline-compile",
)
triton = pytest.importorskip("triton", reason="triton is not installed")

from flowloss.kernels.configs import LINEAR_TENSOR_CORE_TARGETS, TARGETS  # noqa: E402

from tests.kernels.offline_compile import problems, run_lane  # noqa: E402

LOGITS = {"_logprob_forward_kernel", "_logprob_backward_kernel"}
TB = {"_tb_forward_kernel", "_tb_backward_kernel"}
LINEAR = {
    "_linear_logprob_partial_kernel",
    "_linear_logprob_combine_kernel",
    "_linear_logprob_dz_kernel",
    "_linear_logprob_dweight_kernel",
    "_linear_logprob_dhidden_kernel",
}


@pytest.fixture(scope="module")
def results():
    return run_lane(list(TARGETS), jobs=int(os.environ.get("FLOWLOSS_OFFLINE_JOBS", "2")))


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_launch_compiles_within_the_targets_limits(results, target):
    mine = [r for r in results if r.target == target]
    if mine and all(r.skipped for r in mine):
        pytest.skip(f"{target}: {mine[0].skipped}")
    kernels = {r.kernel for r in mine}
    expected = LOGITS | TB | (LINEAR if target in LINEAR_TENSOR_CORE_TARGETS else set())
    assert kernels == expected, f"{target}: compiled {sorted(kernels)}, expected {sorted(expected)}"
    bad = [f"{r.kernel} [{r.scenario}]: {'; '.join(problems(r))}" for r in mine if problems(r)]
    assert not bad, f"{target}: {len(bad)} of {len(mine)} compiles have problems:\n" + "\n".join(bad[:20])


def test_the_sm90_code_checks_ran(results):
    """Each matmul kernel was checked for wgmma and pipelining, each streaming kernel for vector accesses."""
    checked = {(r.kernel, name) for r in results if r.target == "sm_90" for name in r.checks}
    for kernel in LINEAR - {"_linear_logprob_combine_kernel"}:
        assert {(kernel, "wgmma"), (kernel, "pipelined loads")} <= checked, kernel
    assert {("_logprob_forward_kernel", "16-byte loads"), ("_tb_forward_kernel", "16-byte loads")} <= checked
    assert {("_logprob_backward_kernel", "16-byte stores"), ("_tb_backward_kernel", "16-byte stores")} <= checked
