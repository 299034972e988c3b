"""The rungs of a tree step (``--tree``): the chain's draft → verify → accept → commit, over a
tree of candidates (:mod:`multitoken.decode.trees.shape`).

    draft    each node's children are the heads' top candidates after it (parent-free heads,
             bpd and meta: head d's, the same under every node, as in Medusa's static trees,
             Cai et al. 2024; DeepSeek's module d runs at each node of depth d - 1, so the tree
             follows the causal chain); sampling draws them from the draft distribution
             without replacement instead
    verify   one trunk pass over every node, each at its own position and seeing the cache, its
             ancestors and itself (SpecInfer's tree mask, Miao et al. 2024)
    accept   each row keeps its longest correct root-to-node path and the trunk's next token
             (greedy), or samples it by multi-candidate speculative sampling (lossless)
    commit   the path's cache entries and states move to the front of the new slots, so the
             chain's :func:`multitoken.decode.phases.commit` keeps them as a prefix

A row's kept path plays the role of the chain's accepted prefix: everything after it (stats,
stop tokens, rows leaving the batch) is the chain's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitoken.decode.kvcache import masks_per_kind
from multitoken.decode.phases import (
    Decodable,
    Decoding,
    Plan,
    Verified,
    _joined,
    commit,
    trunk_pass,
)
from multitoken.decode.sampling import probs
from multitoken.decode.trees.accept import (
    accept_greedy_tree,
    accept_sampled_tree,
    sample_candidates,
)
from multitoken.decode.trees.dynamic import Sizer, keep_best, own_scores, path_sums
from multitoken.decode.trees.lookup import Graft, Lookup
from multitoken.decode.trees.shape import Tree, Trees, tree_attention_mask, tree_positions


@dataclass
class Cut:
    """What a sized step cut its trees from: every skeleton node's log draft probability
    [B, S + L] (NaN: a lookup node), the nodes each row kept [B, N] (in its tree's order), each
    row's tree, and the lookup graft (None: the heads' skeleton alone)."""

    scores: torch.Tensor
    kept: torch.Tensor
    trees: list[Tree]
    graft: Graft | None


def draft_tree(
    model: Decodable,
    state: Decoding,
    plan: Plan,
    tree: Tree,
    sizer: Sizer | None,
    lookup: Lookup | None = None,
):
    """Each row's tree (``tree`` itself, or with a ``sizer``, each row's best nodes of ``tree``
    by their draft probabilities, as many as the sizer says: :mod:`multitoken.decode.trees.dynamic`;
    with a ``lookup`` too, of ``tree`` with prompt lookup's continuation grafted in:
    :mod:`multitoken.decode.trees.lookup`), every node's token [B, N] (node 0: the pending token), when
    sampling the draft distribution each node's children were drawn from [B, N, V] (None:
    top-k candidates), and with a sizer the :class:`Cut`.

    Per-row trees take each node's top candidates even when sampling: which nodes a row keeps
    depends on the candidates' probabilities, and multi-candidate rejection stays exact for
    candidates chosen from the draft alone (as point masses), not for random draws kept or
    dropped by their value."""
    B = state.pending.size(0)
    tokens = [state.tokens[b, : state.length[b]] for b in range(B)]
    step = _joined(state.unseen, tokens)
    state.unseen = []
    if plan.sampling.greedy or sizer is not None:

        def choose(logits: torch.Tensor, width: int) -> torch.Tensor:
            return logits.topk(width, dim=-1).indices

    else:

        def choose(logits: torch.Tensor, width: int) -> torch.Tensor:
            return sample_candidates(probs(logits, plan.sampling), width, plan.gen)

    nodes, logits, which = model.heads.draft_tree(state.heads, step, plan.k_max, tree, choose)
    node_tokens = torch.cat([state.pending[:, None], nodes], dim=1)  # [B, N]
    q = None if plan.sampling.greedy else probs(logits, plan.sampling)  # [B, L, V]
    if sizer is not None:  # EAGLE-2: each row's nodes of most probable paths
        law = logits.log_softmax(-1) if q is None else q.log()  # [B, L, V]
        up = [which[max(i, 0)] for i in tree.parent]  # the row of each node's parent
        up = torch.tensor(up, device=law.device)[None] * law.size(-1)
        scores = law.flatten(1).gather(1, up + node_tokens)  # [B, N] log q of each node
        own = own_scores(tree, sizer.calibrate(scores))
        if lookup is None:
            values = path_sums(tree, own)
            trees, kept = keep_best(tree, values, sizer.budget(values))
            return trees, node_tokens.gather(1, kept), None, Cut(scores, kept, trees, None)
        end = max(state.length)
        contexts = [row[:n] for row, n in zip(state.tokens[:, :end].tolist(), state.length)]
        graft = lookup.graft(tree, contexts, node_tokens, own)
        values = graft.values()
        trees, kept = graft.keep_best(values, sizer.budget(values))
        scores = torch.cat([scores, scores.new_full((B, lookup.length), float("nan"))], dim=1)
        return trees, graft.tokens.gather(1, kept), None, Cut(scores, kept, trees, graft)
    if q is None:
        return tree, node_tokens, None, None
    return tree, node_tokens, q[:, which], None


def verify_tree(model: Decodable, state: Decoding, tokens: torch.Tensor, trees: Trees) -> Verified:
    """One trunk pass over all N nodes of every row, logits at each."""
    kv = state.kv
    start = torch.tensor([n - 1 for n in state.length], device=tokens.device)
    dtype = model.parts.embed.weight.dtype
    keys = kv.key_positions()
    mask = masks_per_kind(
        kv.config, lambda window: tree_attention_mask(keys, start, trees, dtype, window)
    )
    layout = (tree_positions(start, trees), mask)
    branch = model.heads.branch_layer
    begin = [n - 1 for n in state.length]
    return trunk_pass(model, tokens, kv, begin, tokens.size(1), True, branch, layout)


def accept_tree(tokens: torch.Tensor, q_draft, logits: torch.Tensor, plan: Plan, trees: Trees):
    """Each row's kept path (node indices from the root) and its new tokens: the path's drafts
    and the trunk's next token, as lists and as the rows of a [B, N] tensor on the device."""
    if plan.sampling.greedy:
        path, bonus = accept_greedy_tree(trees, tokens, logits.argmax(-1))
    else:
        p = probs(logits, plan.sampling)  # [B, N, V]
        path, bonus = accept_sampled_tree(trees, tokens, p, q_draft, plan.gen)
    rows = tokens.tolist()
    accepted = [
        [row[i] for i in nodes[1:]] + [b] for row, nodes, b in zip(rows, path, bonus.tolist())
    ]
    padded = [a + [0] * (tokens.size(1) - len(a)) for a in accepted]
    return path, torch.tensor(padded, device=tokens.device), accepted


def move_paths_forward(state: Decoding, path: list[list[int]], verified: Verified) -> Verified:
    """Put each row's kept nodes first among the N new cache slots and the states the heads
    read, so that the chain's commit keeps them as a prefix."""
    N = verified.logits.size(1)
    rows = []
    for nodes in path:
        kept = set(nodes)
        rows.append(nodes + [i for i in range(N) if i not in kept])
    order = torch.tensor(rows, device=verified.logits.device)  # [B, N]
    state.kv.reorder_new(order)

    def reorder(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.gather(1, order[..., None].expand(-1, -1, x.size(-1)))

    return Verified(verified.logits, reorder(verified.hidden), reorder(verified.branch))


def tree_step(
    model: Decodable,
    state: Decoding,
    plan: Plan,
    tree: Tree,
    watch,
    sizer: Sizer | None = None,
    lookup: Lookup | None = None,
):
    """draft → verify → accept → commit over ``tree`` (with a ``sizer``: each row's best nodes
    of it, and of a ``lookup``'s continuation). Returns each row's new tokens, tree and kept
    path."""
    with watch.section():
        trees, tokens, q_draft, cut = draft_tree(model, state, plan, tree, sizer, lookup)
    verified = verify_tree(model, state, tokens, trees)
    path, new, accepted = accept_tree(tokens, q_draft, verified.logits, plan, trees)
    commit(state, new, [len(a) for a in accepted], move_paths_forward(state, path, verified))
    if cut is not None:
        sizer.observe(cut.scores, cut.kept, cut.trees, path)
        if cut.graft is not None:
            lookup.observe(cut.graft, cut.kept, path)
    return accepted, trees, path
