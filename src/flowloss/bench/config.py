"""Settings of one ``flowloss bench`` run, their device-dependent defaults, and their checks.

A run is the cross product ``ops x N x V (x H for fused_linear) x dtypes`` on one device, plus, with ``--op step``
(not in the default run: it needs the ``step`` extra, transformers), one whole RL update of a transformer per
dtype. Defaults:

- CPU: ``N = 1024``, ``V = 32000``, ``H = 128``, fp32, 1 warm-up call and 5 timed calls (about a minute on 2 cores);
- CUDA: ``N = 16384``, ``V in {32000, 151936}``, ``H = 4096``, bf16 and fp32, 10 warm-up and 50 timed calls
  (shapes of kernel-notes "How the best measure").

``--op step``: preset ``tiny`` on CPU, ``qwen2-0.5b`` on CUDA; ``B = 8`` sequences in groups of ``G = 4``;
``L = 128`` positions on CPU, 2048 on CUDA (8 x 2,048 tokens); fp32 on CPU, bf16 on CUDA; 1 warm-up + 5 timed
steps on CPU, 3 + 10 on CUDA. An explicit ``--dtype``, ``--warmup`` or ``--reps`` applies to it as well.

The workload is RL's, not a classifier's: temperature ``T = 0.7`` (TRL #3029, OpenRLHF #853: temperature is where
log-prob paths go wrong), ~20 % of the rows masked (prompt/padding tokens) and a random per-token upstream gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

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

DEFAULT_TEMPERATURE = 0.7
DEFAULT_MASK_FRACTION = 0.2

CPU_DEFAULTS = {"n": (1024,), "v": (32000,), "h": (128,), "dtypes": ("fp32",), "warmup": 1, "reps": 5}
CUDA_DEFAULTS = {
    "n": (16384,),
    "v": (32000, 151936),
    "h": (4096,),
    "dtypes": ("bf16", "fp32"),
    "warmup": 10,
    "reps": 50,
}


STEP_CPU_DEFAULTS = {"preset": "tiny", "seq_len": 128, "dtypes": ("fp32",), "warmup": 1, "reps": 5}
STEP_CUDA_DEFAULTS = {"preset": "qwen2-0.5b", "seq_len": 2048, "dtypes": ("bf16",), "warmup": 3, "reps": 10}
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
    # --op step; the step_* fields are filled by resolved() (the step's own defaults unless given explicitly)
    preset: str | None = None
    sequences: int | None = None
    group_size: int | None = None
    seq_len: int | None = None
    step_dtypes: tuple[str, ...] | None = None
    step_warmup: int | None = None
    step_reps: int | None = None
    extra: dict = field(default_factory=dict)

    def resolved(self) -> BenchConfig:
        """A copy with the device chosen and every ``None`` replaced by that device's default; validated."""
        self.validate()
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        defaults = CUDA_DEFAULTS if device == "cuda" else CPU_DEFAULTS
        out = BenchConfig(**{**asdict(self), "device": device})
        step = STEP_CUDA_DEFAULTS if device == "cuda" else STEP_CPU_DEFAULTS
        out.preset = self.preset or step["preset"]
        out.sequences = self.sequences or STEP_SEQUENCES
        out.group_size = self.group_size or STEP_GROUP_SIZE
        out.seq_len = self.seq_len or step["seq_len"]
        # (idempotent: a resolved config keeps its step_* values)
        if out.step_dtypes is None:
            out.step_dtypes = self.dtypes if self.dtypes is not None else step["dtypes"]
        if out.step_warmup is None:
            out.step_warmup = self.warmup if self.warmup is not None else step["warmup"]
        if out.step_reps is None:
            out.step_reps = self.reps if self.reps is not None else step["reps"]
        for name in ("n", "v", "h", "dtypes", "warmup", "reps"):
            if getattr(out, name) is None:
                setattr(out, name, defaults[name])
        if "step" in out.ops and out.sequences % out.group_size:
            raise ValueError(f"--sequences ({out.sequences}) must be a multiple of --group-size ({out.group_size})")
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for anything the run cannot do."""
        for name in ("n", "v", "h"):
            values = getattr(self, name)
            if values is not None:
                if len(values) == 0:
                    raise ValueError(f"--{name} needs at least one value")
                for x in values:
                    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                        raise ValueError(f"--{name} must be integers >= 1, got {x!r}")
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"--op must be among {OPS}, got {op!r}")
        if not self.ops:
            raise ValueError("--op needs at least one op")
        if self.dtypes is not None:
            for d in self.dtypes:
                if d not in DTYPES:
                    raise ValueError(f"--dtype must be among {tuple(DTYPES)}, got {d!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"--device cuda was requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or a CUDA build of torch"
            )
        if self.warmup is not None and (isinstance(self.warmup, bool) or self.warmup < 0):
            raise ValueError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if self.reps is not None and (isinstance(self.reps, bool) or self.reps < 1):
            raise ValueError(f"--reps must be an integer >= 1, got {self.reps!r}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature!r}")
        if not (0.0 <= self.mask_fraction < 1.0):
            raise ValueError(f"--mask-fraction must be in [0, 1), got {self.mask_fraction!r}")
        for name in ("sequences", "group_size", "seq_len"):
            value = getattr(self, name)
            least = 2 if name == "seq_len" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
        if "step" in self.ops:
            from flowloss.bench.step_model import PRESETS, transformers_missing

            if self.preset is not None and self.preset not in PRESETS:
                raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
            reason = transformers_missing()
            if reason:
                raise ValueError(reason)
        if self.impls is not None:
            from flowloss.bench.impls import IMPL_NAMES

            for name in self.impls:
                if name not in IMPL_NAMES:
                    raise ValueError(f"--impl must be among {IMPL_NAMES}, got {name!r}")
