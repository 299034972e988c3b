"""What ``multitoken train`` computes, where and in what precision: :class:`TrainConfig`, the λ
schedule of its MTP loss weight, and :class:`RuntimeConfig` (device, precision).

Split from :mod:`multitoken.config` (which still names all of these) to keep each config module
to one command's options; :class:`RuntimeConfig` lives here because :class:`TrainConfig` takes
its fields and defaults, and generate, distill and bench take it too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from multitoken.config.fields import HEAD_LABELS, PRECISIONS, SOFT_TOP_K, _field, _flag, _opt
from multitoken.config.heads import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.families import FAMILIES as TRAITS
from multitoken.presets import PRESETS, PRETRAINED_LR

# --------------------------------------------------------------------------------------------
# λ schedule for the MTP loss weight
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LambdaSchedule:
    """Step-wise constant λ. ``"0.3"`` is constant; ``"0.3->0.1@0.7"`` is DeepSeek-V3's schedule
    (0.3, then 0.1 from 70% of the run on). A boundary below 1 is a fraction of ``max_steps``,
    an integer boundary is an absolute step; several stages chain: ``"0.5->0.3@1000->0.1@0.9"``.
    """

    values: tuple[float, ...]
    boundaries: tuple[float, ...]  # len(values) - 1, each a fraction (<1) or a step (>=1)

    @classmethod
    def parse(cls, spec: str | float) -> LambdaSchedule:
        text = str(spec).replace(" ", "")
        parts = text.split("->")
        try:
            values = [float(parts[0])]
            bounds: list[float] = []
            for part in parts[1:]:
                value, at = part.split("@")
                values.append(float(value))
                bounds.append(float(at))
        except ValueError:
            raise MultitokenError(
                f"cannot parse {spec!r}; use a number (0.3) or stages like 0.3->0.1@0.7",
                flag="--mtp-lambda",
            ) from None
        finite = all(math.isfinite(x) for x in (*values, *bounds))
        if not finite or any(v < 0 for v in values) or any(b <= 0 for b in bounds):
            raise MultitokenError(
                f"values and boundaries must be finite and positive in {spec!r}", "--mtp-lambda"
            )
        return cls(tuple(values), tuple(bounds))

    def __call__(self, step: int, max_steps: int) -> float:
        value = self.values[0]
        for v, b in zip(self.values[1:], self.boundaries):
            at = b * max_steps if b < 1 else b
            if step >= at:
                value = v
        return value


def default_lambda(family: str) -> str:
    """The family's own λ (DeepSeek-V3: 0.3, divided by D; Meta and Stern sum head losses: 1)."""
    return TRAITS[family].default_lambda


# --------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------


@dataclass
class RuntimeConfig:
    """Where and in what precision a command computes (train, distill, generate, bench)."""

    PRECISION_OPT = _opt(
        "auto = bf16 where the device computes it natively and faster (CUDA with bf16; a CPU "
        "with AVX512-BF16/AMX, confirmed by a timing), else fp32",
        choices=PRECISIONS,
    )
    DEVICE_OPT = _opt("cpu, cuda, cuda:N or auto (CUDA where available)")

    device: str = field(default="auto", metadata=DEVICE_OPT)
    precision: str = field(default="auto", metadata=PRECISION_OPT)

    @classmethod
    def from_options(cls, options: Any) -> RuntimeConfig:
        """From an object with (some of) these fields as attributes, e.g. parsed CLI flags."""
        given = {f.name: getattr(options, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise MultitokenError(f"unknown precision {self.precision!r}", "--precision")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise MultitokenError(f"unknown device {self.device!r}", "--device")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything ``multitoken train`` needs. Field names are the CLI flags (``_`` → ``-``)."""

    out: str = _field("runs/mtp", "output folder (checkpoints, metrics)")
    preset: str = _field("tiny", "from-scratch trunk size", choices=tuple(PRESETS))
    trunk: str | None = _field(
        None, "local transformers causal-LM folder to use as the trunk (overrides --preset)"
    )
    data: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "text files, folders, globs or .jsonl (repeatable); default: the Python "
            "standard library source of this interpreter",
            nargs="*",
        ),
    )
    tokenizer: str | None = _field(
        None,
        "tokenizer.json (or a folder with one); default: the --trunk folder's tokenizer, "
        "or bytes for a from-scratch trunk",
    )
    val_fraction: float = _field(0.05, "share of files held out")
    seq_len: int = _field(256, "tokens per training sequence")
    batch_size: int = _field(16, "sequences per micro-batch (per rank)")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    max_steps: int = _field(1000, "optimizer steps")
    lr: float | None = _field(
        None, f"peak learning rate (default: the preset's; {PRETRAINED_LR} for --trunk)"
    )
    min_lr_ratio: float = _field(0.1, "final lr as a fraction of peak")
    warmup_steps: int | None = _field(
        None, "linear warm-up steps (default: 5%% of --max-steps, at most 200)"
    )
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = _field(1.0, "max gradient norm (0 disables)")
    mtp_lambda: str | None = _field(
        None,
        "MTP loss weight λ or schedule, e.g. 0.3 or 0.3->0.1@0.7 (default: 0.3 deepseek, "
        "1.0 others)",
    )
    freeze_trunk: bool = _field(
        False,
        "train the heads only (Medusa-1 style): the trunk's weights stay exactly as loaded; "
        "rows are cut within files so every epoch repeats them and the trunk's states are "
        "cached (--feature-cache-gb)",
    )
    labels: str | None = _field(
        None,
        "what head k learns at each position (default: trunk with --freeze-trunk, which gave "
        "the best held-out τ at equal compute: benchmarks/labels.py; else text): text = the "
        "text's token k+1 ahead; trunk = "
        "(with --freeze-trunk) the token the trunk's own greedy decoding writes there, "
        "wherever the text follows its greedy path: self-distillation from plain text, "
        "without generating any (multitoken.training.losses.greedy_path_labels); soft = (with "
        "--freeze-trunk) the trunk's own next-token distribution k positions on, over its "
        "--soft-top-k likeliest tokens, by soft cross-entropy (EAGLE-3, Medusa-2; "
        "multitoken.training.losses.soft_labels)",
        choices=HEAD_LABELS,
    )
    soft_top_k: int = _field(
        SOFT_TOP_K,
        "with --labels soft: the trunk's likeliest tokens kept per position as the target, "
        "their probabilities renormalised over them (the feature cache keeps them for any "
        "--labels: 6 bytes per token and position)",
    )
    feature_cache_gb: float = _field(
        4.0,
        "with --freeze-trunk: disk budget (GiB) of the cache of the trunk's states, so the "
        "trunk runs once per training row; rows past it are recomputed; 0 disables",
    )
    feature_cache_dir: str | None = _field(
        None,
        "feature cache folder (default: OUT/feature-cache); runs on the same trunk may share one",
    )
    feature_cache_dtype: str = _field(
        "bf16",
        "storage of cached states: bf16 (half the disk, rounded) or fp32 (bit-exact)",
        choices=("bf16", "fp32"),
    )
    meta_memory_efficient: bool = _field(
        True, "meta: head-by-head backward (Gloeckle §2); --no-meta-memory-efficient for naive"
    )
    precision: str = field(default=RuntimeConfig.precision, metadata=RuntimeConfig.PRECISION_OPT)
    device: str = field(default=RuntimeConfig.device, metadata=RuntimeConfig.DEVICE_OPT)
    eval_every: int = _field(100, "steps between validation runs")
    eval_batches: int = _field(8, "validation batches per evaluation")
    log_every: int = _field(10, "steps between metrics.jsonl lines")
    save_every: int = _field(100, "steps between checkpoints")
    keep_checkpoints: int = _field(2, "checkpoints kept on disk")
    seed: int = _field(0, "random seed")
    resume: bool = _field(False, "continue from the last checkpoint in --out")
    heads: HeadConfig = field(default_factory=HeadConfig)

    def validate(self) -> None:
        self.heads.validate()
        if self.trunk is None and self.preset not in PRESETS:
            raise MultitokenError(
                f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})", "--preset"
            )
        positive = (
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "save_every",
            "keep_checkpoints",
            "soft_top_k",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MultitokenError(f"must be an integer >= 1, got {value!r}", _flag(name))
        if not 0 < self.val_fraction < 1:
            raise MultitokenError(f"must be in (0, 1), got {self.val_fraction}", "--val-fraction")
        if self.lr is not None and self.lr <= 0:
            raise MultitokenError(f"must be > 0, got {self.lr}", "--lr")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise MultitokenError(f"must be >= 0, got {self.warmup_steps}", "--warmup-steps")
        if self.grad_clip < 0:
            raise MultitokenError(f"must be >= 0, got {self.grad_clip}", "--grad-clip")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MultitokenError(f"must be in [0, 1], got {self.min_lr_ratio}", "--min-lr-ratio")
        if not isinstance(self.feature_cache_gb, (int, float)) or self.feature_cache_gb < 0:
            raise MultitokenError(
                f"must be >= 0, got {self.feature_cache_gb!r}", "--feature-cache-gb"
            )
        if self.feature_cache_dtype not in ("bf16", "fp32"):
            raise MultitokenError(
                f"must be bf16 or fp32, got {self.feature_cache_dtype!r}", "--feature-cache-dtype"
            )
        if self.labels is None:
            self.labels = "trunk" if self.freeze_trunk else "text"
        if self.labels not in HEAD_LABELS:
            raise MultitokenError(
                f"unknown labels {self.labels!r} (choose from {', '.join(HEAD_LABELS)})", "--labels"
            )
        if self.labels == "trunk" and not self.freeze_trunk:
            raise MultitokenError(
                "the trunk's greedy tokens are fixed labels only while the trunk is frozen; add "
                "--freeze-trunk",
                "--labels",
            )
        if self.labels == "soft" and not self.freeze_trunk:
            raise MultitokenError(
                "the trunk's distributions are fixed targets only while the trunk is frozen; add "
                "--freeze-trunk",
                "--labels",
            )
        RuntimeConfig(self.device, self.precision).validate()
        self.lambda_schedule()  # parse errors surface before anything is written

    # -- resolved values -----------------------------------------------------------------------
    def lambda_schedule(self) -> LambdaSchedule:
        return LambdaSchedule.parse(self.mtp_lambda or default_lambda(self.heads.family))

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return PRETRAINED_LR if self.trunk else PRESETS[self.preset].lr

    def resolved_warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.max_steps)
        return min(200, max(1, self.max_steps // 20))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from flat or nested keys (``family`` or ``heads.family``); unknown keys fail."""
        head_names = {f.name for f in dataclasses.fields(HeadConfig)}
        train_names = {f.name for f in dataclasses.fields(cls)} - {"heads"}
        heads = values.get("heads") or {}
        if not isinstance(heads, dict):
            raise MultitokenError("'heads' must be a table of head options", "--config")
        head_values = dict(heads)
        train_values = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name == "heads":
                continue
            if name in head_names:
                head_values[name] = value
            elif name in train_names:
                train_values[name] = value
            else:
                raise MultitokenError(f"unknown option {key!r}", "--config")
        unknown = set(head_values) - head_names
        if unknown:
            raise MultitokenError(f"unknown head option(s) {sorted(unknown)}", "--config")
        return cls(**train_values, heads=HeadConfig(**head_values))
