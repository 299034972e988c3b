"""Label shift and losses of every head — the one place that says which token each head predicts.

Convention (docs/design.md §Notation): the trunk is head 0 and predicts t_{i+1} from position
i; MTP head k (k = 1..D) predicts t_{i+1+k}. Every head's logits are laid out over the same
positions 0..T-1 as the trunk's, and :func:`shift_labels` gives the matching labels.

Three kinds of target (``--labels``): the text's tokens (:func:`shift_labels`), a frozen
trunk's greedy path (:func:`greedy_path_labels`), and a frozen trunk's own next-token
distributions, soft targets over its top-k tokens (:func:`trunk_top_k`, :func:`soft_labels`,
:func:`soft_cross_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
# A label outside a head's draft vocabulary (multitoken.heads.draft_vocab): no loss term, but a
# miss in the head's accuracy.
OUTSIDE = -101


def shift_labels(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Labels for head ``k`` at input positions ``0..T-1``, where ``T = tokens.size(1) - 1``.

    ``tokens`` is a packed row of ``T + 1`` tokens; the model reads ``tokens[:, :T]``. Position i
    of head k is labelled ``tokens[:, i + 1 + k]``; positions whose label lies past the row get
    ``IGNORE``.

    Worked example, one row ``tokens = [a, b, c, d, e]`` (T = 4, inputs ``a b c d``)::

        position            0  1  2  3
        head 0 (the trunk)  b  c  d  e      next token
        head 1              c  d  e  -      token after next
        head 2              d  e  -  -
        head 4              -  -  -  -      (every label is past the row)
    """
    if k < 0:
        raise ValueError(f"head index must be >= 0, got {k}")
    batch, length = tokens.shape
    T = length - 1
    labels = torch.full((batch, T), IGNORE, dtype=torch.long, device=tokens.device)
    n = max(0, T - k)
    labels[:, :n] = tokens[:, 1 + k : 1 + k + n]
    return labels


def greedy_path_labels(tokens: torch.Tensor, greedy: torch.Tensor, k: int) -> torch.Tensor:
    """Labels for head ``k`` >= 1 from a frozen trunk's own greedy predictions over text
    (``--labels trunk``): the tokens greedy decoding would write, where the text lets us know.

    ``greedy`` [B, T]: the trunk's top-1 token at each input position of ``tokens`` [B, T+1].
    When decoding, head k drafts from position i the token greedy decoding writes k steps after
    the pending one. Over text, that token is ``greedy[i + k]`` provided the text itself followed
    the greedy path from i on (``tokens[i+1..i+k] == greedy[i..i+k-1]``): the trunk then read
    exactly the prefix it will read when decoding. Elsewhere the label is ``IGNORE``.

    Worked example, inputs ``a b c d`` (T = 4), row ``a b c d e``, greedy ``b x d e``::

        position        0  1  2  3
        text follows    y  n  y  y     (b == b, c != x, d == d, e == e)
        head 1          x  -  e  -     greedy[i+1] where the text follows at i
        head 2          -  -  -  -     needs two steps followed: (0: y,n) (2: y,y but 4 > T-1)
    """
    if k < 1:
        raise ValueError(f"head index must be >= 1, got {k}")
    batch, length = tokens.shape
    T = length - 1
    follows = tokens[:, 1:] == greedy  # [B, T]: the text's next token is the trunk's top-1
    labels = torch.full((batch, T), IGNORE, dtype=torch.long, device=tokens.device)
    n = max(0, T - k)
    if n:
        ok = follows[:, :n].clone()
        for j in range(1, k):
            ok &= follows[:, j : j + n]
        labels[:, :n] = torch.where(ok, greedy[:, k : k + n].long(), IGNORE)
    return labels


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled positions (fp32 softmax) and top-1 accuracy (no grad).

    logits: [B, T, V]; labels: [B, T] with ``IGNORE`` where there is no label, and ``OUTSIDE``
    where the label lies outside the head's draft vocabulary: no loss term, but counted as a
    miss in the accuracy. A batch with no loss term has loss 0, not NaN (a draft-vocabulary
    head can meet one).
    """
    flat = logits.reshape(-1, logits.size(-1)).float()  # [B*T, V]
    target = labels.reshape(-1)
    inside = torch.where(target == OUTSIDE, IGNORE, target)
    terms = (inside != IGNORE).sum()  # sum / terms is what the "mean" reduction computes
    loss = F.cross_entropy(flat, inside, ignore_index=IGNORE, reduction="sum") / terms.clamp(min=1)
    with torch.no_grad():
        valid = target != IGNORE
        hits = (flat.argmax(-1) == target) & valid
        acc = hits.sum().float() / valid.sum().clamp(min=1)
    return loss, acc


def trunk_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk's next-token distributions as soft targets (``--labels soft``): at each position
    its ``k`` likeliest tokens and their probabilities renormalised over those ``k``.

    logits: [..., V], any dtype (top-k copies entries exactly; the softmax is fp32). Returns
    ``ids`` [..., k'] (long, likeliest first; ``ids[..., 0]`` is always ``logits.argmax(-1)``,
    the greedy token, whatever ties) and ``probs`` [..., k'], fp32 rounded to fp16, where
    k' = min(k, V). fp16 is the feature cache's storage (multitoken.training.featcache), so targets
    computed live equal those read back; in [0, 1] it keeps 11 significant bits (bf16: 8), and
    a probability under 6e-8 that rounds to 0 weighs nothing. (fp32 tensors, not fp16 ones:
    CPU autocast refuses to stack fp16.)

    Why renormalised: the softmax of the k largest logits is p restricted to its top k and
    divided by the mass there, p_k. Soft cross-entropy against it (:func:`soft_cross_entropy`)
    is KL(p_k ‖ q) + H(p_k), so the head matches the trunk where drafts get accepted, and no
    V-wide row of p need be stored: k ids and k probabilities per position.

    Worked example, V = 4, one position, logits ``[1, 3, 3, 0]``, k = 2::

        ids    [1, 2]          tokens 1 and 2 tie; argmax (the lower id) first
        probs  [0.5, 0.5]      softmax over the logits [3, 3]
    """
    top = logits.topk(min(k, logits.size(-1)), dim=-1)  # [..., k'] by value, ties in any order
    greedy = logits.argmax(-1, keepdim=True)  # [..., 1] the lowest id among the largest
    # The greedy token goes first: swapped with the first if topk put it elsewhere, else in
    # place of the first (more than k' tokens tie). Either way the values are unchanged.
    ids = torch.where(top.indices == greedy, top.indices[..., :1], top.indices)
    ids[..., :1] = greedy
    return ids, top.values.float().softmax(-1).half().float()


def soft_labels(
    topk_ids: torch.Tensor, topk_probs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets of head ``k`` >= 1 at input positions ``0..T-1`` (``--labels soft``).

    ``topk_ids``, ``topk_probs`` [B, T, K]: :func:`trunk_top_k` of the frozen trunk's logits
    over the same inputs, teacher-forced: at position j, p_trunk(· | x_{<=j}). Head k at
    position i drafts t_{i+1+k}, the token the trunk predicts at position i+k, so its target is
    the trunk's distribution there, p_trunk(· | x_{<=i+k}) — read off the text, no generation.
    Positions whose i+k lies past the row get ids ``IGNORE`` and probability 0 (no loss term).
    Returns (ids [B, T, K] long, probs [B, T, K] float32).

    Worked example, inputs ``a b c d`` (T = 4), P_j = the trunk's top-K at position j::

        position          0   1   2   3
        trunk             P0  P1  P2  P3     what follows a, ab, abc, abcd
        head 1            P1  P2  P3  -      t_{i+2} as the trunk sees it after t_{i+1}
        head 2            P2  P3  -   -
        head 4            -   -   -   -      (every target is past the row)
    """
    if k < 1:
        raise ValueError(f"head index must be >= 1, got {k}")
    batch, T, width = topk_ids.shape
    ids = torch.full((batch, T, width), IGNORE, dtype=torch.long, device=topk_ids.device)
    probs = torch.zeros((batch, T, width), dtype=torch.float32, device=topk_probs.device)
    n = max(0, T - k)
    ids[:, :n] = topk_ids[:, k : k + n]
    probs[:, :n] = topk_probs[:, k : k + n]
    return ids, probs


def soft_cross_entropy(
    logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean soft cross-entropy over positions with a target (fp32 softmax) and top-1 accuracy
    against the target's first token, the trunk's argmax (no grad).

    logits: [B, T, V] a head's logits (V = its draft vocabulary's size, if it has one);
    target_ids [B, T, K]: indices into those logits (:func:`soft_labels`, mapped by the heads'
    ``draft_labels``), ``IGNORE`` where there is no target and ``OUTSIDE`` for a token outside
    the draft vocabulary; target_probs [B, T, K]. At each position the weights are the
    probabilities of the ids inside, renormalised to sum 1 (p̃), and the loss is
    -Σ_j p̃_j log q(id_j) = KL(p̃ ‖ q) + H(p̃): H(p̃) does not depend on the head, so the head
    learns KL's gradient, q - p̃ over its logits. Tokens outside the draft vocabulary drop out
    and p̃ is the trunk's distribution renormalised over the draft vocabulary, the target that
    bounds acceptance there (multitoken.heads.draft_vocab); a position with no id inside has
    no loss term, and a trunk argmax outside counts as a miss, as in :func:`cross_entropy`. A
    batch with no loss term has loss 0, not NaN.

    Worked example, V = 3, one position, q = softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2], target
    ids [2, 0], probs [0.75, 0.25]::

        loss = -(0.75 ln 1/2 + 0.25 ln 1/4) = 1.25 ln 2
             = KL(p̃ ‖ q) + H(p̃) = (0.75 ln 1.5 + 0.25 ln 1) + (-0.75 ln 0.75 - 0.25 ln 0.25)
        accuracy 1 (argmax q = 2 = ids[0])

    With a draft vocabulary {1, 2} (q over those two; token 2 is draft index 1), the ids
    become [1, OUTSIDE]: token 0's mass drops out, p̃ = [1] on token 2, loss = -ln q(2).
    """
    flat = logits.reshape(-1, logits.size(-1)).float()  # [N, V], N = B*T
    ids = target_ids.reshape(flat.size(0), -1)  # [N, K]
    inside = ids >= 0  # IGNORE and OUTSIDE are negative
    weights = torch.where(inside, target_probs.reshape(ids.shape).float(), 0.0)
    mass = weights.sum(-1, keepdim=True)  # [N, 1]
    weights = weights / mass.clamp(min=torch.finfo(torch.float32).tiny)
    log_q = flat.log_softmax(-1).gather(-1, ids.clamp(min=0))  # [N, K]
    terms = (mass.squeeze(-1) > 0).sum()
    loss = -torch.where(weights > 0, weights * log_q, 0.0).sum() / terms.clamp(min=1)
    with torch.no_grad():
        top = ids[:, 0]  # the trunk's argmax at the target position
        valid = top != IGNORE
        hits = (flat.argmax(-1) == top) & valid
        acc = hits.sum().float() / valid.sum().clamp(min=1)
    return loss, acc


@dataclass
class LossOutput:
    """One training forward: the loss to backpropagate and the figures to report."""

    loss: torch.Tensor  # scalar, differentiable
    main_loss: torch.Tensor  # scalar, detached
    main_acc: torch.Tensor
    head_losses: torch.Tensor  # [D], detached
    head_acc: torch.Tensor  # [D]
