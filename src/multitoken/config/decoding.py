"""Options of ``multitoken generate`` and ``MTPModel.generate``: :class:`GenerateConfig` and the
``--draft-len`` parser it shares with the decoder.

Split from :mod:`multitoken.config` (which still names both) so that decoding's options sit in
one module of their own, apart from training's.
"""

from __future__ import annotations

from dataclasses import dataclass

from multitoken.config.fields import DEFAULT_TREE, LINEAR_KERNELS, _field, _whole
from multitoken.errors import MultitokenError


def draft_len_value(value: int | str | None) -> int | str | None:
    """What ``--draft-len`` / ``draft_len`` accepts: ``auto``, a whole number, or None (the
    heads' depth D). Raises ValueError otherwise."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.lstrip("-").isdigit():
            return int(text)
    raise ValueError(f"expected auto or a whole number, got {value!r}")


@dataclass
class GenerateConfig:
    """Options of ``multitoken generate`` and ``MTPModel.generate``."""

    max_new_tokens: int = _field(128, "tokens to generate per prompt")
    draft_len: int | str | None = _field(
        "auto",
        "K, drafts per step: auto (chosen before each step, 0 = a plain step, from the "
        "measured verify cost c(q), the drafting cost and the live per-head acceptance) or "
        "a fixed number (deepseek may exceed D)",
        parse=draft_len_value,
    )
    temperature: float = _field(0.0, "0 = greedy")
    top_k: int = _field(0, "sample from the k most likely tokens (0: off)")
    top_p: float = _field(1.0, "nucleus sampling mass (1: off)")
    seed: int | None = _field(
        None,
        "random seed for sampling (default: a fresh one each call, reported with the stats); it "
        "repeats a run whose drafts are fixed (--tree chain --draft-len K, a fixed tree, or "
        "--no-speculate): the automatic modes choose drafts by timing, and which tokens a seed "
        "samples depends on the drafts (their law does not)",
    )
    typical: float = _field(
        0.0,
        "LOSSY Medusa typical acceptance: accept a draft when the trunk gives it probability above "
        "min(eps, sqrt(eps)·exp(-entropy)); 0 = exact speculative sampling. Needs --temperature > 0",
    )
    speculate: bool = _field(
        True, "self-speculative decoding with the heads; --no-speculate: the trunk alone"
    )
    tree: str | None = _field(
        None,
        f"what each step verifies in one trunk pass (default: {DEFAULT_TREE}; chains with "
        "--typical): 'chain' = one chain of --draft-len drafts; '3,2,1' = a tree, the heads' "
        "top-3 for the next draft, each with top-2 children, each with one; 'chain:K' = a "
        "chain; 'dynamic:N' = each row its own N drafts with the largest product of draft "
        "probabilities (EAGLE-2); auto = such trees, each step as many drafts as pay for "
        "themselves under the measured verify cost and the acceptance seen so far; "
        "'dynamic:N+lookup[:L]', 'auto+lookup[:L]' = with prompt lookup's continuation (up to "
        "L tokens, default 8, found in the row's own text) merged into each row's tree",
    )
    linear_kernel: str = _field(
        "auto",
        "kernel of the linear layers on a CPU: onednn (faster for one token and much faster "
        "for a few, see multitoken.decode.kernels), torch (its default), auto = onednn for an fp32 "
        "model on a CPU with layers of 512x512 or more",
        choices=LINEAR_KERNELS,
    )

    def validate(self) -> None:
        """Each option on its own, in one place (generate, distill and bench call this); what
        depends on the model — K against the heads' depth, the context window — is checked
        where the model is known."""
        if not _whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise MultitokenError(f"must be >= 1, got {self.max_new_tokens!r}", "--max-new-tokens")
        try:
            value = draft_len_value(self.draft_len)
        except ValueError as exc:
            raise MultitokenError(str(exc), "--draft-len") from None
        if isinstance(value, int) and value < 1:
            raise MultitokenError(f"must be >= 1 or auto, got {value}", "--draft-len")
        if self.temperature < 0:
            raise MultitokenError(f"must be >= 0, got {self.temperature}", "--temperature")
        if not _whole(self.top_k) or self.top_k < 0:
            raise MultitokenError(f"must be a whole number >= 0, got {self.top_k!r}", "--top-k")
        if not 0 < self.top_p <= 1:
            raise MultitokenError(f"must be in (0, 1], got {self.top_p}", "--top-p")
        if not 0 <= self.typical < 1:
            raise MultitokenError(f"must be in [0, 1), got {self.typical}", "--typical")
        if self.typical > 0 and self.speculate and self.temperature == 0:
            raise MultitokenError("typical acceptance samples: give --temperature > 0", "--typical")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise MultitokenError(
                f"unknown kernel {self.linear_kernel!r} (choose from {', '.join(LINEAR_KERNELS)})",
                "--linear-kernel",
            )
        if self.tree is not None:
            from multitoken.decode.trees.spec import TreeSpec  # torch: only for a tree

            if not TreeSpec.parse(self.tree).chain and self.typical > 0:
                raise MultitokenError("typical acceptance verifies chains only", "--tree")
