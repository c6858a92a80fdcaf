"""The offline compile lane: every launch the production launchers make, compiled for each GPU target, no GPU.

How: a fake Triton driver reports the chosen target (`FakeDriver`), ``flowloss.kernels.configs.compiling_for`` makes
meta tensors stand for a device of that target, and the real launchers (``flowloss.ops.triton_logprobs``,
``flowloss.ops.triton_linear``, ``flowloss.kernels.tb_loss``) run on meta tensors at the small sweep's shapes. A
Triton cache hook records each launch (kernel, specialization, constexprs, warps, stages) and returns before
anything is launched. The recorded launches are then compiled with Triton's bundled toolchain (ptxas for NVIDIA,
the LLVM AMDGPU backend for gfx942), and each compiled kernel reports its shared memory (``metadata.shared``), its
registers and its spill (stack) bytes per thread (``cuobjdump -res-usage`` on the cubin; the ``.amdhsa`` notes on
AMD).

Which launches: every distinct one on the targets of `FULL_TARGETS` (sm_75: the smallest shared memory; sm_89: the
most common 99 KiB class; sm_90: where the logits kernels ran), and on the others the heaviest launch (most
features switched on) of each distinct configuration (kernel, dtype, tiles, warps, stages). Compiles run in
``--jobs`` worker processes with a fresh Triton cache, so nothing is reused across runs.

    python -m tests.kernels.offline_compile [--targets sm_89 sm_90] [--jobs 2] [--json results.json]

prints one line per compile and exits 1 if a compile fails or a limit is exceeded. The test
``tests/kernels/test_offline_compile.py`` (``make test-offline-compile``) runs it and asserts the same per target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

# How much of each target is compiled: "every" distinct launch (alignment specializations included), every
# "feature" combination (launches differing only in the alignment of an argument compiled once), or the heaviest
# launch of each distinct "config" (kernel, dtype, tiles, warps, stages). Other targets: "config".
FULL_TARGETS = {"sm_89": "every", "sm_90": "feature", "sm_75": "feature"}
# The small sweep's shapes (benchmarks/gpu_suite.sh, fused_linear_gpu.py): N x V, and H for the lm_head.
SWEEP_N = (4096, 16384)
SWEEP_V = (32000, 151936, 262144)
SWEEP_H = 4096
META = "meta"


# ---------------------------------------------------------------------------------------------------------------
# Capturing launches


class FakeDriver:
    """What ``JITFunction.run`` asks Triton's active driver, answered for ``target`` without a GPU. The current
    device is state of the driver, so tests can check which device a launch would run on."""

    def __init__(self, target, device: int = 0):
        self.target = target
        self.device = device

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device=None) -> int:
        return 0


@dataclass
class Launch:
    """One launch as Triton's JIT would compile it."""

    kernel: str
    fn: object = field(repr=False)  # the JITFunction
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: object = field(repr=False)
    num_warps: int = 4
    num_stages: int = 3
    num_ctas: int = 1
    device: int = 0
    scenario: str = ""

    def key(self, attrs: bool = True) -> str:
        consts = sorted((str(k), repr(v)) for k, v in self.constexprs.items())
        sig = sorted(self.signature.items())
        spec = repr(self.attrs) if attrs else ""
        return f"{self.kernel}|{sig}|{consts}|{spec}|{self.num_warps}|{self.num_stages}"

    def flags(self) -> int:
        """How many features are switched on (True constexprs): the heaviest launch of a configuration."""
        return sum(1 for v in self.constexprs.values() if v is True)

    def config(self) -> str:
        """Kernel, pointer dtypes, tiles and launch options: what makes a distinct configuration."""
        ptrs = sorted((k, v) for k, v in self.signature.items() if str(v).startswith("*"))
        names = dict(zip(range(len(self.fn.arg_names)), self.fn.arg_names))
        tiles = sorted(
            (str(k), repr(v))
            for k, v in self.constexprs.items()
            if str(names.get(k[0] if isinstance(k, tuple) else k, k)).startswith(_TILE_NAMES)
        )
        return f"{self.kernel}|{ptrs}|{tiles}|{self.num_warps}|{self.num_stages}"


# Constexprs that make a configuration (the others switch features on and off).
_TILE_NAMES = ("BLOCK", "SPLIT", "GROUP", "DOT_PRECISION")


def _hook_installer():
    """``(install(hook), uninstall())`` for this Triton's JIT cache hook (``knobs`` since 3.4, else the class
    attribute ``JITFunction.cache_hook``)."""
    try:
        from triton import knobs

        def install(hook):
            knobs.runtime.jit_cache_hook = hook

        def uninstall():
            knobs.runtime.jit_cache_hook = None

    except ImportError:  # Triton < 3.4
        from triton.runtime.jit import JITFunction

        def install(hook):
            JITFunction.cache_hook = hook

        def uninstall():
            JITFunction.cache_hook = None

    return install, uninstall


class _Recorded:
    """Stands in the JIT's kernel cache for a recorded launch: a repeated launch of the same specialization runs
    this (nothing) instead of binding and recording it again."""

    function = None
    packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        return None


@contextlib.contextmanager
def capture(target, driver: FakeDriver | None = None) -> Iterator[list[Launch]]:
    """Within the block, every distinct Triton launch is recorded (into the yielded list) instead of compiled and
    run, as if the current device were a GPU of ``target`` (a ``GPUTarget``). Set ``.scenario`` on the yielded
    list to label the launches that follow."""
    from triton.runtime import driver as triton_driver

    fake = driver or FakeDriver(target)
    launches = _Launches()
    seen_fns: list = []
    install, uninstall = _hook_installer()

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        launches.append(
            Launch(
                kernel=jit.fn.__name__,
                fn=jit,
                signature=dict(compile["signature"]),
                constexprs=dict(compile["constants"]),
                attrs=compile["configs"][0],
                num_warps=compile["num_warps"],
                num_stages=compile["num_stages"],
                num_ctas=compile.get("num_ctas", 1),
                device=compile["device"],
                scenario=launches.scenario,
            )
        )
        seen_fns.append(jit)
        with contextlib.suppress(AttributeError, KeyError, TypeError):  # the cache layout of Triton >= 3.3
            jit.device_caches[compile["device"]][0][key] = _Recorded()
        return True  # skip compilation and this launch

    triton_driver.set_active(fake)
    install(hook)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield launches
    finally:
        uninstall()
        for jit in seen_fns:  # the binder and cache were made for the fake target: drop them
            with contextlib.suppress(AttributeError):
                jit.device_caches.clear()
        triton_driver.reset_active() if _has_gpu_driver() else triton_driver.set_active(None)


class _Launches(list):
    scenario: str = ""


def _has_gpu_driver() -> bool:
    from triton.backends import backends

    return any(b.driver.is_active() for b in backends.values())


def gpu_target(name: str):
    from flowloss.kernels.configs import TARGETS
    from triton.backends.compiler import GPUTarget

    t = TARGETS[name]
    return GPUTarget(t.backend, t.arch, t.warp_size)


# ---------------------------------------------------------------------------------------------------------------
# Scenarios: the production launchers on meta tensors


def _logits_scenarios() -> Iterator[tuple[str, Callable[[], None]]]:
    import torch

    from flowloss.ops import triton_logprobs

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, v in [(n, v) for n in SWEEP_N for v in SWEEP_V] + [(4096, 151936 - 293)]:  # + a padded vocabulary
            for entropy in (False, True):

                def run(n=n, v=v, dtype=dtype, entropy=entropy, inplace=False):
                    x = torch.empty(n, v + 293 * (v % 16 != 0), dtype=dtype, device=META)
                    y = torch.empty(n, dtype=torch.int64, device=META)
                    _, ent, lse2 = triton_logprobs.forward(
                        x, y, temperature=0.7, return_entropy=entropy, vocab_size=v
                    )
                    g = torch.empty(n, device=META)
                    for g_h in (None, g) if entropy else (None,):
                        out = x if inplace else torch.empty_like(x)
                        triton_logprobs.backward(x, y, lse2, ent, g, g_h, temperature=0.7, vocab_size=v, out=out)

                yield f"logits {dtype} N={n} V={v} entropy={entropy}", run


def _linear_scenarios(dtypes) -> Iterator[tuple[str, Callable[[], None]]]:
    import torch

    from flowloss.ops import triton_linear

    for dtype in dtypes:
        for n in SWEEP_N:
            for v in SWEEP_V:
                for entropy in (False, True):
                    for bias in (False, True):
                        for frozen in (False, True):

                            def run(n=n, v=v, dtype=dtype, entropy=entropy, bias=bias, frozen=frozen):
                                h = torch.empty(n, SWEEP_H, dtype=dtype, device=META)
                                w = torch.empty(v, SWEEP_H, dtype=dtype, device=META)
                                b = torch.empty(v, dtype=dtype, device=META) if bias else None
                                y = torch.empty(n, dtype=torch.int64, device=META)
                                _, ent, lse2 = triton_linear.forward(
                                    h, w, b, y, temperature=0.7, return_entropy=entropy
                                )
                                g = torch.empty(n, device=META)
                                triton_linear.backward(
                                    h, w, b, y, lse2, ent, g, g if entropy else None, temperature=0.7,
                                    need_hidden=True, need_weight=not frozen, need_bias=bias and not frozen,
                                )  # fmt: skip

                            name = f"linear {dtype} N={n} V={v} entropy={entropy} bias={bias} frozen={frozen}"
                            yield name, run


def _tb_scenarios() -> Iterator[tuple[str, Callable[[], None]]]:
    import torch
    from flowloss.kernels.tb_loss import tb_backward, tb_forward

    variants = [  # (mode, penalty, token clip, rollout): the defaults, and every other branch at least once
        ("sequence_clipped", "squared", False, False),
        ("none", "squared", False, False),
        ("geometric_clipped", "shifted_cosh", True, True),
        ("sequence_capped", "linex", True, False),
        ("sequence", "huber", False, True),
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for b, t in ((16, 1024), (8, 4096)):
            for mode, penalty, clip, rollout in variants:

                def run(b=b, t=t, dtype=dtype, mode=mode, penalty=penalty, clip=clip, rollout=rollout):
                    lp = torch.empty(b, t, dtype=dtype, device=META)
                    mask = torch.empty(b, t, dtype=torch.bool, device=META)
                    r = torch.empty(b, device=META)
                    kw = dict(eps_low=0.2, eps_high=0.28, token_clip_mask=clip, length_normalization=True)
                    per_seq, stats = tb_forward(
                        lp, lp, r, r, mask, lp, lp if rollout else None, mode=mode, max_weight=10.0, tis_cap=2.0,
                        penalty=penalty, linex_alpha=1.0, huber_delta=1.0, beta=15.0, **kw,
                    )  # fmt: skip
                    tb_backward(per_seq, stats, lp, mask, r, lp, torch.float32, **kw)

                yield f"tb {dtype} B={b} T={t} {mode} {penalty} clip={clip} rollout={rollout}", run


def scenarios(target_name: str, *, full: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """Every scenario (``full``), or those at the headline shape N = 16,384, V = 151,936 plus V = 32,000 (where
    the lm_head backward takes its two-pass plan): the same configurations, fewer launches to walk."""
    import torch
    from flowloss.kernels.configs import TARGETS, NoConfig, linear_config

    def keep(name: str) -> bool:
        return full or ("N=16384" in name and ("V=151936" in name or "V=32000" in name))

    def configured(dtype) -> bool:  # fp32 with TF32 allowed: the only fp32 configuration
        try:
            linear_config(TARGETS[target_name], dtype, allow_tf32=True)
        except NoConfig:
            return False
        return True

    linear_dtypes = [d for d in (torch.bfloat16, torch.float16, torch.float32) if configured(d)]
    for family in (_logits_scenarios(), _linear_scenarios(linear_dtypes)):
        yield from ((name, run) for name, run in family if keep(name))
    yield from _tb_scenarios()


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def launches_for(target_name: str) -> list[Launch]:
    """The launches to compile for ``target_name`` (`FULL_TARGETS` says how many), in a fixed order."""
    from flowloss.kernels.configs import TARGETS, compiling_for

    level = FULL_TARGETS.get(target_name, "config")
    with compiling_for(TARGETS[target_name]), _tf32(True), capture(gpu_target(target_name)) as launches:
        for name, run in scenarios(target_name, full=level != "config"):
            launches.scenario = name
            run()
    if level == "config":
        heaviest: dict[str, Launch] = {}
        for launch in launches:
            best = heaviest.get(launch.config())
            if best is None or launch.flags() > best.flags():
                heaviest[launch.config()] = launch
        return list(heaviest.values())
    distinct: dict[str, Launch] = {}
    for launch in launches:
        distinct.setdefault(launch.key(attrs=level == "every"), launch)
    return list(distinct.values())


# ---------------------------------------------------------------------------------------------------------------
# Compiling


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuda_resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes per thread)`` of the one kernel in ``cubin`` (the stack holds the spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{out}")
    return int(m.group(1)), int(m.group(2))


def _hip_resources(amdgcn: str) -> tuple[int, int]:
    """``(VGPRs, spill bytes per lane)`` from the ``.amdhsa`` notes of the AMDGCN assembly."""

    def count(key: str) -> int:
        m = re.search(rf"\.{key}:\s+(\d+)", amdgcn)
        return int(m.group(1)) if m else 0

    return count("vgpr_count"), 4 * (count("vgpr_spill_count") + count("sgpr_spill_count"))


@dataclass
class Result:
    target: str
    kernel: str
    scenario: str
    config: str
    shared: int = 0
    registers: int = 0
    spill: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process and its children (ptxas): the cost on an idle machine
    error: str = ""
    skipped: str = ""  # the target's toolchain is not bundled with this Triton (gfx942 before 3.4)
    checks: dict = field(default_factory=dict)


def compile_launch(launch: Launch, target_name: str) -> Result:
    """Compile ``launch`` for ``target_name`` and read its resources (and, on sm_90, the code checks)."""
    import triton
    from triton.compiler import ASTSource

    target = gpu_target(target_name)
    res = Result(target_name, launch.kernel, launch.scenario, launch.config())
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages, "num_ctas": launch.num_ctas}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=target, options=options)
        res.shared = int(k.metadata.shared)
        if target.backend == "cuda":
            res.registers, res.spill = _cuda_resources(k.asm["cubin"])
            if target_name == "sm_90":
                res.checks = _sm90_checks(launch, k.asm)
        else:
            res.registers, res.spill = _hip_resources(k.asm["amdgcn"])
    except Exception as err:  # a compile error is a result of the lane, reported with the launch
        if target.backend == "hip" and "ld.lld not found" in str(err):
            res.skipped = "this Triton bundles no ROCm linker (ld.lld)"
        else:
            res.error = f"{type(err).__name__}: {str(err)[-2000:]}"
    res.seconds = round(time.perf_counter() - start, 2)
    res.cpu_seconds = round(_cpu_seconds() - cpu_start, 2)
    return res


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_MATMUL = ("_linear_logprob_partial_kernel", "_linear_logprob_dz_kernel", "_linear_logprob_dweight_kernel",
           "_linear_logprob_dhidden_kernel")  # fmt: skip


def _sm90_checks(launch: Launch, asm: dict) -> dict:
    """What only the compiled code shows: wgmma and software-pipelined loads in the matmul kernels (a
    data-dependent branch around the loads once serialised them), 16-byte vector accesses in the streaming ones."""
    checks = {}
    if launch.kernel in _MATMUL:
        checks["wgmma"] = "warp_group_dot" in asm["ttgir"]  # ttng. (triton_nvidia_gpu. before 3.3)
        checks["pipelined loads"] = "async_copy_global_to_local" in asm["ttgir"]
    elif launch.kernel in ("_logprob_forward_kernel", "_tb_forward_kernel") and "V=151643" not in launch.scenario:
        checks["16-byte loads"] = "ld.global.v4.b32" in asm["ptx"]  # (a padded vocabulary masks every column)
    elif launch.kernel in ("_logprob_backward_kernel", "_tb_backward_kernel"):
        checks["16-byte stores"] = "st.global.v4.b32" in asm["ptx"]
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Checking and the command line


def problems(res: Result) -> list[str]:
    """What is wrong with one compile: an error, shared memory over the target's block limit, spills over
    `MAX_SPILL_BYTES`, a failed code check."""
    from flowloss.kernels.configs import MAX_SPILL_BYTES, TARGETS

    out = []
    if res.skipped:
        return []
    if res.error:
        return [f"compile error: {res.error}"]
    limit = TARGETS[res.target].smem_per_block
    if res.shared > limit:
        out.append(f"shared memory {res.shared} B > {limit} B per block")
    if res.spill > MAX_SPILL_BYTES:
        out.append(f"spills {res.spill} B per thread > {MAX_SPILL_BYTES} B")
    out += [f"{name}: missing" for name, ok in res.checks.items() if not ok]
    return out


def _worker(targets: list[str], index: int, jobs: int) -> list[Result]:
    units = [(t, launch) for t in targets for launch in launches_for(t)]
    # Matmul kernels cost the most: deal them out first so the workers finish together.
    units.sort(key=lambda u: (u[1].kernel not in _MATMUL, u[0], u[1].key()))
    return [compile_launch(launch, t) for i, (t, launch) in enumerate(units) if i % jobs == index]


def run_lane(targets: list[str], jobs: int) -> list[Result]:
    """Compile for ``targets`` in ``jobs`` worker processes sharing a fresh Triton cache (deleted afterwards)."""
    cache = tempfile.mkdtemp(prefix="flowloss-offline-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION="1")
    try:
        worker = [sys.executable, "-m", "tests.kernels.offline_compile", "--jobs", str(jobs), "--targets", *targets]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs = [subprocess.Popen([*worker, "--worker", str(i)], env=env, **pipes) for i in range(jobs)]
        results = []
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"offline compile worker failed ({p.returncode}):\n{err[-4000:]}")
            results += [Result(**json.loads(line)) for line in out.splitlines() if line.startswith("{")]
        return results
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from flowloss.kernels.configs import TARGETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write every result here")
    args = p.parse_args(argv)
    if args.worker is not None:
        for res in _worker(args.targets, args.worker, args.jobs):
            print(json.dumps(asdict(res)), flush=True)
        return 0
    start = time.perf_counter()
    results = run_lane(args.targets, args.jobs)
    bad = 0
    for res in sorted(results, key=lambda r: (r.target, r.kernel, r.scenario)):
        issues = problems(res)
        bad += bool(issues)
        print(
            f"{res.target:7} {res.kernel:32} smem {res.shared:6} reg {res.registers:3} spill {res.spill:4} "
            f"{res.seconds:5.1f}s {'; '.join(issues) or res.skipped or 'ok'}  [{res.scenario}]"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    print(f"{len(results)} compiles, {bad} with problems, {time.perf_counter() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
