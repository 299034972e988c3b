"""The trainer: one loop for every head family, from scratch or on a pretrained trunk.

AdamW with warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast where the
device computes bf16 natively (``multitoken.hardware``), periodic validation reporting the trunk's loss and EACH head's loss and top-1
accuracy, a progress bar with tokens/s, ``OUT/metrics.jsonl``, atomic checkpoints and
``--resume``. The same code runs under ``torchrun`` with DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
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
from multitoken.io.checkpoint import (
    load_checkpoint,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from multitoken.model import MTPModel
from multitoken.text.tokenizer import Tokenizer, load_tokenizer
from multitoken.training.data import Corpus
from multitoken.training.evaluate import evaluate
from multitoken.training.featcache import FeatureCache
from multitoken.training.packing import PackedStream, validation_batches
from multitoken.training.plot import plot_tau_curves, tau_curve
from multitoken.trunk import build_trunk, load_trunk

log = logging.getLogger("multitoken")

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


class NonFiniteLoss(RuntimeError):
    """Training diverged; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path | None
    step: int
    val: dict | None  # last validation figures
    model: MTPModel  # the trained model (on its training device, in eval mode)
    feature_cache: dict | None = None  # the frozen trunk's feature cache: hits, rows computed...


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` × peak."""
    peak, warm = cfg.peak_lr(), cfg.resolved_warmup()
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _mean_across_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world
    return values


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


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


def run(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``on_step(step)`` is called after each optimizer step."""
    state = _start(cfg)
    if state.step == 0:  # the curve starts at the initial loss
        _evaluate(state, state.schedule(0, cfg.max_steps), report=False)
        _check_greedy_labels(state)
    state.model.train()
    while state.step < cfg.max_steps:
        lam = _train_step(state)
        if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
            _evaluate(state, lam, report=True)
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps:
            state.last_ckpt = _save_checkpoint(state)
        if on_step is not None:
            on_step(state.step)
    state.bar.close()
    stats = None
    if state.cache is not None:
        state.cache.close()
        stats = state.cache.stats.to_dict()
    return TrainResult(
        state.out, state.last_ckpt, state.step, state.last_val, state.model.eval(), stats
    )


# Below this share of positions where the text follows the trunk's greedy path, --labels trunk
# leaves head 1 few labels (and head k about this share to the k-th power).
FEW_GREEDY_LABELS = 0.2


def _check_greedy_labels(state: Run) -> None:
    """Say so when ``--labels trunk`` will find few labels: head k learns only where the text
    follows the trunk's greedy path k steps, which the trunk's held-out top-1 accuracy
    measures (a random or mismatched trunk, text in another language)."""
    follows = (state.last_val or {}).get("main_acc")
    if state.cfg.labels != "trunk" or follows is None or follows >= FEW_GREEDY_LABELS:
        return
    log.warning(
        "the text follows the trunk's greedy path at %.0f%% of held-out positions, so "
        "--labels trunk gives the heads few labels; --labels soft learns at every position",
        100 * follows,
    )


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


def _train_step(state: Run) -> float:
    """One optimizer step over ``--grad-accum`` micro-batches, logged; returns its λ. A
    non-finite loss stops the run before the step is taken."""
    cfg, optimizer = state.cfg, state.optimizer
    t0 = time.perf_counter()
    lr = lr_at(state.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    lam = state.schedule(state.step, cfg.max_steps)
    sums = _accumulate(state, lam)
    loss = float(sums[0])
    if not math.isfinite(loss):
        state.bar.close()
        where = f"; the last good checkpoint is {state.last_ckpt}" if state.last_ckpt else ""
        raise NonFiniteLoss(f"non-finite loss ({loss}) at step {state.step + 1}; stopped{where}")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    tok_s = state.tokens_per_step / (time.perf_counter() - t0)
    d = state.model.trained_depth
    record = {
        "step": state.step,
        "split": "train",
        "loss": round(loss, 5),
        "main_loss": round(float(sums[1]), 5),
        "head_losses": [round(float(v), 5) for v in sums[2 : 2 + d]],
        "head_acc": [round(float(v), 5) for v in sums[2 + d :]],
        "lr": lr,
        "lambda": lam,
        "tokens_per_s": round(tok_s, 1),
    }
    _log_step(state, record, loss, tok_s)
    return lam


def _accumulate(state: Run, lam: float) -> torch.Tensor:
    """Forward and backward over the step's micro-batches (DDP syncs gradients on the last
    only); returns [loss, main loss, head losses..., head accuracies...] averaged over them and
    over ranks."""
    cfg, model = state.cfg, state.model
    sums = torch.zeros(2 + 2 * model.trained_depth)
    for micro in range(cfg.grad_accum):
        batch = state.pending if state.pending is not None else next(state.batches)
        state.pending = None
        sync = micro == cfg.grad_accum - 1 or state.ddp.world == 1
        with contextlib.nullcontext() if sync else state.wrapped.no_sync():
            with state.autocast():
                batch = batch.to(state.device)
                features = None if state.cache is None else state.cache.features(model, batch)
                res = state.wrapped(
                    batch,
                    lam=lam,
                    memory_efficient=cfg.meta_memory_efficient,
                    features=features,
                    labels=cfg.labels,
                    soft_top_k=cfg.soft_top_k,
                )
            (res.loss / cfg.grad_accum).backward()
        sums += torch.cat(
            [
                res.loss.detach().float().view(1).cpu(),
                res.main_loss.float().view(1).cpu(),
                res.head_losses.float().cpu(),
                res.head_acc.float().cpu(),
            ]
        )
    return _mean_across_ranks(sums / cfg.grad_accum, state.ddp.world)


def _log_step(state: Run, record: dict, loss: float, tok_s: float) -> None:
    """The progress bar every step; ``metrics.jsonl`` every ``--log-every`` (main rank only)."""
    if not state.ddp.main:
        return
    step, cfg = record["step"], state.cfg
    state.bar.update(1)
    held_out = {} if not state.last_val or "tau" not in state.last_val else state.last_val
    state.bar.set_postfix(
        loss=f"{loss:.3f}",
        main=f"{record['main_loss']:.3f}",
        **({"val_tau": f"{held_out['tau']:.2f}"} if held_out else {}),
        tok_s=f"{tok_s:,.0f}",
        refresh=False,
    )
    if step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps:
        _append_jsonl(state.metrics_path, record)


def _evaluate(state: Run, lam: float, report: bool) -> None:
    """Validation figures into ``metrics.jsonl`` and, with ``report``, a line under the bar."""
    cfg = state.cfg
    val = evaluate(
        state.model, state.val, lam, state.autocast, state.cache, cfg.labels, cfg.soft_top_k
    )
    state.last_val = val
    if not state.ddp.main:
        return
    tokens = state.step * state.tokens_per_step
    _append_jsonl(state.metrics_path, {"step": state.step, "split": "val", "tokens": tokens, **val})
    if "tau" in val:  # the scaling curve, redrawn as it grows
        plot_tau_curves({cfg.heads.family: tau_curve(state.metrics_path)}, state.out / "tau.png")
    if report:
        heads = " ".join(
            f"h{k + 1} {loss_k:.3f}/{acc_k:.0%}"
            for k, (loss_k, acc_k) in enumerate(zip(val["head_losses"], val["head_acc"]))
        )
        state.bar.write(
            f"step {state.step}: val main {val['main_loss']:.3f} "
            f"({val['main_acc']:.0%})  heads loss/acc {heads}  {acceptance_line(val)}"
        )


def acceptance_line(val: dict) -> str:
    """``τ 1.52 (a 0.41/0.22/0.10), 3-wide tree τ 1.90``: held-out acceptance against the
    trunk's greedy path (:func:`multitoken.training.evaluate.evaluate`); empty without heads."""
    if "tau" not in val:
        return ""
    rates = "/".join(f"{a:.2f}" for a in val["accept"])
    return f"τ {val['tau']:.2f} (a {rates}), 3-wide tree τ {val['tau_top3']:.2f}"


def _save_checkpoint(state: Run) -> Path | None:
    """A checkpoint at the current step, with every rank's data position; the path on the
    main rank, None on the others."""
    cfg, ddp = state.cfg, state.ddp
    if state.cache is not None:  # a resumed run finds every row computed before this checkpoint
        state.cache.flush()
    data_states = [state.stream.state_dict()]
    if ddp.world > 1:
        data_states = [None] * ddp.world
        dist.all_gather_object(data_states, state.stream.state_dict())
    path = None
    if ddp.main:
        path = save_checkpoint(
            state.out,
            state.step,
            state.model,
            state.tokenizer,
            cfg.to_dict(),
            state.optimizer,
            {"step": state.step, "data": data_states},
            keep=cfg.keep_checkpoints,
            trunk_ref=Path(cfg.trunk) if cfg.trunk and cfg.freeze_trunk else None,
        )
    if ddp.world > 1:
        dist.barrier()
    return path


def train(**options) -> TrainResult:
    """Python API: ``multitoken.train(preset="tiny", family="deepseek", depth=2, out="runs/x")``.

    Keyword arguments are the fields of :class:`TrainConfig` and :class:`HeadConfig` (the CLI's
    flags with ``-`` → ``_``); ``on_step`` is an optional callback.
    """
    on_step = options.pop("on_step", None)
    return run(TrainConfig.from_dict(options), on_step=on_step)
