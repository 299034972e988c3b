"""MTP head families (shared/DESIGN.md §The three head families), one module each."""

from __future__ import annotations

from torch import nn

from multitoken.config import HeadConfig
from multitoken.heads.bpd import BPDHeads
from multitoken.heads.deepseek import DeepSeekHeads
from multitoken.heads.draft_vocab import DraftVocab, frequent_tokens
from multitoken.heads.meta import MetaHeads
from multitoken.trunk import TrunkParts

__all__ = ["BPDHeads", "DeepSeekHeads", "DraftVocab", "MetaHeads", "build_heads", "frequent_tokens"]


def build_heads(parts: TrunkParts, config: HeadConfig) -> nn.Module:
    """Fresh heads of ``config.family`` for this trunk (``config`` validated by the caller)."""
    if config.family == "bpd":
        return BPDHeads(parts, config)
    if config.family == "meta":
        return MetaHeads(parts, config)
    return DeepSeekHeads(parts, config)
