"""Tree acceptance: which root-to-node path of a verified draft tree a row keeps.

- greedy (:func:`accept_greedy_tree`): the deepest path whose every token is its parent's argmax;
- sampled (:func:`accept_sampled_tree`): SpecInfer's multi-candidate speculative sampling (Miao
  et al. 2024, §4.2) with draws without replacement as in EAGLE-2 (Li et al. 2024) and Recursive
  Speculative Decoding (Jeon et al. 2024), exactly lossless.

On ``Tree.chain(K)`` both reduce to :mod:`multitoken.decode.sampling`'s chain rules.
"""

from __future__ import annotations

import torch

from multitoken.decode.sampling import Generators, categorical, residual, uniform
from multitoken.decode.trees.shape import (
    Tree,
    Trees,
    _depths,
    _max_depth,
    _parents,
    _per_row,
)


def accept_greedy_tree(
    trees: Trees, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tree verification (Medusa; SpecInfer): tokens [B, N] the node tokens (the root's
    is the pending token), target [B, N] the trunk's argmax after each node -> (path, next).

    Row b keeps the deepest node whose every ancestor's token (and its own) equals its parent's
    target; equal depths go to the lowest node index (so of two siblings with one token, the
    first). path [B, D]: the kept nodes at depths 1..D (-1 past the row's last), next [B]: the
    trunk's token after the last. On the device: the caller reads the result once."""
    B, N = tokens.shape
    device = tokens.device
    parent = _per_row(trees, _parents, device, B)  # [B, N]
    ancestors = _per_row(trees, Tree.ancestors, device, B)  # [B, N, N]: j is i or above it
    match = tokens == target.gather(1, parent)  # [B, N]: node i is its parent's argmax
    match[:, 0] = True  # the root: the pending token, the trunk's already
    reach = ~(ancestors & ~match[:, None, :]).any(-1)  # [B, N]: no node on the way misses
    depth = _per_row(trees, _depths, device, B)
    order = torch.arange(N, device=device)
    key = torch.where(reach, depth * N + (N - 1 - order), -1)  # deepest, then lowest index
    last = key.argmax(dim=1)  # [B]
    nxt = target.gather(1, last[:, None]).squeeze(1)
    # the path: the last node's ancestors, in index order (= depth order, breadth-first)
    on_path = ancestors.gather(1, last[:, None, None].expand(-1, 1, N)).squeeze(1)  # [B, N]
    nodes = torch.where(on_path, order, N + order).sort(dim=1).values  # path first, root first
    D = _max_depth(trees)
    kept = on_path.sum(1, keepdim=True) - 1  # [B, 1] drafts kept
    path = torch.where(order[:D] < kept, nodes[:, 1 : D + 1], -1)  # [B, D]; D = 0: root alone
    return path, nxt


def sample_candidates(q: torch.Tensor, k: int, generator: Generators) -> torch.Tensor:
    """k distinct tokens [..., k] from probabilities q [..., V], distributed as k successive
    draws without replacement, in draw order (Gumbel-top-k, Kool et al. 2019): the candidates
    :func:`accept_sampled_tree` expects when given q. Past q's support, the extra picks are
    tokens q cannot draw, which acceptance skips."""
    u = uniform(tuple(q.shape), generator, q.device).clamp_min(1e-30)
    keys = q.log() - torch.log(-torch.log(u))  # log q + Gumbel noise; log 0 = -inf sorts last
    return keys.topk(k, dim=-1).indices


def _without(draft: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """q with ``token`` [B] taken out and renormalised: the law of the next draw without
    replacement (all zeros once q's support is used up)."""
    rest = draft.scatter(1, token[:, None], 0.0)
    return rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)


def accept_sampled_tree(
    trees: Trees,
    tokens: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor | None,
    generator: Generators,
) -> tuple[list[list[int]], torch.Tensor]:
    """Lossless multi-candidate speculative sampling (SpecInfer, Miao et al. 2024, §4.2; the
    recursive rejection of EAGLE-2, Li et al. 2024, and of Jeon et al. 2024 for draws without
    replacement): tokens [B, N], p [B, N, V] the trunk's distribution after each node (after
    temperature, top-k, top-p), q [B, N, V] the draft distribution node i's children were drawn
    from without replacement in rank order (:func:`sample_candidates`), or None when they were
    chosen deterministically (top-k): q is then the point mass on each candidate in turn.

    From the root, with p' = p at the node and q' = q at the node: accept child c with
    probability min(1, p'(c) / q'(c)) and restart at c; on rejection p' <- norm(max(p' - q', 0))
    and q' <- q' without c, then the next sibling. With no child accepted (or at a leaf) the
    next token is drawn from p'. By induction over the candidates, what is emitted is
    distributed exactly as the trunk's own samples. Children q' cannot draw are skipped.
    ``trees``: each row's, or one for every row. -> (path [B, D]: the kept nodes at depths 1..D, -1 past the row's
    last; next [B]), vectorised over rows, on the device: the caller reads it once."""
    B, _, V = p.shape
    rows = torch.arange(B, device=p.device)
    width = max(max(1, *(len(c) for c in t.children)) for t in {*_as_list(trees)})
    kids = _per_row(trees, lambda t: t.child_table(width=width), p.device, B)  # [B, N, W]
    node = torch.zeros(B, dtype=torch.long, device=p.device)
    walking = torch.ones(B, dtype=torch.bool, device=p.device)
    target, draft = p[:, 0], None if q is None else q[:, 0]  # p', q' [B, V]
    taken = torch.full((B, _max_depth(trees)), -1, dtype=torch.long, device=p.device)
    for d in range(_max_depth(trees)):
        searching = walking.clone()  # rows at a node whose children are still being tried
        for r in range(width):
            child = kids[rows, node, r]  # [B], -1 past the node's last child
            token = tokens[rows, child.clamp_min(0)]
            offer = torch.nn.functional.one_hot(token, V).to(p.dtype) if draft is None else draft
            pt = target.gather(1, token[:, None]).squeeze(1)
            qt = offer.gather(1, token[:, None]).squeeze(1)
            tried = searching & (child >= 0) & (qt > 0)
            u = uniform((B,), generator, p.device)
            accept = tried & (u * qt < pt)  # u < p'(c) / q'(c), without dividing
            reject = (tried & ~accept)[:, None]
            target = torch.where(reject, residual(target, offer), target)
            if draft is not None:
                draft = torch.where(reject, _without(draft, token), draft)
            taken[:, d] = torch.where(accept, child, taken[:, d])
            searching &= ~accept
        walking &= ~searching  # a row whose children were all rejected samples from p'
        node = torch.where(walking, taken[:, d], node)
        target = torch.where(walking[:, None], p[rows, node], target)
        if q is not None:
            draft = torch.where(walking[:, None], q[rows, node], draft)
    nxt = categorical(target, generator)
    return taken, nxt


def _as_list(trees: Trees) -> list[Tree]:
    return [trees] if isinstance(trees, Tree) else list(trees)
