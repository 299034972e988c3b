"""Blockwise-Parallel-Decoding heads (Stern, Shazeer, Uszkoreit 2018); Medusa is the same family.

Head k reads the trunk's final hidden state h^0_i (after its final norm) and predicts t_{i+1+k}:

    z_k = h^0_i + W_out_k · SiLU(W_in_k · h^0_i + b_in_k)        one hidden layer, residual
    logits_k = Unembed_k(z_k)

``W_out`` starts at zero, so a fresh head predicts exactly what the trunk predicts. ``Unembed`` is
the trunk's lm_head (shared) or, Medusa-style, a per-head copy initialised from it. The D heads'
weights are stacked so all heads run in one batched call (drafting is one einsum, not D).

With a draft vocabulary (``--draft-vocab N``, :mod:`multitoken.heads.draft_vocab`) the heads
unembed over N tokens: a row-slice of the shared lm_head, or per-head unembeddings of N rows.
"""

from __future__ import annotations

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.heads.base import Committed, HeadInputs, MTPHeads, register
from multitoken.heads.draft_vocab import DraftVocab
from multitoken.trunk import TrunkParts


@register
class BPDHeads(DraftVocab, MTPHeads):
    family = "bpd"

    def __init__(self, parts: TrunkParts, config: HeadConfig) -> None:
        super().__init__()
        self.parts = parts
        self.depth = config.depth
        d = parts.hidden_size
        hidden = config.bpd_hidden or d
        ref = parts.embed.weight
        std = getattr(parts.config, "initializer_range", 0.02)
        self.w_in = nn.Parameter(torch.randn(self.depth, d, hidden, dtype=ref.dtype) * std)
        self.b_in = nn.Parameter(torch.zeros(self.depth, hidden, dtype=ref.dtype))
        self.w_out = nn.Parameter(torch.zeros(self.depth, hidden, d, dtype=ref.dtype))
        self._init_draft_vocab(getattr(config, "draft_vocab", None))
        self.unembed_weight: nn.Parameter | None = None
        self.unembed_bias: nn.Parameter | None = None
        if config.bpd_unembed == "per-head":
            lm_head = parts.unembed
            rows = slice(None) if self.draft_ids is None else self.draft_ids
            self.unembed_weight = nn.Parameter(
                lm_head.weight.detach()[rows].clone().unsqueeze(0).repeat(self.depth, 1, 1)
            )  # [D, V or N, d]
            if getattr(lm_head, "bias", None) is not None:
                self.unembed_bias = nn.Parameter(
                    lm_head.bias.detach()[rows].clone().unsqueeze(0).repeat(self.depth, 1)
                )
        self.to(ref.device)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        super().set_draft_vocab(ids)
        if self.unembed_weight is None:
            return
        with torch.no_grad():  # per-head rows start again as the trunk's rows of the new subset
            lm_head = self.parts.unembed
            self.unembed_weight.copy_(
                lm_head.weight[self.draft_ids].unsqueeze(0).expand_as(self.unembed_weight)
            )
            if self.unembed_bias is not None:
                self.unembed_bias.copy_(
                    lm_head.bias[self.draft_ids].unsqueeze(0).expand_as(self.unembed_bias)
                )

    def residual(self, h0: torch.Tensor) -> torch.Tensor:
        """z for every head: h0 [..., d] -> [D, ..., d]."""
        pre = torch.einsum("...d,kdh->k...h", h0, self.w_in)
        pre = pre + self.b_in.view(self.depth, *([1] * (h0.dim() - 1)), -1)
        return h0.unsqueeze(0) + torch.einsum(
            "k...h,khd->k...d", nn.functional.silu(pre), self.w_out
        )

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """[D, ..., d] -> [D, ..., V] (or [D, ..., N] over a draft vocabulary)."""
        if self.unembed_weight is None:
            return self.unembed_draft(z)
        out = torch.einsum("k...d,kvd->k...v", z, self.unembed_weight)
        if self.unembed_bias is not None:
            out = out + self.unembed_bias.view(self.depth, *([1] * (z.dim() - 2)), -1)
        return out

    def forward(self, h0: torch.Tensor) -> list[torch.Tensor]:
        """Training forward: h0 [B, T, d] -> D logits tensors [B, T, V] (N: over a draft
        vocabulary, see :meth:`draft_labels`), head k at index k-1."""
        return list(self.logits(self.residual(h0)).unbind(0))

    def training_logits(self, inputs: HeadInputs) -> list[torch.Tensor]:
        return self(inputs.hidden)

    # -- decoding ---------------------------------------------------------------------------------
    def new_draft_state(self, batch: int) -> None:
        return None  # no attention, nothing to cache

    def draft_logits(self, state: None, step: Committed, K: int) -> torch.Tensor:
        """Parallel drafting: heads 1..K all read h^0 at each row's newest trunk position p.

        There the trunk gives its own next token (the pending one, t_{p+1}) and head k gives
        t_{p+1+k}, i.e. draft d_k. Returns logits [B, K, V]."""
        B = step.hidden.size(0)
        newest = (torch.tensor(step.new, device=step.hidden.device) - 1).clamp(min=0)
        h = step.hidden[torch.arange(B, device=newest.device), newest]  # [B, d]
        logits = self.full_logits(self.logits(self.residual(h))[:K])  # [K, B, V]
        return logits.transpose(0, 1)
