"""Acceptance rates learnt while decoding: the one estimator every draft source uses.

Per kind of candidate (a draft position of a chain, a bucket of draft probabilities, a prompt
lookup depth and match length) the rate is (hits + w·prior) / (tries + w), and every step
multiplies all counts by ``decay``: recent steps count most, and a kind that is no longer tried
drifts back towards its prior, so it is tried again now and then (the text may have changed).
:meth:`HitRates.optimistic` adds one standard error, so that a kind seen little gets verified
and candidates better than they look are found out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HitRates:
    """Decaying hit rates with a prior, one per entry of ``prior`` (any shape; its dtype is the
    counts')."""

    prior: torch.Tensor
    weight: float = 2.0
    decay: float = 0.99
    hits: torch.Tensor = field(init=False)
    tries: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not self.prior.is_floating_point():
            self.prior = self.prior.float()
        self.hits = torch.zeros_like(self.prior)
        self.tries = torch.zeros_like(self.prior)

    def forget(self) -> None:
        """One step's decay."""
        self.hits.mul_(self.decay)
        self.tries.mul_(self.decay)

    def add(self, kinds: torch.Tensor, hits: torch.Tensor) -> None:
        """Candidates of ``kinds`` (flat indices into the rates) were tried; ``hits`` says
        which were accepted."""
        self.tries.view(-1).index_add_(0, kinds, torch.ones_like(kinds, dtype=self.tries.dtype))
        self.hits.view(-1).index_add_(0, kinds, hits.to(self.hits.dtype))

    def mean(self) -> torch.Tensor:
        return (self.hits + self.weight * self.prior) / (self.tries + self.weight)

    def optimistic(self) -> torch.Tensor:
        """The rates one standard error above their mean, at most 1."""
        seen = self.tries + self.weight
        a = self.mean()
        return (a + (a * (1 - a) / seen).sqrt()).clamp(max=1.0)


def prefix_tries(accepted: list[int], K: int) -> tuple[list[int], list[int]]:
    """Per draft position j = 1..K of a chain step whose rows accepted ``accepted`` drafts
    each: how many rows tried d_j (d_1..d_{j-1} accepted) and how many accepted it."""
    tries, hits = [0] * K, [0] * K
    for m in accepted:
        for j in range(min(m + 1, K)):  # d_{j+1} was tried when d_1..d_j were accepted
            tries[j] += 1
            hits[j] += int(j < m)
    return tries, hits
