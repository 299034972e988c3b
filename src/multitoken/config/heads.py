"""Which MTP heads to attach to the trunk: :class:`HeadConfig`, its options and their checks.

Its own module because the model, the heads, checkpoints and training all read it, while only
some of them need the training or decoding options (``multitoken.config`` names it with them).
"""

from __future__ import annotations

from dataclasses import dataclass

from multitoken.config.fields import FAMILIES, _field
from multitoken.errors import MultitokenError
from multitoken.families import FAMILIES as TRAITS


@dataclass
class HeadConfig:
    """Which MTP heads to attach to the trunk (docs/design.md §The three head families)."""

    family: str = _field(
        "deepseek",
        "head family: bpd (Stern 2018 / Medusa), meta (Gloeckle 2024), "
        "deepseek (DeepSeek-V3 sequential modules)",
        choices=FAMILIES,
    )
    depth: int = _field(1, "D, the number of extra future tokens predicted per position")
    branch_layer: int | None = _field(
        None, "meta: trunk layer b whose input stream the heads read (default L-1)"
    )
    bpd_unembed: str = _field(
        "shared",
        "bpd: share the trunk's unembedding, or give each head its own "
        "(Medusa), initialised from the trunk's",
        choices=("shared", "per-head"),
    )
    bpd_hidden: int | None = _field(None, "bpd: hidden width of each head's FFN (default: d_model)")
    init_from_trunk: bool | None = _field(
        None,
        "meta/deepseek: start each head's block as a copy of a trunk layer (meta: the branch "
        "layer b it sits beside; deepseek: the last) (default: on for meta on a pretrained "
        "--trunk; off for deepseek, whose modules start as the identity on h, and from scratch)",
    )
    ttt_steps: int = _field(
        0,
        "deepseek: training-time test past D (EAGLE-3): the last module also trains reused this "
        "many more times along the chain, reading its own states as decoding with --draft-len "
        "> D feeds them, so the drafts past D are trained too",
    )
    draft_vocab: int | None = _field(
        None,
        "FR-Spec reduced draft vocabulary: the heads unembed over the N most frequent tokens "
        "of the training data only (counted before training); the trunk still verifies over "
        "the full vocabulary, so output stays exact (default: the full vocabulary)",
    )

    def validate(self, num_layers: int | None = None, vocab_size: int | None = None) -> None:
        if self.family not in FAMILIES:
            raise MultitokenError(
                f"unknown head family {self.family!r} (choose from {', '.join(FAMILIES)})",
                "--family",
            )
        if not isinstance(self.depth, int) or self.depth < 1:
            raise MultitokenError(f"depth must be an integer >= 1, got {self.depth!r}", "--depth")
        if self.bpd_unembed not in ("shared", "per-head"):
            raise MultitokenError(
                f"must be 'shared' or 'per-head', got {self.bpd_unembed!r}", "--bpd-unembed"
            )
        if self.bpd_hidden is not None and self.bpd_hidden < 1:
            raise MultitokenError(f"must be >= 1, got {self.bpd_hidden}", "--bpd-hidden")
        if self.draft_vocab is not None:
            if (
                not isinstance(self.draft_vocab, int)
                or isinstance(self.draft_vocab, bool)
                or self.draft_vocab < 1
            ):
                raise MultitokenError(
                    f"must be an integer >= 1, got {self.draft_vocab!r}", "--draft-vocab"
                )
            if vocab_size is not None and self.draft_vocab > vocab_size:
                raise MultitokenError(
                    f"{self.draft_vocab} exceeds the trunk's vocabulary of {vocab_size}",
                    "--draft-vocab",
                )
        family = TRAITS[self.family]
        steps = self.ttt_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise MultitokenError(f"must be an integer >= 0, got {steps!r}", "--ttt-steps")
        if self.ttt_steps and not family.drafts_past_depth:
            raise MultitokenError(
                f"{self.family} heads draft at most D tokens, each head from the trunk's own "
                "state, so there is nothing past D to train (deepseek reuses its last module)",
                "--ttt-steps",
            )
        if self.init_from_trunk and not family.copies_trunk_layers:
            raise MultitokenError(
                "bpd heads have no decoder block to copy; a fresh bpd head already predicts what "
                "the trunk predicts",
                "--init-from-trunk",
            )
        if self.branch_layer is not None:
            if not family.reads_branch:
                raise MultitokenError(
                    f"{self.family} heads read h^0; only heads that branch off the trunk (meta) "
                    "have a branch layer",
                    "--branch-layer",
                )
            if num_layers is not None and not 0 <= self.branch_layer < num_layers:
                raise MultitokenError(
                    f"branch layer {self.branch_layer} is out of range for a trunk with "
                    f"{num_layers} layers (0..{num_layers - 1})",
                    "--branch-layer",
                )

    def resolved_branch_layer(self, num_layers: int) -> int:
        return num_layers - 1 if self.branch_layer is None else self.branch_layer
