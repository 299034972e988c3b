"""Typed configuration: head config, training config, decoding — validated in one place.

Every default lives in a dataclass field here. The CLI builds its flags from these fields
(``multitoken.cli``), config files name the same fields, and ``multitoken.train(**kwargs)`` takes
them as keyword arguments, so there is exactly one copy of each default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the standard library's TOML parser from 3.11 on; the same code as tomli before it
    import tomli as tomllib

from multitoken.errors import MultitokenError
from multitoken.families import FAMILIES as TRAITS
from multitoken.presets import PRESETS, PRETRAINED_LR, TrunkPreset

# The trunk presets are named here too: the options that choose among them are this module's.
__all__ = [
    "FAMILIES",
    "HEAD_LABELS",
    "LINEAR_KERNELS",
    "PRECISIONS",
    "PRESETS",
    "PRETRAINED_LR",
    "SOFT_TOP_K",
    "GenerateConfig",
    "HeadConfig",
    "LambdaSchedule",
    "RuntimeConfig",
    "TrainConfig",
    "TrunkPreset",
    "default_lambda",
    "draft_len_value",
    "read_config_file",
]

FAMILIES = tuple(TRAITS)  # the head families, by name
PRECISIONS = ("auto", "bf16", "fp32")
LINEAR_KERNELS = ("auto", "onednn", "torch")  # multitoken.decode.kernels
HEAD_LABELS = ("text", "trunk", "soft")  # multitoken.training.losses
# --soft-top-k: the trunk's likeliest tokens per position kept as a soft target
# (multitoken.training.losses.trunk_top_k); 16 keep 96 bytes a position in the feature cache
SOFT_TOP_K = 16
# what decoding verifies when --tree is not given (multitoken.decode.trees.shape; --typical verifies chains)
DEFAULT_TREE = "auto+lookup"


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
# Heads
# --------------------------------------------------------------------------------------------


def _opt(help: str, flag: str | None = None, **extra: Any) -> dict[str, Any]:
    """Field metadata read by the CLI builder (``multitoken.cli.flags``)."""
    return {"help": help, "flag": flag, **extra}


def _field(default: Any, help: str, flag: str | None = None, **extra: Any) -> Any:
    """A dataclass field that is also a CLI flag: its default, and the metadata of :func:`_opt`."""
    return field(default=default, metadata=_opt(help, flag, **extra))


@dataclass
class HeadConfig:
    """Which MTP heads to attach to the trunk (docs/design.md §The three head families)."""

    family: str = _field(
        "deepseek",
        "head family: bpd (Stern 2018 / Medusa), meta (Gloeckle 2024), "
        "deepseek (DeepSeek-V3 sequential modules)",
        choices=FAMILIES,
    )
    depth: int = _field(1, "D, the number of extra future tokens predicted per position")
    branch_layer: int | None = _field(
        None, "meta: trunk layer b whose input stream the heads read (default L-1)"
    )
    bpd_unembed: str = _field(
        "shared",
        "bpd: share the trunk's unembedding, or give each head its own "
        "(Medusa), initialised from the trunk's",
        choices=("shared", "per-head"),
    )
    bpd_hidden: int | None = _field(None, "bpd: hidden width of each head's FFN (default: d_model)")
    init_from_trunk: bool | None = _field(
        None,
        "meta/deepseek: start each head's block as a copy of a trunk layer (meta: the branch "
        "layer b it sits beside; deepseek: the last) (default: on for meta on a pretrained "
        "--trunk; off for deepseek, whose modules start as the identity on h, and from scratch)",
    )
    ttt_steps: int = _field(
        0,
        "deepseek: training-time test past D (EAGLE-3): the last module also trains reused this "
        "many more times along the chain, reading its own states as decoding with --draft-len "
        "> D feeds them, so the drafts past D are trained too",
    )
    draft_vocab: int | None = _field(
        None,
        "FR-Spec reduced draft vocabulary: the heads unembed over the N most frequent tokens "
        "of the training data only (counted before training); the trunk still verifies over "
        "the full vocabulary, so output stays exact (default: the full vocabulary)",
    )

    def validate(self, num_layers: int | None = None, vocab_size: int | None = None) -> None:
        if self.family not in FAMILIES:
            raise MultitokenError(
                f"unknown head family {self.family!r} (choose from {', '.join(FAMILIES)})",
                "--family",
            )
        if not isinstance(self.depth, int) or self.depth < 1:
            raise MultitokenError(f"depth must be an integer >= 1, got {self.depth!r}", "--depth")
        if self.bpd_unembed not in ("shared", "per-head"):
            raise MultitokenError(
                f"must be 'shared' or 'per-head', got {self.bpd_unembed!r}", "--bpd-unembed"
            )
        if self.bpd_hidden is not None and self.bpd_hidden < 1:
            raise MultitokenError(f"must be >= 1, got {self.bpd_hidden}", "--bpd-hidden")
        if self.draft_vocab is not None:
            if (
                not isinstance(self.draft_vocab, int)
                or isinstance(self.draft_vocab, bool)
                or self.draft_vocab < 1
            ):
                raise MultitokenError(
                    f"must be an integer >= 1, got {self.draft_vocab!r}", "--draft-vocab"
                )
            if vocab_size is not None and self.draft_vocab > vocab_size:
                raise MultitokenError(
                    f"{self.draft_vocab} exceeds the trunk's vocabulary of {vocab_size}",
                    "--draft-vocab",
                )
        family = TRAITS[self.family]
        steps = self.ttt_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise MultitokenError(f"must be an integer >= 0, got {steps!r}", "--ttt-steps")
        if self.ttt_steps and not family.drafts_past_depth:
            raise MultitokenError(
                f"{self.family} heads draft at most D tokens, each head from the trunk's own "
                "state, so there is nothing past D to train (deepseek reuses its last module)",
                "--ttt-steps",
            )
        if self.init_from_trunk and not family.copies_trunk_layers:
            raise MultitokenError(
                "bpd heads have no decoder block to copy; a fresh bpd head already predicts what "
                "the trunk predicts",
                "--init-from-trunk",
            )
        if self.branch_layer is not None:
            if not family.reads_branch:
                raise MultitokenError(
                    f"{self.family} heads read h^0; only heads that branch off the trunk (meta) "
                    "have a branch layer",
                    "--branch-layer",
                )
            if num_layers is not None and not 0 <= self.branch_layer < num_layers:
                raise MultitokenError(
                    f"branch layer {self.branch_layer} is out of range for a trunk with "
                    f"{num_layers} layers (0..{num_layers - 1})",
                    "--branch-layer",
                )

    def resolved_branch_layer(self, num_layers: int) -> int:
        return num_layers - 1 if self.branch_layer is None else self.branch_layer


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


def _whole(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, not a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a JSON or TOML file whose keys are the flag names."""
    p = Path(path)
    if not p.is_file():
        raise MultitokenError(f"no such config file: {p}", "--config")
    try:
        values = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MultitokenError(f"cannot parse {p}: {exc}", "--config") from None
    if not isinstance(values, dict):
        raise MultitokenError(
            f"{p} holds a {type(values).__name__}, not a table of options", "--config"
        )
    return values


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def draft_len_value(value: int | str | None) -> int | str | None:
    """What ``--draft-len`` / ``draft_len`` accepts: ``auto``, a whole number, or None (the
    heads' depth D). Raises ValueError otherwise."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.lstrip("-").isdigit():
            return int(text)
    raise ValueError(f"expected auto or a whole number, got {value!r}")


@dataclass
class GenerateConfig:
    """Options of ``multitoken generate`` and ``MTPModel.generate``."""

    max_new_tokens: int = _field(128, "tokens to generate per prompt")
    draft_len: int | str | None = _field(
        "auto",
        "K, drafts per step: auto (chosen before each step, 0 = a plain step, from the "
        "measured verify cost c(q), the drafting cost and the live per-head acceptance) or "
        "a fixed number (deepseek may exceed D)",
        parse=draft_len_value,
    )
    temperature: float = _field(0.0, "0 = greedy")
    top_k: int = _field(0, "sample from the k most likely tokens (0: off)")
    top_p: float = _field(1.0, "nucleus sampling mass (1: off)")
    seed: int | None = _field(
        None,
        "random seed for sampling (default: a fresh one each call, reported with the stats); it "
        "repeats a run whose drafts are fixed (--tree chain --draft-len K, a fixed tree, or "
        "--no-speculate): the automatic modes choose drafts by timing, and which tokens a seed "
        "samples depends on the drafts (their law does not)",
    )
    typical: float = _field(
        0.0,
        "LOSSY Medusa typical acceptance: accept a draft when the trunk gives it probability above "
        "min(eps, sqrt(eps)·exp(-entropy)); 0 = exact speculative sampling. Needs --temperature > 0",
    )
    speculate: bool = _field(
        True, "self-speculative decoding with the heads; --no-speculate: the trunk alone"
    )
    tree: str | None = _field(
        None,
        f"what each step verifies in one trunk pass (default: {DEFAULT_TREE}; chains with "
        "--typical): 'chain' = one chain of --draft-len drafts; '3,2,1' = a tree, the heads' "
        "top-3 for the next draft, each with top-2 children, each with one; 'chain:K' = a "
        "chain; 'dynamic:N' = each row its own N drafts with the largest product of draft "
        "probabilities (EAGLE-2); auto = such trees, each step as many drafts as pay for "
        "themselves under the measured verify cost and the acceptance seen so far; "
        "'dynamic:N+lookup[:L]', 'auto+lookup[:L]' = with prompt lookup's continuation (up to "
        "L tokens, default 8, found in the row's own text) grafted into each row's tree",
    )
    linear_kernel: str = _field(
        "auto",
        "kernel of the linear layers on a CPU: onednn (faster for one token and much faster "
        "for a few, see multitoken.decode.kernels), torch (its default), auto = onednn for an fp32 "
        "model on a CPU with layers of 512x512 or more",
        choices=LINEAR_KERNELS,
    )

    def validate(self) -> None:
        """Each option on its own, in one place (generate, distill and bench call this); what
        depends on the model — K against the heads' depth, the context window — is checked
        where the model is known."""
        if not _whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise MultitokenError(f"must be >= 1, got {self.max_new_tokens!r}", "--max-new-tokens")
        try:
            value = draft_len_value(self.draft_len)
        except ValueError as exc:
            raise MultitokenError(str(exc), "--draft-len") from None
        if isinstance(value, int) and value < 1:
            raise MultitokenError(f"must be >= 1 or auto, got {value}", "--draft-len")
        if self.temperature < 0:
            raise MultitokenError(f"must be >= 0, got {self.temperature}", "--temperature")
        if not _whole(self.top_k) or self.top_k < 0:
            raise MultitokenError(f"must be a whole number >= 0, got {self.top_k!r}", "--top-k")
        if not 0 < self.top_p <= 1:
            raise MultitokenError(f"must be in (0, 1], got {self.top_p}", "--top-p")
        if not 0 <= self.typical < 1:
            raise MultitokenError(f"must be in [0, 1), got {self.typical}", "--typical")
        if self.typical > 0 and self.speculate and self.temperature == 0:
            raise MultitokenError("typical acceptance samples: give --temperature > 0", "--typical")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise MultitokenError(
                f"unknown kernel {self.linear_kernel!r} (choose from {', '.join(LINEAR_KERNELS)})",
                "--linear-kernel",
            )
        if self.tree is not None:
            from multitoken.decode.trees.spec import CHAIN, parse_spec  # torch: only for a tree

            if parse_spec(self.tree) != CHAIN and self.typical > 0:
                raise MultitokenError("typical acceptance verifies chains only", "--tree")
