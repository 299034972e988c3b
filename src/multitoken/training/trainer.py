"""The trainer: one loop for every head family, from scratch or on a pretrained trunk.

AdamW with warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast where the
device computes bf16 natively (``multitoken.hardware``), periodic validation reporting the trunk's loss and EACH head's loss and top-1
accuracy, a progress bar with tokens/s, ``OUT/metrics.jsonl``, atomic checkpoints and
``--resume``. The same code runs under ``torchrun`` with DDP (gloo on CPU, NCCL on GPU).

Setting a run up (every input checked before ``OUT`` is written) is
:mod:`multitoken.training.run_setup`; this module is the loop that steps through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from multitoken.config import TrainConfig
from multitoken.io.checkpoint import save_checkpoint
from multitoken.model import MTPModel
from multitoken.training.evaluate import evaluate
from multitoken.training.plot import plot_tau_curves, tau_curve
from multitoken.training.run_setup import (
    DRAFT_VOCAB_TOKENS,
    Dist,
    Run,
    _start,
    draft_vocabulary,
)

# Set-up is run_setup's; its public names are named here as well, where they were first
__all__ = [
    "DRAFT_VOCAB_TOKENS",
    "FEW_GREEDY_LABELS",
    "Dist",
    "NonFiniteLoss",
    "Run",
    "TrainResult",
    "acceptance_line",
    "draft_vocabulary",
    "evaluate",
    "lr_at",
    "run",
    "train",
]

log = logging.getLogger("multitoken")


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` × peak."""
    peak, warm = cfg.peak_lr(), cfg.resolved_warmup()
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


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
