"""Prompt lookup merged into each row's draft tree (``--tree dynamic:N+lookup``,
``--tree auto+lookup``).

Prompt lookup decoding (Saxena 2023; ``transformers``' ``prompt_lookup_num_tokens``) drafts
without a model: it finds the row's last n tokens earlier in the row's own text (prompt and
output so far) and proposes what followed them there. On code, and on any text that quotes or
repeats its prompt, it is right several tokens in a row exactly where small heads fall off with
depth; elsewhere it finds nothing or little. So here it is one more path in each row's tree
(:class:`MergedTree`): from the root it follows the heads' skeleton while a head candidate carries
its next token (that candidate's score becomes the better of the two estimates), and from the
first token no candidate carries it hangs a chain of nodes of its own; the candidates it passes
by are right only where it is wrong, so their chance is scaled by (1 - its). Heads' nodes and
lookup's then compete for the row's budget on one scale, the chance of acceptance: a lookup
token's is the rate at which lookup tokens at that depth, from matches of that length, were
accepted where they were offered so far in the call (:class:`LookupRates`).

Exactness is untouched: a lookup node is one more deterministic candidate (a point mass), so
greedy acceptance keeps the trunk's argmax path and multi-candidate speculative sampling
stays lossless (:func:`multitoken.decode.trees.accept.accept_sampled_tree` with q = None).
"""

from __future__ import annotations

import functools
import math
from array import array
from dataclasses import dataclass, field

import torch

from multitoken.decode.phases import Accepted
from multitoken.decode.rates import HitRates
from multitoken.decode.trees.dynamic import LEAST_SCORE, best_nodes, path_sums
from multitoken.decode.trees.shape import Tree

NGRAM_MAX = 3  # the longest suffix matched; shorter ones are tried when it is not found
PRIOR = 0.5  # a lookup token's chance of acceptance before any is seen
_WIDTH = 4  # bytes per token in the byte string a row is searched in


def continuation(context: list[int], length: int, longest: int = NGRAM_MAX) -> tuple[int, list]:
    """Prompt lookup: the last n tokens of ``context`` (n = ``longest`` down to 1, the first
    found) at their most recent earlier place, and the ``length`` tokens that followed it
    there: where those run into the end of the context, the text is repeating with that period
    and the continuation repeats it too (a run of one token, a short loop). Returns
    (n, tokens); (0, []) when not even the last token recurs."""
    data = array("i", context).tobytes()  # the search runs in C (bytes.rfind)
    for n in range(min(longest, len(context) - 1), 0, -1):
        key = data[-_WIDTH * n :]
        end = _WIDTH * (len(context) - 1)  # the match ends before the last token
        at = data.rfind(key, 0, end)
        while at > 0 and at % _WIDTH:  # a match inside tokens' bytes: look further back
            at = data.rfind(key, 0, at + len(key) - 1)
        if at >= 0:
            seen = context[at // _WIDTH + n :]  # p tokens, up to the end: the text repeats
            return n, [seen[k % len(seen)] for k in range(length)]  # with period p: continue it
    return 0, []


@dataclass
class LookupRates:
    """The chance a lookup token is accepted where it is offered (its predecessor accepted),
    by the length n of the match it came from and its depth j in the continuation: the
    optimistic :class:`multitoken.decode.rates.HitRates` with prior :data:`PRIOR`."""

    length: int
    weight: float = 2.0
    decay: float = 0.99
    counts: HitRates = field(init=False)

    def __post_init__(self) -> None:
        prior = torch.full((NGRAM_MAX, self.length), PRIOR)
        self.counts = HitRates(prior, self.weight, self.decay)

    def log_rates(self) -> list[list[float]]:
        """[n - 1][j - 1] log of the chance, one standard error above the estimate."""
        return self.counts.optimistic().log().tolist()

    def observe(self, outcomes: list[tuple[int, int, bool]]) -> None:
        """One step's offers: (n, j, accepted), j from 0."""
        self.counts.forget()
        if outcomes:
            kinds = torch.tensor([(n - 1) * self.length + j for n, j, _ in outcomes])
            self.counts.add(kinds, torch.tensor([hit for _, _, hit in outcomes]))


@dataclass
class MergedTree:
    """One step's skeleton with each row's lookup path merged in: S head nodes (the
    skeleton's) then L lookup nodes, their own chain per row (nodes past a row's continuation,
    or whose token a head candidate carries, are never kept: their score is
    :data:`multitoken.decode.trees.dynamic.LEAST_SCORE`)."""

    skeleton: Tree
    tokens: torch.Tensor  # [B, S + L] every node's token
    chances: (
        torch.Tensor
    )  # [B, S + L] every node's own log chance (heads': raised where lookup agrees)
    parent: list[list[int]]  # [B][L] each lookup node's parent
    depth: list[list[int]]  # [B][S + L] every node's depth
    path: list[list[int]]  # [B][m] the node carrying each lookup token, j = 1..m
    ngram: list[int]  # [B] the length of each row's match (0: none)

    def values(self) -> torch.Tensor:
        """[B, S + L] every node's value, the sum of own along its path (log chance)."""
        S = self.skeleton.size
        values = self.chances.clone()
        path_sums(self.skeleton, values[:, :S])  # a view: the heads' nodes, in place
        parent = torch.tensor(self.parent, device=values.device)  # [B, L]
        for j in range(parent.size(1)):  # each lookup node's parent comes before it
            values[:, S + j] += values.gather(1, parent[:, j : j + 1]).squeeze(1)
        return values

    def keep_best(self, values: torch.Tensor, budget: int) -> tuple[list[Tree], torch.Tensor]:
        """Each row's ``budget`` nodes of largest ``values`` as its tree, and which nodes they
        are [B, budget + 1], in the tree's (breadth-first) order."""
        S = self.skeleton.size
        trees, rows = [], []
        for b, nodes in enumerate(best_nodes(values, budget).tolist()):
            depth = self.depth[b]
            nodes.sort(key=lambda i: (depth[i], i))  # breadth-first; parents before children
            where = {node: i for i, node in enumerate(nodes)}
            up = [self.skeleton.parent[i] if i < S else self.parent[b][i - S] for i in nodes]
            trees.append(_tree((-1, *(where[u] for u in up[1:]))))
            rows.append(nodes)
        return trees, torch.tensor(rows, device=values.device)

    def outcomes(self, kept: torch.Tensor, paths: list[list[int]]) -> list[tuple[int, int, bool]]:
        """(n, j, accepted) for every lookup token offered: verified, its predecessor accepted
        (``kept`` and ``paths`` as :meth:`keep_best` and the acceptance gave them)."""
        out = []
        for nodes, path, carried, n in zip(kept.tolist(), paths, self.path, self.ngram):
            where = {node: i for i, node in enumerate(nodes)}
            accepted = {nodes[i] for i in path}
            for j, node in enumerate(carried):
                if node not in where:
                    break
                hit = node in accepted
                out.append((n, j, hit))
                if not hit:
                    break
        return out


@dataclass
class LookupProposal:
    """Prompt lookup's proposal for a step: each row's (match length n, continuation); once
    merged into the step's trees, where its tokens sit (``merged``) and which nodes each row
    kept (``kept``), for :meth:`PromptLookup.observe`."""

    continuations: list[tuple[int, list[int]]]
    merged: MergedTree | None = None
    kept: torch.Tensor | None = None


@dataclass
class PromptLookup:
    """Prompt lookup as a draft source for every row of a call: continuations of up to
    ``length`` tokens, which :class:`multitoken.decode.trees.step.RowTrees` merges into the
    heads' skeleton (:meth:`merge`) under the step's node budget."""

    length: int
    rates: LookupRates = field(init=False)

    def __post_init__(self) -> None:
        self.rates = LookupRates(self.length)

    def propose(self, model, state, plan, watch) -> LookupProposal:
        """Each row's continuation of its committed tokens, searched in the host's copy
        (``state.history``): no device read, no model."""
        return self.continue_texts(state.history)

    def continue_texts(self, histories: list[list[int]]) -> LookupProposal:
        return LookupProposal([continuation(history, self.length) for history in histories])

    def merge(
        self,
        skeleton: Tree,
        tokens: torch.Tensor,
        chances: torch.Tensor,
        proposal: LookupProposal,
    ) -> MergedTree:
        """Each row's continuation merged into the drafted ``skeleton``: ``tokens`` [B, S] its
        nodes' tokens (node 0: the pending token, the last of each history), ``chances``
        [B, S] their own log chance of acceptance; all on the host. Kept on ``proposal``."""
        B, S = tokens.shape
        L = self.length
        heads = tokens.tolist()
        rates = self.rates.log_rates()
        lookup_tokens = [[0] * L for _ in range(B)]
        lookup_chances = [[LEAST_SCORE] * L for _ in range(B)]
        parent = [[0] * L for _ in range(B)]
        depth = [list(skeleton.depth) + [0] * L for _ in range(B)]
        paths, ngrams, raised, lowered = [], [], [], []
        for b, (n, cont) in enumerate(proposal.continuations):
            node, carried = 0, []
            for j, token in enumerate(cont):
                score = rates[n - 1][j]
                kids = skeleton.children[node] if node < S else ()
                child = next((c for c in kids if heads[b][c] == token), None)
                # the other candidates here are right only where lookup is wrong
                lookup_wrong = math.log1p(-min(math.exp(score), 1 - 1e-6))
                lowered += [(b, c, lookup_wrong) for c in kids if c != child]
                if child is not None:  # a head candidate carries it: follow the skeleton
                    raised.append((b, child, score))
                    node = child
                else:  # lookup's own node, under the previous one
                    lookup_tokens[b][j], lookup_chances[b][j], parent[b][j] = token, score, node
                    depth[b][S + j] = depth[b][node] + 1
                    node = S + j
                carried.append(node)
            paths.append(carried)
            ngrams.append(n)
        chances = chances.clone()
        if raised:
            rows, nodes, scores = (list(x) for x in zip(*raised))
            better = torch.tensor(scores, dtype=chances.dtype)
            chances[rows, nodes] = torch.maximum(chances[rows, nodes], better)
        if lowered:
            rows, nodes, scores = (list(x) for x in zip(*lowered))
            chances[rows, nodes] += torch.tensor(scores, dtype=chances.dtype)
        extra = torch.tensor(lookup_tokens, dtype=tokens.dtype)
        extra_chances = torch.tensor(lookup_chances, dtype=chances.dtype)
        proposal.merged = MergedTree(
            skeleton,
            torch.cat([tokens, extra], dim=1),
            torch.cat([chances, extra_chances], dim=1),
            parent,
            depth,
            paths,
            ngrams,
        )
        return proposal.merged

    def observe(self, proposal: LookupProposal, accepted: Accepted) -> None:
        """How far each row's offered lookup tokens were accepted: their rates learn it."""
        self.rates.observe(proposal.merged.outcomes(proposal.kept, accepted.paths))


@functools.lru_cache(maxsize=4096)
def _tree(parent: tuple[int, ...]) -> Tree:
    """Trees recur from step to step; a cached one keeps its masks' index tensors."""
    return Tree(parent)
