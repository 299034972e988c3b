"""Reduced draft vocabulary (FR-Spec, Zhao et al. 2025, arXiv 2502.14856), for every head family.

A head with a draft vocabulary S — the N most frequent tokens of its training data, kept in the
buffer ``draft_ids`` (sorted ids, saved with the heads) — unembeds over S only: its logits are
[..., N], computed from the N rows of the unembedding that S names. Where the unembedding is the
trunk's (bpd ``shared``, meta, deepseek) those rows are a row-slice of the trunk's lm_head taken
at run time (cached while the weight is unchanged), not a copy saved with the heads; a per-head
(Medusa) unembedding stores only its N rows.

Training. FR-Spec is training-free: it slices an already trained draft model's LM head. Heads
trained here learn over S directly, and a label outside S is IGNORED in the loss (no term; the
head gives it probability zero by construction) but counted as a MISS in the head's top-1
accuracy, so the reported accuracy is what drafting can achieve. The loss over S is the
cross-entropy of q against p(· | S), the trunk's distribution renormalised over S: speculative
sampling accepts a draft from q with probability Σ_{x∈S} min(p(x), q(x)) ≤ p(S), and p(· | S)
attains that bound (it is ≥ p on S); greedy drafting wants the argmax of p within S, which
p(· | S) keeps.

Drafting. The N logits are scattered into a full-vocabulary row of -inf before the token is
picked, so q is exactly zero outside S and greedy drafts are the argmax within S. The trunk
verifies over the full vocabulary, so greedy and sampled outputs stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitoken.errors import MultitokenError
from multitoken.training.losses import IGNORE, OUTSIDE


def frequent_tokens(counts: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent token ids by ``counts`` [V] (ties, and tokens never seen: lower id
    first), sorted ascending."""
    if not 1 <= n <= vocab_size:
        raise MultitokenError(f"must be in 1..{vocab_size}, got {n}", "--draft-vocab")
    counts = torch.as_tensor(counts)[:vocab_size]
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:n].sort().values


class DraftVocab:
    """Mixin for a heads module with ``self.parts`` (:class:`multitoken.trunk.TrunkParts`).

    ``draft_ids`` is None for the full vocabulary, else a persistent buffer [N] of token ids.
    """

    draft_ids: torch.Tensor | None

    def _init_draft_vocab(self, n: int | None) -> None:
        ids = None
        if n is not None:  # the first n ids until set_draft_vocab (or a saved file) says which
            ids = torch.arange(n, device=self.parts.embed.weight.device)
        self.register_buffer("draft_ids", ids)
        self._draft_rows_cache: tuple | None = None

    @property
    def full_vocab(self) -> int:
        return self.parts.unembed.weight.shape[0]

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Use the tokens ``ids`` (N distinct ids) as the draft vocabulary. Per-head unembedding
        rows (bpd ``per-head``) are re-initialised from the trunk's, so call this before
        training."""
        if self.draft_ids is None:
            raise MultitokenError("these heads have no draft vocabulary", "--draft-vocab")
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().sort().values
        n = self.draft_ids.numel()
        if ids.numel() != n or ids.unique().numel() != n:
            raise MultitokenError(
                f"need {n} distinct token ids, got {ids.numel()}", "--draft-vocab"
            )
        if int(ids[0]) < 0 or int(ids[-1]) >= self.full_vocab:
            raise MultitokenError(
                f"token ids must lie in 0..{self.full_vocab - 1}", "--draft-vocab"
            )
        with torch.no_grad():
            self.draft_ids.copy_(ids.to(self.draft_ids.device))

    def _draft_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trunk unembedding's rows (and bias entries) of the draft vocabulary. Differentiable
        while the trunk's unembedding trains; otherwise sliced once and kept while the weight
        and ``draft_ids`` are unchanged (the kept slice holds a reference to the weight it was
        cut from, so a new weight can never be mistaken for it)."""
        unembed = self.parts.unembed
        w, b = unembed.weight, getattr(unembed, "bias", None)
        ids = self.draft_ids
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return w.index_select(0, ids), None if b is None else b.index_select(0, ids)
        sources = [t for t in (w, ids, b) if t is not None]
        cached = self._draft_rows_cache
        if (
            cached is None
            or len(cached[0]) != len(sources)
            or not all(
                held.data_ptr() == t.data_ptr() and held.dtype == t.dtype and version == t._version
                for (held, version), t in zip(cached[0], sources)
            )
        ):
            with torch.no_grad():
                rows = w.index_select(0, ids), None if b is None else b.index_select(0, ids)
            # A detached view shares its tensor's version counter, so the version is kept apart.
            self._draft_rows_cache = cached = ([(t.detach(), t._version) for t in sources], rows)
        return cached[1]

    def unembed_draft(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's unembedding over the draft vocabulary, and what the trunk does to its
        logits after it (Gemma's soft-capping, ...): [..., d] -> [..., N] (or [..., V] without
        one)."""
        if self.draft_ids is None:
            return self.parts.logits(x)
        w, b = self._draft_rows()
        return self.parts.logits(x, lambda h: F.linear(h, w, b))

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., N] draft-vocabulary logits -> [..., V] with -inf outside the draft vocabulary."""
        if self.draft_ids is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.full_vocab), float("-inf"))
        return out.index_copy_(-1, self.draft_ids, logits)

    def draft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary labels -> indices into the draft vocabulary; a label outside it becomes
        ``OUTSIDE`` (no loss, a miss in the accuracy), ``IGNORE`` stays."""
        if self.draft_ids is None:
            return labels
        lut = torch.full((self.full_vocab,), OUTSIDE, dtype=torch.long, device=labels.device)
        ids = self.draft_ids.to(labels.device)
        lut[ids] = torch.arange(ids.numel(), device=labels.device)
        return torch.where(labels == IGNORE, labels, lut[labels.clamp(min=0)])
