"""Label shift and losses of every head — the one place that says which token each head predicts.

Convention (shared/DESIGN.md §Notation): the trunk is head 0 and predicts t_{i+1} from position
i; MTP head k (k = 1..D) predicts t_{i+1+k}. Every head's logits are laid out over the same
positions 0..T-1 as the trunk's, and :func:`shift_labels` gives the matching labels.
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


@dataclass
class LossOutput:
    """One training forward: the loss to backpropagate and the figures to report."""

    loss: torch.Tensor  # scalar, differentiable
    main_loss: torch.Tensor  # scalar, detached
    main_acc: torch.Tensor
    head_losses: torch.Tensor  # [D], detached
    head_acc: torch.Tensor  # [D]
