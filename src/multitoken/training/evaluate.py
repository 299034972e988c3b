"""Scoring a model on held-out text: the trunk's loss and accuracy, each head's, and τ.

Training reports it every ``--eval-every`` steps and ``multitoken bench`` reports the trunk's
(a τ means little without it: a weak trunk's greedy output loops, and heads predict loops well).
It lives beside the model rather than in the trainer so that measuring needs no training code.

Acceptance is the figure that decides speed, so it is the training metric (docs/design.md
§Training). Teacher-forced over held-out rows, head k at position i drafts the token greedy
decoding writes k steps after the pending one; where the text follows the trunk's greedy path
(:func:`multitoken.training.losses.greedy_path_labels`) that token is known, and every head reads exactly
what it reads when decoding — DeepSeek's module k reads Emb of the drafts before it, which equal
the text's tokens on the positions where drafts 1..k-1 were right, the only ones a chain's
acceptance of draft k depends on. So a_k = P(draft k right | drafts 1..k-1 right) is estimated
by counting, and τ = 1 + Σ_k Π_{j≤k} a_j is the expected tokens a chain of K = D emits per trunk
pass (the bench's τ, before any stop token). ``tau_top3`` is the same for a tree that offers a
head's 3 best tokens at every node along the path (a bound on what 3-wide trees can accept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

from multitoken.config import SOFT_TOP_K
from multitoken.heads import HeadInputs
from multitoken.model import MTPModel, TrunkFeatures
from multitoken.training.data import Corpus
from multitoken.training.losses import IGNORE, greedy_path_labels
from multitoken.training.packing import validation_batches

TREE_WIDTH = 3  # the tokens per node of the tree whose τ evaluation reports beside the chain's


class Features(Protocol):
    """Where a frozen trunk's states come from instead of a forward pass
    (:class:`multitoken.training.featcache.FeatureCache`)."""

    def features(self, model: MTPModel, tokens: torch.Tensor) -> TrunkFeatures: ...


@torch.no_grad()
def evaluate(
    model: MTPModel,
    batches: list[torch.Tensor],
    lam: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    cache: Features | None = None,
    labels: str = "text",
    soft_top_k: int = SOFT_TOP_K,
) -> dict:
    """Mean trunk loss/accuracy and per-head loss/top-1 accuracy over fixed validation batches
    (a frozen trunk's states from ``cache``, where given), heads against ``labels`` (as they
    train: ``text``, ``trunk`` or ``soft`` over the trunk's ``soft_top_k``); for a model
    with heads also ``accept``/``tau`` (a chain of K = D against the trunk's greedy path) and
    ``accept_top3``/``tau_top3`` (module docstring)."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    widths = (1, TREE_WIDTH)  # a chain, and a tree of the heads' best TREE_WIDTH tokens
    counts = {w: torch.zeros(model.trained_depth, 2) for w in widths}  # see acceptance_counts
    device = next(model.parameters()).device
    for batch in batches:
        with autocast():
            batch = batch.to(device)
            features = None if cache is None else cache.features(model, batch)
            out = model(batch, lam=lam, features=features, labels=labels, soft_top_k=soft_top_k)
            if model.heads is not None:
                guesses, greedy = head_guesses(model, batch, features, TREE_WIDTH)
        for key in ("main_loss", "main_acc", "head_losses", "head_acc"):
            value = getattr(out, key).float().cpu()
            sums[key] = sums.get(key, 0) + value
        if model.heads is not None:
            for w in widths:
                counts[w] += acceptance_counts(batch, guesses[..., :w], greedy)
    model.train(was_training)
    n = len(batches)
    scores = {
        "main_loss": round(float(sums["main_loss"]) / n, 5),
        "main_acc": round(float(sums["main_acc"]) / n, 5),
        "head_losses": [round(float(v) / n, 5) for v in sums["head_losses"]],
        "head_acc": [round(float(v) / n, 5) for v in sums["head_acc"]],
    }
    if model.heads is not None:
        for w in widths:
            suffix = "" if w == 1 else f"_top{w}"
            a = acceptance_rates(counts[w])
            scores[f"accept{suffix}"] = [round(v, 5) for v in a]
            scores[f"tau{suffix}"] = round(expected_accepted_length(a), 5)
    return scores


@torch.no_grad()
def head_guesses(
    model: MTPModel, tokens: torch.Tensor, features: TrunkFeatures | None, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's ``width`` best tokens at every position, teacher-forced over rows ``tokens``
    [B, T+1], and the trunk's greedy tokens: ([D, B, T, width] full-vocabulary ids, [B, T]).

    A frozen trunk's states come from ``features`` where given (the feature cache), else the
    trunk runs. Draft-vocabulary heads' ids are mapped back to the full vocabulary."""
    heads = model.heads
    if features is not None and features.greedy is not None:
        states = features.states.to(model.parts.embed.weight.dtype)
        hidden, branch = (None, states) if heads.reads_branch else (states, None)
        positions = torch.arange(states.size(1), device=states.device).unsqueeze(0)
        kwargs, greedy = model.parts.block_kwargs(states, positions), features.greedy
    else:
        out = model.trunk_forward(
            tokens[:, :-1], heads.branch_layer if heads.reads_branch else None
        )
        hidden, branch, kwargs = out.hidden, out.branch_hidden, out.block_kwargs
        greedy = out.logits.argmax(-1)
    pad = model.parts.config.pad_token_id
    inputs = HeadInputs(tokens, hidden, branch, kwargs, pad if isinstance(pad, int) else 0)
    draft_ids = getattr(heads, "draft_ids", None)
    top = []
    for logits in heads.training_logits(inputs):  # each [B, T, V] (or N), one at a time
        ids = logits.topk(min(width, logits.size(-1)), dim=-1).indices  # [B, T, width]
        top.append(ids if draft_ids is None else draft_ids[ids])
    return torch.stack(top), greedy.long()


def acceptance_counts(
    tokens: torch.Tensor, guesses: torch.Tensor, greedy: torch.Tensor
) -> torch.Tensor:
    """[D, 2] counts for the acceptance of each draft of a chain (or of a tree offering the
    ``w`` tokens in ``guesses`` [D, B, T, w] at each node) against the greedy path of a trunk
    whose top-1 tokens over rows ``tokens`` [B, T+1] are ``greedy`` [B, T].

    Row k - 1: [positions where drafts 1..k were all right, positions where drafts 1..k-1 were
    right], both among the positions whose k-th greedy token is known. The known positions of
    draft k are a subset of draft k-1's (the text must follow the greedy path k steps), so the
    ratio of the two is the conditional acceptance a_k."""
    D = guesses.size(0)
    counts = torch.zeros(D, 2)
    right_so_far = torch.ones_like(greedy, dtype=torch.bool)  # [B, T]
    for k in range(1, D + 1):
        label = greedy_path_labels(tokens, greedy, k)  # [B, T]
        known = label != IGNORE
        right = (guesses[k - 1] == label.unsqueeze(-1)).any(-1) & known
        counts[k - 1, 1] = (right_so_far & known).sum()
        right_so_far = right_so_far & right
        counts[k - 1, 0] = right_so_far.sum()
    return counts


def acceptance_rates(counts: torch.Tensor) -> list[float]:
    """a_1..a_D from :func:`acceptance_counts` summed over batches; a draft no position
    reached is given rate 0 (nothing is known to be accepted there)."""
    return [float(hit / seen) if seen > 0 else 0.0 for hit, seen in counts.tolist()]


def expected_accepted_length(a: list[float]) -> float:
    """τ = 1 + Σ_k Π_{j≤k} a_j: the tokens a chain emits per trunk pass, the bonus included."""
    tau, reach = 1.0, 1.0
    for rate in a:
        reach *= rate
        tau += reach
    return tau


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
