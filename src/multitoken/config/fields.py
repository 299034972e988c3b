"""What every config dataclass shares: the choices options take, and the field helpers.

The lowest of the config modules: :mod:`multitoken.config.heads`,
:mod:`multitoken.config.training` and :mod:`multitoken.config.decoding` build their fields from it,
and :mod:`multitoken.config` names them all, so nothing here may import any of those (no circle).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from multitoken.families import FAMILIES as TRAITS

FAMILIES = tuple(TRAITS)  # the head families, by name
PRECISIONS = ("auto", "bf16", "fp32")
LINEAR_KERNELS = ("auto", "onednn", "torch")  # multitoken.decode.kernels
HEAD_LABELS = ("text", "trunk", "soft")  # multitoken.training.losses
# --soft-top-k: the trunk's likeliest tokens per position kept as a soft target
# (multitoken.training.losses.trunk_top_k); 16 keep 96 bytes a position in the feature cache
SOFT_TOP_K = 16
# what decoding verifies when --tree is not given (multitoken.decode.trees.shape; --typical verifies chains)
DEFAULT_TREE = "auto+lookup"


def _opt(help: str, flag: str | None = None, **extra: Any) -> dict[str, Any]:
    """Field metadata read by the CLI builder (``multitoken.cli.flags``)."""
    return {"help": help, "flag": flag, **extra}


def _field(default: Any, help: str, flag: str | None = None, **extra: Any) -> Any:
    """A dataclass field that is also a CLI flag: its default, and the metadata of :func:`_opt`."""
    return field(default=default, metadata=_opt(help, flag, **extra))


def _whole(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, not a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
