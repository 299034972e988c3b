"""A tree step (``--tree``): the chain's propose → verify → accept → commit → observe over a
tree of candidates per row (:mod:`multitoken.decode.trees.shape`).

    propose  each node's children are the heads' top candidates after it (parent-free heads,
             bpd and meta: head d's, the same under every node, as in Medusa's static trees,
             Cai et al. 2024; DeepSeek's module d runs at each node of depth d - 1, so the tree
             follows the causal chain); sampling draws them from the draft distribution
             without replacement instead. Per-row trees (:class:`RowTrees`) keep each row's
             best nodes of a drafted skeleton, with prompt lookup's continuation merged in
    verify   one trunk pass over every node, each at its own position and seeing the cache, its
             ancestors and itself (SpecInfer's tree mask, Miao et al. 2024)
    accept   each row keeps its longest correct root-to-node path and the trunk's next token
             (greedy), or samples it by multi-candidate speculative sampling (lossless)
    commit   the path's cache entries and states move to the front of the new slots, so the
             chain's :func:`multitoken.decode.phases.commit` keeps them as a prefix

A row's kept path plays the role of the chain's accepted prefix: everything after it (stats,
stop tokens, rows leaving the batch) is the chain's. A step reads the device once to accept,
and per-row trees once more before the verify pass, whose shape the kept nodes decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitoken.decode.chain import ChainProposal, draft_chain
from multitoken.decode.costs import CostModel
from multitoken.decode.kvcache import masks_per_kind
from multitoken.decode.phases import (
    Accepted,
    Decodable,
    Decoding,
    Plan,
    Verified,
    heads_input,
    read_host,
    trunk_pass,
)
from multitoken.decode.sampling import log_chances, probs
from multitoken.decode.trees.accept import (
    accept_greedy_tree,
    accept_sampled_tree,
    sample_candidates,
)
from multitoken.decode.trees.dynamic import (
    NodeBudget,
    keep_best,
    node_log_chances,
    path_values,
)
from multitoken.decode.trees.lookup import LookupProposal, PromptLookup
from multitoken.decode.trees.shape import (
    Tree,
    Trees,
    tree_attention_mask,
    tree_positions,
)


@dataclass
class Selection:
    """What per-row trees were selected from, for the draft sources to learn from: every
    skeleton node's log draft probability [B, S + L] (NaN: a lookup node), the nodes each row
    kept [B, N] (in its tree's order), each row's tree, and prompt lookup's proposal (None: the
    heads' skeleton alone). On the host: read once before the verify pass."""

    scores: torch.Tensor
    kept: torch.Tensor
    trees: list[Tree]
    lookup: LookupProposal | None


@dataclass
class TreeProposal:
    """Each row's tree (rows may share one), every node's token [B, N] (node 0: the pending
    token), the draft distribution each node's children were drawn from [B, N, V] (None:
    candidates chosen by rank, point masses), how many tokens the heads drafted, and for
    per-row trees the :class:`Selection` they came from."""

    trees: list[Tree]
    tokens: torch.Tensor
    q: torch.Tensor | None
    drafted: int
    selection: Selection | None = None

    @property
    def depth(self) -> int:
        return max(t.max_depth for t in self.trees)

    @property
    def size(self) -> int:
        return self.tokens.size(1)

    def verify(self, model: Decodable, state: Decoding, plan: Plan) -> Verified:
        """One trunk pass over all N nodes of every row, logits at each."""
        kv, tokens = state.kv, self.tokens
        start = torch.tensor([n - 1 for n in state.length], device=tokens.device)
        dtype = model.parts.embed.weight.dtype
        keys = kv.key_positions()
        mask = masks_per_kind(
            kv.config, lambda window: tree_attention_mask(keys, start, self.trees, dtype, window)
        )
        layout = (tree_positions(start, self.trees), mask)
        branch = model.heads.branch_layer
        begin = [n - 1 for n in state.length]
        return trunk_pass(model, tokens, kv, begin, tokens.size(1), True, branch, layout)

    def accept(self, verified: Verified, plan: Plan) -> Accepted:
        """Each row's kept path and its new tokens (the path's drafts and the trunk's next
        token), read from the device once; the order that moves the path to the front."""
        tokens, logits = self.tokens, verified.logits
        if plan.sampling.greedy:
            path, nxt = accept_greedy_tree(self.trees, tokens, logits.argmax(-1))
        else:
            p = probs(logits, plan.sampling)  # [B, N, V]
            path, nxt = accept_sampled_tree(self.trees, tokens, p, self.q, plan.gen)
        B, D = path.shape
        path_tokens = tokens.gather(1, path.clamp_min(0))  # [B, D]
        flat = read_host(torch.cat([path, path_tokens, nxt[:, None]], dim=1)).tolist()
        paths, accepted = [], []
        for row in flat:
            m = sum(1 for i in row[:D] if i >= 0)
            paths.append([0, *row[:m]])
            accepted.append([*row[D : D + m], row[-1]])
        m = (path >= 0).sum(1, keepdim=True)  # [B, 1]
        new = torch.cat([path_tokens, nxt[:, None]], dim=1).scatter(1, m, nxt[:, None])
        order = torch.cat([path.new_zeros(B, 1), path.clamp_min(0)], dim=1)  # [B, D + 1]
        return Accepted(accepted, new, verified, order, paths)


def draft_tree(model: Decodable, state: Decoding, plan: Plan, tree: Tree, by_rank: bool):
    """The heads fill ``tree`` for every row: (tokens [B, N] with the pending token at the
    root, draft logits [B, L, V], for each node the row of those logits its children were
    chosen from). ``by_rank``: children are the top candidates even when sampling (per-row
    trees: which nodes a row keeps depends on the candidates' probabilities, and
    multi-candidate rejection stays exact for candidates chosen from the draft alone, as point
    masses, not for random draws kept or dropped by their value)."""
    if plan.sampling.greedy or by_rank:

        def children(logits: torch.Tensor, width: int) -> torch.Tensor:
            return logits.topk(width, dim=-1).indices

    else:

        def children(logits: torch.Tensor, width: int) -> torch.Tensor:
            return sample_candidates(probs(logits, plan.sampling), width, plan.gen)

    step = heads_input(state)
    nodes, logits, rows = model.heads.draft_tree(state.heads, step, plan.k_max, tree, children)
    return torch.cat([state.pending[:, None], nodes], dim=1), logits, rows


class StaticTree:
    """The heads as a draft source of one fixed tree shape for every row (``--tree 3,2,1``)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def propose(self, model: Decodable, state: Decoding, plan: Plan, watch) -> TreeProposal:
        with watch.section():
            tokens, logits, rows = draft_tree(model, state, plan, self.tree, by_rank=False)
        q = None if plan.sampling.greedy else probs(logits, plan.sampling)[:, rows]
        return TreeProposal([self.tree] * tokens.size(0), tokens, q, plan.k_max)

    def observe(self, proposal: TreeProposal, accepted: Accepted) -> None:
        pass  # a fixed shape learns nothing

    def observe_draft(self, seconds: float, proposal: TreeProposal) -> None:
        pass

    def observe_step(self, seconds: float, tokens: float) -> None:
        pass


class RowTrees:
    """Each row's own tree every step: the heads draft ``skeleton``, prompt lookup (if any)
    proposes each row's continuation, and every row keeps its best nodes of both, as many as
    ``budget`` says (``--tree dynamic:N``: N; ``--tree auto``: as many as the costs say pay,
    :mod:`multitoken.decode.trees.budget`). ``costs`` learn the skeleton's drafting time."""

    def __init__(
        self,
        skeleton: Tree,
        budget: NodeBudget,
        lookup: PromptLookup | None = None,
        costs: CostModel | None = None,
    ) -> None:
        self.skeleton, self.budget, self.lookup, self.costs = skeleton, budget, lookup, costs

    def propose(
        self, model: Decodable, state: Decoding, plan: Plan, watch
    ) -> TreeProposal | ChainProposal:
        if not self.budget.drafts():  # drafting rests: a plain step
            return draft_chain(model, state, 0, 0, plan)
        with watch.section():  # drafting, and choosing each row's nodes: what a tree costs
            tokens, logits, rows = draft_tree(model, state, plan, self.skeleton, by_rank=True)
            log_q = log_chances(logits, plan.sampling)
            parent_row = [rows[max(i, 0)] for i in self.skeleton.parent]  # [S]
            at = torch.tensor(parent_row, device=log_q.device)[None] * log_q.size(-1) + tokens
            scores = log_q.flatten(1).gather(1, at)  # [B, S]: log q of each node's token
            # the one read before verifying: the nodes' tokens and scores decide each row's tree
            host = read_host(torch.cat([tokens.double(), scores.double()], dim=1))
            found = None if self.lookup is None else self.lookup.propose(model, state, plan, watch)
            chosen, selection = self._select(host, found)
        return TreeProposal(selection.trees, chosen.to(tokens.device), None, plan.k_max, selection)

    def _select(self, host: torch.Tensor, found: LookupProposal | None):
        """Each row's nodes, on the host: from ``host`` [B, 2S] the skeleton's node tokens and
        their log draft probabilities, and prompt lookup's continuations ``found`` merged in.
        Returns the chosen nodes' tokens [B, N] and the :class:`Selection`."""
        S = self.skeleton.size
        tokens, scores = host[:, :S].long(), host[:, S:].float()
        chances = self.budget.calibrate(scores)
        if found is None:
            values = path_values(self.skeleton, chances)
            trees, kept = keep_best(self.skeleton, values, self.budget.budget(values))
            return tokens.gather(1, kept), Selection(scores, kept, trees, None)
        chances = node_log_chances(self.skeleton, chances)
        merged = self.lookup.merge(self.skeleton, tokens, chances, found)
        values = merged.values()
        trees, kept = merged.keep_best(values, self.budget.budget(values))
        found.kept = kept
        lookup_scores = scores.new_full((len(trees), self.lookup.length), float("nan"))
        selection = Selection(torch.cat([scores, lookup_scores], 1), kept, trees, found)
        return merged.tokens.gather(1, kept), selection

    def observe(self, proposal: TreeProposal | ChainProposal, accepted: Accepted) -> None:
        selection = getattr(proposal, "selection", None)  # None: a plain step, nothing offered
        if selection is None:
            return
        self.budget.observe(selection.scores, selection.kept, selection.trees, accepted.paths)
        if selection.lookup is not None:
            self.lookup.observe(selection.lookup, accepted)

    def observe_draft(self, seconds: float, proposal) -> None:
        if self.costs is not None and self.costs.learn_draft:
            self.costs.observe_draft(seconds, proposal.drafted)  # the whole skeleton's drafting

    def observe_step(self, seconds: float, tokens: float) -> None:
        """The last step took ``seconds`` (wall, whole) and gave ``tokens`` per row."""
        self.budget.observe_step(tokens, seconds)


Proposal = ChainProposal | TreeProposal
__all__ = ["Proposal", "RowTrees", "Selection", "StaticTree", "TreeProposal", "Trees"]
