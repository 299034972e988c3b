"""MTP head families (docs/design.md §The three head families), one module each, all
implementing :class:`~multitoken.heads.base.MTPHeads` and registered by family name."""

from __future__ import annotations

from multitoken.config import HeadConfig
from multitoken.heads.base import HEADS, Committed, HeadInputs, MTPHeads, head_class
from multitoken.heads.bpd import BPDHeads
from multitoken.heads.deepseek import DeepSeekHeads
from multitoken.heads.draft_vocab import DraftVocab, frequent_tokens
from multitoken.heads.meta import MetaHeads
from multitoken.trunk import TrunkParts

__all__ = [
    "HEADS",
    "BPDHeads",
    "Committed",
    "DeepSeekHeads",
    "DraftVocab",
    "HeadInputs",
    "MTPHeads",
    "MetaHeads",
    "build_heads",
    "frequent_tokens",
    "head_class",
]


def build_heads(parts: TrunkParts, config: HeadConfig) -> MTPHeads:
    """Fresh heads of ``config.family`` for this trunk (``config`` validated by the caller)."""
    return head_class(config.family)(parts, config)
