"""Setting up a training run: every input is checked before ``OUT`` is written, then the model,
data, optimizer, feature cache and progress bar are made and handed to the loop as one
:class:`Run`.

Apart from the loop (:mod:`multitoken.training.trainer`, which names :class:`Run`,
:class:`Dist` and :func:`draft_vocabulary` too) because what a run starts from, fresh or resumed,
single process or under ``torchrun``, is decided once, and the steps only read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from multitoken.config import LambdaSchedule, TrainConfig
from multitoken.errors import MultitokenError
from multitoken.hardware import choose_precision, resolve_device
from multitoken.heads import head_class
from multitoken.io.atomic import write_json_atomic, write_text_atomic
from multitoken.io.checkpoint import load_checkpoint, load_training_state, resolve_checkpoint
from multitoken.model import MTPModel
from multitoken.text.tokenizer import Tokenizer, load_tokenizer
from multitoken.training.data import Corpus
from multitoken.training.featcache import FeatureCache
from multitoken.training.packing import PackedStream, validation_batches
from multitoken.trunk import build_trunk, load_trunk

# Fields that shape the model or the data: a resumed run must not change them.
_FIXED_ON_RESUME = (
    "preset",
    "trunk",
    "tokenizer",
    "seq_len",
    "batch_size",
    "grad_accum",
    "seed",
    "freeze_trunk",
)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> Dist:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


# ---------------------------------------------------------------------------------------------
# Set-up: everything that can fail on bad input happens before the output folder is touched
# ---------------------------------------------------------------------------------------------


def _prepare(cfg: TrainConfig, device: torch.device):
    cfg.validate()
    if cfg.heads.init_from_trunk is None:  # a pretrained layer can be a better start than noise
        family = head_class(cfg.heads.family)
        copies = family.copies_trunk_layers and family.copies_trunk_layers_by_default
        cfg.heads.init_from_trunk = bool(cfg.trunk) and copies
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MultitokenError(f"{out} exists and is not a folder", "--out")
    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = resolve_checkpoint(out, flag="--resume")
    elif (out / "latest").exists():
        raise MultitokenError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out",
            "--out",
        )
    corpus = Corpus.from_specs(cfg.data or None, cfg.val_fraction)
    if resume_ckpt is not None:
        model, tokenizer, meta = load_checkpoint(resume_ckpt, flag="--resume")
        saved = meta["train_config"]
        for name in _FIXED_ON_RESUME:
            if saved.get(name) != getattr(cfg, name):
                raise MultitokenError(
                    f"--{name.replace('_', '-')} was {saved.get(name)!r} in the "
                    f"run being resumed, not {getattr(cfg, name)!r}",
                    "--resume",
                )
        init_only = {"init_from_trunk"}  # how the heads started does not bind a resumed run
        saved_heads = {k: v for k, v in meta["heads"].items() if k not in init_only}
        if saved_heads != {k: v for k, v in cfg.heads.__dict__.items() if k not in init_only}:
            raise MultitokenError(f"the run being resumed has heads {meta['heads']}", "--resume")
    else:
        trunk = load_trunk(cfg.trunk) if cfg.trunk else None
        # A pretrained trunk comes with its own tokenizer; bytes are for from-scratch trunks.
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.trunk)
        if trunk is None:
            trunk = build_trunk(cfg.preset, tokenizer)
        model_vocab = trunk.get_input_embeddings().weight.shape[0]
        if tokenizer.vocab_size > model_vocab:
            raise MultitokenError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the trunk's vocabulary is "
                f"{model_vocab}",
                "--tokenizer",
            )
        model = MTPModel(trunk, cfg.heads)
    if cfg.freeze_trunk:
        model.trunk.requires_grad_(False)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        # A model saved in half precision loads in it; AdamW on half-precision weights loses
        # every update below their rounding step. Train fp32 weights (autocast still runs the
        # matmuls in bf16); casting up is exact, so a frozen trunk keeps its values.
        model.float()
    return out, corpus, tokenizer, model.to(device), resume_ckpt


# Tokens counted to choose a draft vocabulary (--draft-vocab): the start of the training stream.
DRAFT_VOCAB_TOKENS = 4_000_000


def draft_vocabulary(corpus: Corpus, tokenizer, cfg: TrainConfig, vocab_size: int):
    """The ``--draft-vocab`` most frequent tokens among the labels of the first
    ``DRAFT_VOCAB_TOKENS`` training tokens (or the whole training split, if smaller), in the
    order the run reads them: (ids, tokens counted, share of those tokens the ids cover)."""
    from multitoken.heads.draft_vocab import frequent_tokens

    stream = PackedStream(
        corpus.train_files,
        tokenizer,
        cfg.seq_len,
        1,
        seed=cfg.seed,
        loop=False,
        **corpus.stream_kwargs("train"),
    )
    counts = torch.zeros(vocab_size, dtype=torch.long)
    seen = 0
    for row in stream:
        labels = row[0, 1:]
        counts += torch.bincount(labels.clamp(0, vocab_size - 1), minlength=vocab_size)
        seen += labels.numel()
        if seen >= DRAFT_VOCAB_TOKENS:
            break
    ids = frequent_tokens(counts, cfg.heads.draft_vocab, vocab_size)
    return ids, seen, float(counts[ids].sum()) / max(1, seen)


def _optimizer(model: MTPModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.peak_lr(), betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda"
    )


@dataclass
class Run:
    """One training run as its steps pass it along: what was set up, and how far it has come."""

    cfg: TrainConfig
    ddp: Dist
    device: torch.device
    out: Path
    tokenizer: Tokenizer
    model: MTPModel
    wrapped: torch.nn.Module  # the model, or its DDP wrapper under torchrun
    autocast: Callable[[], contextlib.AbstractContextManager]
    schedule: LambdaSchedule
    stream: PackedStream
    batches: Iterator[torch.Tensor]
    pending: torch.Tensor | None  # the first batch, read early to check the corpus; then None
    val: list[torch.Tensor]
    optimizer: torch.optim.AdamW
    cache: FeatureCache | None
    bar: tqdm
    step: int
    last_ckpt: Path | None  # the last good checkpoint: a diverged run names it
    last_val: dict | None = None  # the last validation figures

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.ddp.world


def _start(cfg: TrainConfig) -> Run:
    """Set up everything; every input is checked before ``OUT`` is written."""
    device = resolve_device(cfg.device)
    ddp = _init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    out, corpus, tokenizer, model, resume_ckpt = _prepare(cfg, device)
    precision = choose_precision(cfg.precision, device)
    said = []
    if cfg.heads.draft_vocab is not None and resume_ckpt is None:  # a resumed run has its own
        said.append(_set_draft_vocabulary(corpus, tokenizer, cfg, model, device))
    stream = _train_stream(corpus, tokenizer, cfg, ddp)
    val = validation_batches(corpus, tokenizer, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    optimizer = _optimizer(model, cfg, device)
    step = 0 if resume_ckpt is None else _restore(resume_ckpt, optimizer, stream, ddp.rank)
    batches = iter(stream)
    first = next(batches)  # a corpus too small for --seq-len fails here, before OUT is written
    if ddp.main:  # every input checked: say what the run computes in
        for line in [f"multitoken: {precision.describe()}", *said]:
            print(line, file=sys.stderr)
        _open_output(out, cfg, resume_ckpt is not None, step)
    cache = _open_cache(cfg, out, model, precision.name, ddp)
    wrapped = DistributedDataParallel(model) if ddp.world > 1 else model
    return Run(
        cfg=cfg, ddp=ddp, device=device, out=out, tokenizer=tokenizer, model=model,
        wrapped=wrapped, autocast=precision.autocast(device), schedule=cfg.lambda_schedule(),
        stream=stream, batches=batches, pending=first, val=val, optimizer=optimizer, cache=cache,
        bar=_progress_bar(cfg, step, ddp), step=step, last_ckpt=resume_ckpt,
    )  # fmt: skip


def _train_stream(
    corpus: Corpus, tokenizer: Tokenizer, cfg: TrainConfig, ddp: Dist
) -> PackedStream:
    """This rank's share of the training rows, shuffled by ``--seed``."""
    return PackedStream(
        corpus.train_files,
        tokenizer,
        cfg.seq_len,
        cfg.batch_size,
        seed=cfg.seed,
        rank=ddp.rank,
        world_size=ddp.world,
        per_file=cfg.freeze_trunk,  # the same rows every epoch: their features are cached
        **corpus.stream_kwargs("train"),
    )


def _progress_bar(cfg: TrainConfig, step: int, ddp: Dist) -> tqdm:
    """Steps done of ``--max-steps`` (a resumed run starts part-way), on the main rank only."""
    return tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not ddp.main,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        desc=f"train {cfg.heads.family}",
    )


def _set_draft_vocabulary(
    corpus: Corpus, tokenizer: Tokenizer, cfg: TrainConfig, model: MTPModel, device: torch.device
) -> str:
    """Give the heads the ``--draft-vocab`` most frequent tokens; returns the line saying so."""
    vocab = model.heads.full_vocab
    ids, seen, covered = draft_vocabulary(corpus, tokenizer, cfg, vocab)
    model.heads.set_draft_vocab(ids.to(device))
    return (
        f"multitoken: draft vocabulary: the {len(ids):,} most frequent of {vocab:,} tokens "
        f"in the first {seen:,} training tokens (they cover {covered:.1%} of them)"
    )


def _restore(
    checkpoint: Path, optimizer: torch.optim.Optimizer, stream: PackedStream, rank: int
) -> int:
    """A resumed run's optimizer and data position; returns the step it resumes at."""
    optim_state, state = load_training_state(checkpoint)
    optimizer.load_state_dict(optim_state)
    stream.load_state_dict(state["data"][rank])
    return state["step"]


def _open_output(out: Path, cfg: TrainConfig, resumed: bool, step: int) -> None:
    """``OUT`` with the run's options; a resumed run forgets what was logged after ``step``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "train_config.json", cfg.to_dict())
    if resumed:
        _truncate_metrics(out / "metrics.jsonl", step)


def _open_cache(
    cfg: TrainConfig, out: Path, model: MTPModel, precision: str, ddp: Dist
) -> FeatureCache | None:
    """The frozen trunk's feature cache, where the run has one (``--freeze-trunk``)."""
    if not cfg.freeze_trunk or cfg.feature_cache_gb <= 0:
        return None
    folder = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else out / "feature-cache"
    cap = int(cfg.feature_cache_gb * 2**30)
    cache = FeatureCache(
        folder,
        model,
        cap,
        cfg.feature_cache_dtype,
        precision,
        ddp.rank,
        ddp.world,
        top_k=cfg.soft_top_k,
    )
    if ddp.main:
        print(
            f"multitoken: feature cache {cache.folder}: {cache.stats.held:,} rows held "
            f"({cache.stats.bytes / 2**30:.2f} of {cfg.feature_cache_gb:g} GiB)",
            file=sys.stderr,
        )
    return cache


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines the killed run logged after the checkpoint being resumed."""
    if not path.exists():
        return
    kept = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))
