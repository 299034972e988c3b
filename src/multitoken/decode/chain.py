"""Chains: the heads propose d_1..d_K for every row, one trunk pass verifies them, each row
keeps its longest correct prefix (docs/design.md §Inference).

:class:`ChainProposal` is what a chain step verifies; :class:`HeadsChain` is the draft source
that proposes it, K fixed or chosen before each step by the costs
(:class:`multitoken.decode.costs.DraftLen`). K = 0 is a plain step: the pending token alone.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from multitoken.decode.costs import DraftLen
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
from multitoken.decode.sampling import (
    accept_greedy_rows,
    accept_sampled_rows,
    accept_typical_rows,
    categorical,
    draw_tokens,
    probs,
)


@dataclass
class ChainProposal:
    """K drafts per row after its pending token: drafts [B, K], the draft distributions they
    were drawn from q [B, K, V] (None: argmax), and how many tokens the heads drafted for them
    (K or more: heads that keep a cache draft as far as they were asked)."""

    drafts: torch.Tensor
    q: torch.Tensor | None
    drafted: int

    @property
    def depth(self) -> int:
        return self.drafts.size(1)

    @property
    def size(self) -> int:
        """Tokens the trunk verifies per row: the pending one and the drafts."""
        return self.depth + 1

    def verify(self, model: Decodable, state: Decoding, plan: Plan) -> Verified:
        """One trunk pass over each row's pending token and its drafts, logits at all K+1;
        the heads' states come along whenever the call speculates."""
        ids = torch.cat([state.pending[:, None], self.drafts], dim=1)  # [B, K+1]
        start = [n - 1 for n in state.length]
        branch = model.heads.branch_layer if plan.speculate else None
        return trunk_pass(model, ids, state.kv, start, ids.size(1), plan.speculate, branch)

    def accept(self, verified: Verified, plan: Plan) -> Accepted:
        """Each row's d_1..d_m and the trunk's next token, by the chain's rule for the plan's
        sampling (:mod:`multitoken.decode.sampling`); one read of the device for the batch."""
        drafts, logits, K = self.drafts, verified.logits, self.depth
        if plan.sampling.greedy:
            new = logits.argmax(-1)  # [B, K+1]: the trunk's own choices, bonus included
            m = accept_greedy_rows(drafts, new) if K else new.new_zeros(new.size(0))
        else:
            p = probs(logits, plan.sampling)  # [B, K+1, V]
            if K == 0:
                m = p.new_zeros(p.size(0), dtype=torch.long)
                bonus = categorical(p[:, 0], plan.gen)
            elif plan.cfg.typical > 0:
                m, bonus = accept_typical_rows(drafts, p, plan.cfg.typical, plan.gen)
            else:
                m, bonus = accept_sampled_rows(drafts, self.q, p, plan.gen)
            new = torch.cat([drafts, bonus[:, None]], dim=1)
            new.scatter_(1, m[:, None], bonus[:, None])  # the bonus right after the prefix
        flat = read_host(torch.cat([m[:, None], new], dim=1)).tolist()  # the step's one read
        return Accepted([row[1 : row[0] + 2] for row in flat], new, verified)


def draft_chain(model: Decodable, state: Decoding, K: int, drafted: int, plan: Plan):
    """The heads draft ``drafted`` tokens per row (K <= drafted are verified) from everything
    committed since they last drafted: a :class:`ChainProposal` of K."""
    B = state.pending.size(0)
    if K == 0:
        return ChainProposal(state.pending.new_zeros(B, 0), None, 0)
    sample = functools.partial(draw_tokens, sampling=plan.sampling, generator=plan.gen)
    drafts, q = model.heads.draft(state.heads, heads_input(state), drafted, sample)
    return ChainProposal(drafts[:, :K], None if q is None else q[:, :K], drafted)


class HeadsChain:
    """The heads as a draft source of chains: K fixed, or chosen before each step from the
    costs and the acceptance seen so far (``choice``: :class:`multitoken.decode.costs.DraftLen`;
    K = 0 throughout without speculation)."""

    def __init__(self, choice: DraftLen) -> None:
        self.choice, self.k_max = choice, choice.k_max
        self.K = 0  # the last step's

    def propose(self, model: Decodable, state: Decoding, plan: Plan, watch) -> ChainProposal:
        self.K = K = self.choice.choose()
        with watch.section() if K else contextlib.nullcontext():  # a plain step drafts nothing
            return draft_chain(model, state, K, self.choice.drafted(K), plan)

    def observe(self, proposal: ChainProposal, accepted: Accepted) -> None:
        self.choice.observe(proposal.depth, [n - 1 for n in accepted.counts])

    def observe_draft(self, seconds: float, proposal: ChainProposal) -> None:
        self.choice.observe_draft(seconds, proposal.drafted)

    def observe_step(self, seconds: float, tokens: float) -> None:
        """The last step took ``seconds`` (wall, whole) and gave ``tokens`` per row."""
        self.choice.observe_step(self.K, tokens, seconds)
