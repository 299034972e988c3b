"""The trainer: one loop for every head family, from scratch or on a pretrained trunk.

AdamW with warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast where the
device computes bf16 natively (``multitoken.hardware``), periodic validation reporting the trunk's loss and EACH head's loss and top-1
accuracy, a progress bar with tokens/s, ``OUT/metrics.jsonl``, atomic checkpoints and
``--resume``. The same code runs under ``torchrun`` with DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from multitoken.checkpoint import (
    load_checkpoint,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from multitoken.config import TrainConfig
from multitoken.data import Corpus
from multitoken.errors import MultitokenError
from multitoken.featcache import FeatureCache
from multitoken.fileio import write_json_atomic, write_text_atomic
from multitoken.hardware import choose_precision, resolve_device
from multitoken.heads import head_class
from multitoken.model import MTPModel
from multitoken.packing import PackedStream, validation_batches
from multitoken.tokenizer import load_tokenizer
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
    if cfg.heads.init_from_trunk is None:  # a pretrained layer is a better start than noise
        copies = head_class(cfg.heads.family).copies_trunk_layers
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
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: MTPModel,
    batches: list[torch.Tensor],
    lam: float,
    autocast,
    cache: FeatureCache | None = None,
    labels: str = "text",
) -> dict:
    """Mean trunk loss/accuracy and per-head loss/top-1 accuracy over fixed validation batches
    (a frozen trunk's states from ``cache``, where given), heads against ``labels``."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    for batch in batches:
        with autocast():
            batch = batch.to(device)
            features = None if cache is None else cache.features(model, batch)
            out = model(batch, lam=lam, features=features, labels=labels)
        for key in ("main_loss", "main_acc", "head_losses", "head_acc"):
            value = getattr(out, key).float().cpu()
            sums[key] = sums.get(key, 0) + value
    model.train(was_training)
    n = len(batches)
    return {
        "main_loss": round(float(sums["main_loss"]) / n, 5),
        "main_acc": round(float(sums["main_acc"]) / n, 5),
        "head_losses": [round(float(v) / n, 5) for v in sums["head_losses"]],
        "head_acc": [round(float(v) / n, 5) for v in sums["head_acc"]],
    }


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


def run(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``on_step(step)`` is called after each optimizer step."""
    device = resolve_device(cfg.device)
    ddp = _init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    out, corpus, tokenizer, model, resume_ckpt = _prepare(cfg, device)
    precision = choose_precision(cfg.precision, device)
    autocast = precision.autocast(device)
    schedule = cfg.lambda_schedule()
    said = []
    if cfg.heads.draft_vocab is not None and resume_ckpt is None:  # a resumed run has its own
        vocab = model.heads.full_vocab
        ids, seen, covered = draft_vocabulary(corpus, tokenizer, cfg, vocab)
        model.heads.set_draft_vocab(ids.to(device))
        said.append(
            f"multitoken: draft vocabulary: the {len(ids):,} most frequent of {vocab:,} tokens "
            f"in the first {seen:,} training tokens (they cover {covered:.1%} of them)"
        )

    stream = PackedStream(
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
    val = validation_batches(corpus, tokenizer, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    optimizer = _optimizer(model, cfg, device)
    step = 0
    if resume_ckpt is not None:
        optim_state, state = load_training_state(resume_ckpt)
        optimizer.load_state_dict(optim_state)
        step = state["step"]
        stream.load_state_dict(state["data"][ddp.rank])
    batches = iter(stream)
    first = next(batches)  # a corpus too small for --seq-len fails here, before OUT is written
    if ddp.main:  # every input checked: say what the run computes in
        print(f"multitoken: {precision.describe()}", file=sys.stderr)
        for line in said:
            print(line, file=sys.stderr)

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", cfg.to_dict())
        if resume_ckpt is not None:
            _truncate_metrics(out / "metrics.jsonl", step)
    cache = None
    if cfg.freeze_trunk and cfg.feature_cache_gb > 0:
        folder = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else out / "feature-cache"
        cap = int(cfg.feature_cache_gb * 2**30)
        cache = FeatureCache(
            folder, model, cap, cfg.feature_cache_dtype, precision.name, ddp.rank, ddp.world
        )
        if ddp.main:
            print(
                f"multitoken: feature cache {cache.folder}: {cache.stats.held:,} rows held "
                f"({cache.stats.bytes / 2**30:.2f} of {cfg.feature_cache_gb:g} GiB)",
                file=sys.stderr,
            )
    wrapped = DistributedDataParallel(model) if ddp.world > 1 else model
    metrics_path = out / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ddp.world
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not ddp.main,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        desc=f"train {cfg.heads.family}",
    )
    last_ckpt = resume_ckpt
    last_val = None

    def checkpoint(at: int) -> Path | None:
        if cache is not None:  # a resumed run finds every row computed before this checkpoint
            cache.flush()
        data_states = [stream.state_dict()]
        if ddp.world > 1:
            data_states = [None] * ddp.world
            dist.all_gather_object(data_states, stream.state_dict())
        path = None
        if ddp.main:
            path = save_checkpoint(
                out,
                at,
                model,
                tokenizer,
                cfg.to_dict(),
                optimizer,
                {"step": at, "data": data_states},
                keep=cfg.keep_checkpoints,
                trunk_ref=Path(cfg.trunk) if cfg.trunk and cfg.freeze_trunk else None,
            )
        if ddp.world > 1:
            dist.barrier()
        return path

    if step == 0:  # the curve starts at the initial loss
        last_val = evaluate(model, val, schedule(0, cfg.max_steps), autocast, cache)
        if ddp.main:
            _append_jsonl(metrics_path, {"step": 0, "split": "val", **last_val})
    pending = first
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = schedule(step, cfg.max_steps)
        sums = torch.zeros(2 + 2 * model.depth)
        for micro in range(cfg.grad_accum):
            batch = pending if pending is not None else next(batches)
            pending = None
            sync = micro == cfg.grad_accum - 1 or ddp.world == 1
            ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
            with ctx:
                with autocast():
                    batch = batch.to(device)
                    features = None if cache is None else cache.features(model, batch)
                    res = wrapped(
                        batch,
                        lam=lam,
                        memory_efficient=cfg.meta_memory_efficient,
                        features=features,
                        labels=cfg.labels,
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
        sums = _mean_across_ranks(sums / cfg.grad_accum, ddp.world)
        loss = float(sums[0])
        if not math.isfinite(loss):
            bar.close()
            where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
            raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step + 1}; stopped{where}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        tok_s = tokens_per_step / dt
        d = model.depth
        record = {
            "step": step,
            "split": "train",
            "loss": round(loss, 5),
            "main_loss": round(float(sums[1]), 5),
            "head_losses": [round(float(v), 5) for v in sums[2 : 2 + d]],
            "head_acc": [round(float(v), 5) for v in sums[2 + d :]],
            "lr": lr,
            "lambda": lam,
            "tokens_per_s": round(tok_s, 1),
        }
        if ddp.main:
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                main=f"{record['main_loss']:.3f}",
                tok_s=f"{tok_s:,.0f}",
                refresh=False,
            )
            if step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps:
                _append_jsonl(metrics_path, record)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_val = evaluate(model, val, lam, autocast, cache)
            if ddp.main:
                _append_jsonl(metrics_path, {"step": step, "split": "val", **last_val})
                heads = " ".join(
                    f"h{k + 1} {loss_k:.3f}/{acc_k:.0%}"
                    for k, (loss_k, acc_k) in enumerate(
                        zip(last_val["head_losses"], last_val["head_acc"])
                    )
                )
                bar.write(
                    f"step {step}: val main {last_val['main_loss']:.3f} "
                    f"({last_val['main_acc']:.0%})  heads loss/acc {heads}"
                )
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            last_ckpt = checkpoint(step)
        if on_step is not None:
            on_step(step)
    bar.close()
    stats = None
    if cache is not None:
        cache.close()
        stats = cache.stats.to_dict()
    return TrainResult(out, last_ckpt, step, last_val, model.eval(), stats)


def train(**options) -> TrainResult:
    """Python API: ``multitoken.train(preset="tiny", family="deepseek", depth=2, out="runs/x")``.

    Keyword arguments are the fields of :class:`TrainConfig` and :class:`HeadConfig` (the CLI's
    flags with ``-`` → ``_``); ``on_step`` is an optional callback.
    """
    on_step = options.pop("on_step", None)
    return run(TrainConfig.from_dict(options), on_step=on_step)
