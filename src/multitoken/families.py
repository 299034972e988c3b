"""What each MTP head family is, as far as configuration, training and the bench must know it
without building heads (docs/design.md §The three head families): one record per family, the
registry both :mod:`multitoken.config` and :mod:`multitoken.heads` read, so neither imports the
other. Each head class takes its record's fields as class attributes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    # the heads read the stream entering ``branch_layer`` (Gloeckle 2024) instead of h^0
    reads_branch: bool = False
    # the heads keep a KV cache per head that must see every committed position, so a step
    # that drafts at all runs every head (multitoken.decode.costs.DraftLen)
    keeps_draft_state: bool = False
    # K may exceed D: the last module is reused recurrently (DeepSeek-V3)
    drafts_past_depth: bool = False
    # has a decoder block that can start as a copy of a trunk layer (--init-from-trunk)
    copies_trunk_layers: bool = True
    # ...and does so by default on a pretrained trunk (--init-from-trunk unset)
    copies_trunk_layers_by_default: bool = True
    # λ of the MTP loss when none is given, as a LambdaSchedule string (DeepSeek-V3: 0.3,
    # divided by D; Stern 2018 and Gloeckle 2024 sum the head losses: 1)
    default_lambda: str = "1.0"
    # can compute its loss one head at a time, freeing each head's graph before the next
    # (Gloeckle 2024 §3, memory-efficient implementation): see MTPHeads.headwise_loss
    headwise: bool = False


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # Stern 2018 / Medusa: no decoder block; a fresh head already predicts the trunk's
        Family("bpd", copies_trunk_layers=False),
        Family("meta", reads_branch=True, keeps_draft_state=True, headwise=True),
        Family(
            "deepseek",
            keeps_draft_state=True,
            drafts_past_depth=True,
            copies_trunk_layers_by_default=False,  # identity init measured better
            default_lambda="0.3",
        ),
    )
}
