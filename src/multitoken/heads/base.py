"""What every MTP head family provides, and the registry from family name to class.

The model, the trainer, the feature cache and the decoder program against :class:`MTPHeads`
only (as torchtitan's ``ModelProtocol`` + ``TrainSpec``): which trunk state a family reads, its
loss weights, its training forward over :class:`HeadInputs`, its draft state and
``draft(state, step, K, sample)`` over :class:`Committed`, and how far it can draft. A family is
one module under ``multitoken.heads`` whose class is decorated with :func:`register`; nothing
else compares family names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from multitoken.errors import MultitokenError
from multitoken.families import FAMILIES, Family

if TYPE_CHECKING:  # type only: trees are built by the decoder
    from multitoken.decode.trees.shape import Tree


@dataclass
class Committed:
    """What the heads draft from. Row r has ``len(tokens[r])`` committed tokens (the last is the
    trunk's pending token, not yet through the trunk) and ``new[r]`` trunk-processed positions
    ``start[r] .. start[r] + new[r] - 1`` the heads have not drafted from yet, whose states are
    in ``hidden``/``branch``."""

    tokens: list[torch.Tensor] | None  # per row [N_r]; filled in when the heads draft
    hidden: torch.Tensor  # [B, n, d] h^0 of the new positions (a prefix of new[r] per row)
    branch: torch.Tensor | None  # [B, n, d] stream entering the branch layer (meta)
    start: list[int]
    new: list[int]

    def select(self, rows: torch.Tensor) -> Committed:
        """The same for the batch rows ``rows`` ([n] long) only."""
        keep = rows.tolist()
        return Committed(
            None if self.tokens is None else [self.tokens[r] for r in keep],
            self.hidden[rows],
            None if self.branch is None else self.branch[rows],
            [self.start[r] for r in keep],
            [self.new[r] for r in keep],
        )


@dataclass
class HeadInputs:
    """What a training forward hands the heads, over rows ``tokens`` [B, T+1] read as
    ``tokens[:, :T]``: each family takes the parts it needs."""

    tokens: torch.Tensor  # [B, T+1]
    hidden: torch.Tensor | None  # [B, T, d] h^0, the trunk's final-norm output
    branch: torch.Tensor | None  # [B, T, d] the stream entering the branch layer (reads_branch)
    block_kwargs: dict  # decoder-layer arguments over positions 0..T-1 (mask, rotary)
    pad_id: int = 0


# Turns draft logits [B, K, V] into (drafts [B, K], q [B, K, V] or None): argmax or a sample.
DraftSampler = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

# Chooses w children under each of M tree nodes from the draft logits there, [B, M, V] ->
# [B, M, w] tokens in rank order: the top w, or w draws without replacement.
ChildSampler = Callable[[torch.Tensor, int], torch.Tensor]


class MTPHeads(nn.Module):
    """The protocol of a head family. Subclasses set the class attributes and implement
    :meth:`training_logits`, :meth:`new_draft_state` and :meth:`draft`."""

    family: ClassVar[str]
    # the family's record (multitoken.families.Family), its fields also class attributes
    traits: ClassVar[Family]
    reads_branch: ClassVar[bool]
    keeps_draft_state: ClassVar[bool]
    drafts_past_depth: ClassVar[bool]
    copies_trunk_layers: ClassVar[bool]
    copies_trunk_layers_by_default: ClassVar[bool]
    default_lambda: ClassVar[str]
    headwise: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:  # a family's own class (stubs inherit the defaults)
            _take_traits(cls, FAMILIES[cls.family])

    depth: int
    branch_layer: int | None = None

    @classmethod
    def loss_weights(cls, depth: int, lam: float) -> list[float]:
        """Weight of each head's loss in the total (the trunk's weight is 1): Stern 2018 and
        Gloeckle 2024 sum the heads' losses, ``L = L_main + λ Σ_k L^k``."""
        return [lam] * depth

    def training_logits(self, inputs: HeadInputs) -> list[torch.Tensor]:
        """Teacher-forced logits of heads 1..D (and of the steps past D that
        :attr:`trained_depth` adds), each [B, T, V] (N over a draft vocabulary)."""
        raise NotImplementedError

    @property
    def trained_depth(self) -> int:
        """How many drafts along the chain training teaches (:meth:`training_logits` gives
        one logits tensor each): D, or more where a module is reused past D."""
        return self.depth

    def headwise_loss(
        self, branch: torch.Tensor, layer_kwargs: dict, labels: list, weights: list[float]
    ) -> Any:
        """The trunk's loss from the branch layer on and every head's, head by head
        (``headwise`` families only): a :class:`multitoken.training.losses.LossOutput`."""
        raise NotImplementedError

    def new_draft_state(self, batch: int) -> Any:
        """The state drafting carries from step to step (None for stateless heads)."""
        raise NotImplementedError

    def draft(self, state: Any, step: Committed, K: int, sample: DraftSampler):
        """Drafts d_1..d_K for every row from what ``step`` commits: (drafts [B, K], q or None).
        Parent-free families pick from :meth:`draft_logits`."""
        return sample(self.draft_logits(state, step, K))

    def draft_logits(self, state: Any, step: Committed, K: int) -> torch.Tensor:
        """Parent-free families only: heads 1..K's logits at each row's newest committed
        position, [B, K, V], from what ``step`` commits (the draft state advances as in
        :meth:`draft`)."""
        raise NotImplementedError

    def draft_tree(
        self, state: Any, step: Committed, K: int, tree: Tree, sample_children: ChildSampler
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Fills ``tree`` (root: each row's pending token) from what ``step`` commits. Returns
        the tokens of nodes 1..N-1 [B, N-1], draft logits [B, L, V] and, for each node, the
        row of them its children were chosen from (a leaf's: any). K heads draft, whatever the
        tree's depth, so that heads that keep a cache see every step.

        Parent-free families (this default): head d's candidates are the same under every node
        of depth d - 1, so node i is head depth[i]'s rank[i]-th candidate (Medusa's trees),
        and the logits are the D heads' (L = D)."""
        logits = self.draft_logits(state, step, K)[:, : tree.max_depth]  # [B, D, V]
        candidates = sample_children(logits, max(tree.widths))  # [B, D, w]
        device = logits.device
        depth = torch.tensor(tree.depth[1:], device=device) - 1
        rank = torch.tensor(tree.rank[1:], device=device)
        # a node's children are drafts for depth[i] + 1 (leaves at depth D: any row will do)
        logits_row = [min(d, tree.max_depth - 1) for d in tree.depth]
        return candidates[:, depth, rank], logits, logits_row

    def select_draft_rows(self, state: Any, rows: torch.Tensor) -> Any:
        """The draft state of the batch rows ``rows`` ([n] long, in that order) only: rows that
        finished leave the batch. Stateless heads keep None."""
        return state

    def join_draft_rows(self, state: Any, other: Any) -> Any:
        """One draft state of ``state``'s rows followed by ``other``'s (requests prefilled apart
        join a running batch). Stateless heads keep None."""
        return state

    def max_draft_len(self) -> int | None:
        """The most tokens a step can draft (None: no limit)."""
        return None if self.drafts_past_depth else self.depth


def _take_traits(cls: type[MTPHeads], traits: Family) -> None:
    cls.traits = traits
    for name, value in vars(traits).items():
        if name != "name":
            setattr(cls, name, value)


_take_traits(MTPHeads, Family("protocol"))  # the defaults a stub that names no family gets

HEADS: dict[str, type[MTPHeads]] = {}


def register(cls: type[MTPHeads]) -> type[MTPHeads]:
    """Class decorator: make ``cls`` the family ``cls.family``."""
    HEADS[cls.family] = cls
    return cls


def head_class(family: str) -> type[MTPHeads]:
    """The class of a registered family; an unknown name is the user's error."""
    if family not in HEADS:
        known = ", ".join(HEADS)
        raise MultitokenError(f"unknown head family {family!r} (choose from {known})", "--family")
    return HEADS[family]
