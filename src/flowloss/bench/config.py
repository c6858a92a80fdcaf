"""Settings of one ``flowloss bench`` run, their device-dependent defaults, and their checks.

A run is ``ops x N x V (x H for fused_linear) x dtypes`` on one device, plus, with ``--op step`` (not in the
default run: it needs the ``step`` extra, transformers), one whole RL update of a transformer per dtype. Defaults
(``docs/benchmarks.md``, "Options"): CPU ``N = 1024, V = 32000, H = 128``, fp32, 1 warm-up + 5 timed calls;
CUDA ``N = 16384, V in {32000, 151936}, H = 4096``, bf16 and fp32, 10 + 50. ``--op step``: preset ``tiny`` and
``L = 128`` on CPU (fp32, 1 + 5 steps), ``qwen2-0.5b`` and ``L = 2048`` on CUDA (bf16, 3 + 10); ``B = 8`` sequences
in groups of ``G = 4``. An explicit ``--dtype``, ``--warmup`` or ``--reps`` applies to the step as well.

This module imports nothing else of `flowloss.bench` but `flowloss.bench.step_model` (the presets).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict, TypeVar

import torch

from flowloss.bench import step_model

DEFAULT_OPS = ("logprobs", "fused_linear", "loss")
OPS = (*DEFAULT_OPS, "step")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TEMPERATURE = 0.7  # where log-prob paths go wrong (TRL #3029, OpenRLHF #853)
DEFAULT_MASK_FRACTION = 0.2  # prompt and padding tokens


class OpDefaults(TypedDict):
    """One device's defaults of the log-prob, fused-linear and loss ops."""

    n: tuple[int, ...]
    v: tuple[int, ...]
    h: tuple[int, ...]
    dtypes: tuple[str, ...]
    warmup: int
    reps: int


class StepDefaults(TypedDict):
    """One device's defaults of ``--op step``."""

    preset: str
    seq_len: int
    dtypes: tuple[str, ...]
    warmup: int
    reps: int


CPU_DEFAULTS: OpDefaults = {"n": (1024,), "v": (32000,), "h": (128,), "dtypes": ("fp32",), "warmup": 1, "reps": 5}
CUDA_DEFAULTS: OpDefaults = {"n": (16384,), "v": (32000, 151936), "h": (4096,), "dtypes": ("bf16", "fp32"),
                             "warmup": 10, "reps": 50}  # fmt: skip
STEP_CPU_DEFAULTS: StepDefaults = {"preset": "tiny", "seq_len": 128, "dtypes": ("fp32",), "warmup": 1, "reps": 5}
STEP_CUDA_DEFAULTS: StepDefaults = {"preset": "qwen2-0.5b", "seq_len": 2048, "dtypes": ("bf16",), "warmup": 3,
                                    "reps": 10}  # fmt: skip
STEP_SEQUENCES = 8
STEP_GROUP_SIZE = 4


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bf16"``: the short name used in tables and JSON."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


@dataclass
class BenchConfig:
    """Everything one run measures. ``None`` fields take the device's default (see the module docstring)."""

    ops: tuple[str, ...] = DEFAULT_OPS
    n: tuple[int, ...] | None = None
    v: tuple[int, ...] | None = None
    h: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    device: str = "auto"
    warmup: int | None = None
    reps: int | None = None
    impls: tuple[str, ...] | None = None  # None: every implementation of each op
    temperature: float = DEFAULT_TEMPERATURE
    mask_fraction: float = DEFAULT_MASK_FRACTION
    seed: int = 0
    measure_memory: bool = True
    time_budget: float | None = None  # seconds; no measurement starts after it (listed as skipped)
    # --op step; the step_* fields are filled by resolved() (the step's own defaults unless given explicitly)
    preset: str | None = None
    sequences: int | None = None
    group_size: int | None = None
    seq_len: int | None = None
    step_dtypes: tuple[str, ...] | None = None
    step_warmup: int | None = None
    step_reps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> ResolvedConfig:
        """A copy with the device chosen and every ``None`` replaced by that device's default; validated.
        Idempotent: a resolved config resolves to itself."""
        self.validate()
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        defaults, step = (CUDA_DEFAULTS, STEP_CUDA_DEFAULTS) if device == "cuda" else (CPU_DEFAULTS, STEP_CPU_DEFAULTS)
        out = ResolvedConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.device = device
        out.preset = self.preset or step["preset"]
        out.sequences = self.sequences or STEP_SEQUENCES
        out.group_size = self.group_size or STEP_GROUP_SIZE
        out.seq_len = self.seq_len or step["seq_len"]
        out.step_dtypes = self.step_dtypes if self.step_dtypes is not None else _given(self.dtypes, step["dtypes"])
        out.step_warmup = self.step_warmup if self.step_warmup is not None else _given(self.warmup, step["warmup"])
        out.step_reps = self.step_reps if self.step_reps is not None else _given(self.reps, step["reps"])
        out.dtypes = _given(self.dtypes, defaults["dtypes"])
        out.warmup = _given(self.warmup, defaults["warmup"])
        out.reps = _given(self.reps, defaults["reps"])
        out.n = _given(self.n, defaults["n"])
        out.v = _given(self.v, defaults["v"])
        out.h = _given(self.h, defaults["h"])
        if "step" in out.ops and out.sequences % out.group_size:
            raise ValueError(f"--sequences ({out.sequences}) must be a multiple of --group-size ({out.group_size})")
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for anything the run cannot do (implementation names are
        checked where the implementations are known: `flowloss.bench.runner.run_suite`)."""
        if not self.ops:
            raise ValueError("--op needs at least one op")
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"--op must be among {OPS}, got {op!r}")
        for name in ("n", "v", "h"):
            values = getattr(self, name)
            if values is not None and len(values) == 0:
                raise ValueError(f"--{name} needs at least one value")
            for x in values or ():
                if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                    raise ValueError(f"--{name} must be integers >= 1, got {x!r}")
        for d in self.dtypes or ():
            if d not in DTYPES:
                raise ValueError(f"--dtype must be among {tuple(DTYPES)}, got {d!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"--device cuda was requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or a CUDA build of torch"
            )
        for name, least in (("warmup", 0), ("reps", 1), ("sequences", 1), ("group_size", 1), ("seq_len", 2)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature!r}")
        if not (0.0 <= self.mask_fraction < 1.0):
            raise ValueError(f"--mask-fraction must be in [0, 1), got {self.mask_fraction!r}")
        if self.time_budget is not None and not (self.time_budget > 0):
            raise ValueError(f"--time-budget must be a number of seconds > 0, got {self.time_budget!r}")
        if "step" in self.ops:
            if self.preset is not None and self.preset not in step_model.PRESETS:
                raise ValueError(f"--preset must be one of {tuple(step_model.PRESETS)}, got {self.preset!r}")
            reason = step_model.transformers_missing()
            if reason:
                raise ValueError(reason)


class ResolvedConfig(BenchConfig):
    """What `BenchConfig.resolved` returns (made nowhere else): the device chosen (``"cpu"`` or ``"cuda"``) and no
    field ``None`` but ``impls`` (every implementation) and ``time_budget`` (none). The same dataclass fields, with
    the narrower types that say so to a type checker."""

    n: tuple[int, ...]
    v: tuple[int, ...]
    h: tuple[int, ...]
    dtypes: tuple[str, ...]
    warmup: int
    reps: int
    preset: str
    sequences: int
    group_size: int
    seq_len: int
    step_dtypes: tuple[str, ...]
    step_warmup: int
    step_reps: int


_T = TypeVar("_T")


def _given(value: _T | None, default: _T) -> _T:
    """``value`` unless it is ``None`` (an option not given), else the device's ``default``."""
    return default if value is None else value


@dataclass
class Run:
    """A resolved config being run: its device, where progress goes, and when its time budget ends."""

    config: ResolvedConfig
    device: torch.device
    progress: Callable[[str], None]
    deadline: float | None = None  # time.monotonic() value

    @classmethod
    def start(cls, config: ResolvedConfig, progress: Callable[[str], None] | None = None) -> Run:
        budget = config.time_budget
        deadline = None if budget is None else time.monotonic() + budget
        return cls(config, torch.device(config.device), progress or (lambda _label: None), deadline)

    def out_of_time(self) -> str | None:
        """Why nothing more may start (the time budget is spent), or None."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"not started: the time budget (--time-budget {self.config.time_budget:g} s) was spent"
        return None
