"""Scoring a model on held-out text: the trunk's loss and accuracy and each head's.

Training reports it every ``--eval-every`` steps and ``multitoken bench`` reports the trunk's
(a τ means little without it: a weak trunk's greedy output loops, and heads predict loops well).
It lives beside the model rather than in the trainer so that measuring needs no training code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

from multitoken.data import Corpus
from multitoken.model import MTPModel, TrunkFeatures
from multitoken.packing import validation_batches


class Features(Protocol):
    """Where a frozen trunk's states come from instead of a forward pass
    (:class:`multitoken.featcache.FeatureCache`)."""

    def features(self, model: MTPModel, tokens: torch.Tensor) -> TrunkFeatures: ...


@torch.no_grad()
def evaluate(
    model: MTPModel,
    batches: list[torch.Tensor],
    lam: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    cache: Features | None = None,
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


def trunk_validation(
    model: MTPModel, corpus: Corpus, seq_len: int, batch_size: int, max_batches: int = 4
) -> dict:
    """The trunk's loss and accuracy on a few validation batches, computed in fp32 whatever the
    model decodes in (it is put back in its own dtype after): ``{val_loss, val_accuracy}``.
    ``model.tokenizer`` cuts the text, as :func:`multitoken.load` sets it."""
    batches = validation_batches(corpus, model.tokenizer, seq_len, batch_size, max_batches)
    dtype = model.parts.embed.weight.dtype
    try:
        scores = evaluate(model.float(), batches, 1.0, contextlib.nullcontext)
    finally:
        model.to(dtype)
    return {"val_loss": scores["main_loss"], "val_accuracy": scores["main_acc"]}
