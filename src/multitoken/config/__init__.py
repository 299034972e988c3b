"""Typed configuration: head config, training config, decoding — validated in one place.

Every default lives in a dataclass field of the config modules this one names: the choices and
field helpers in :mod:`multitoken.config.fields`, :class:`HeadConfig` in
:mod:`multitoken.config.heads`, :class:`TrainConfig` (with :class:`RuntimeConfig` and the λ
schedule) in :mod:`multitoken.config.training`, :class:`GenerateConfig` in
:mod:`multitoken.config.decoding`, :class:`ServeConfig` in :mod:`multitoken.config.serving`. The CLI builds its flags from these fields
(``multitoken.cli``), config files name the same fields (:func:`read_config_file`, here), and
``multitoken.train(**kwargs)`` takes them as keyword arguments, so there is exactly one copy of
each default. Import them from here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the standard library's TOML parser from 3.11 on; the same code as tomli before it
    import tomli as tomllib

from multitoken.config.decoding import GenerateConfig, draft_len_value
from multitoken.config.fields import (
    DEFAULT_TREE,
    FAMILIES,
    HEAD_LABELS,
    LINEAR_KERNELS,
    PRECISIONS,
    SOFT_TOP_K,
)
from multitoken.config.heads import HeadConfig
from multitoken.config.serving import API_KEY_VARIABLE, ServeConfig
from multitoken.config.training import LambdaSchedule, RuntimeConfig, TrainConfig, default_lambda
from multitoken.errors import MultitokenError
from multitoken.presets import PRESETS, PRETRAINED_LR, TrunkPreset

# The trunk presets are named here too: the options that choose among them are this module's.
__all__ = [
    "API_KEY_VARIABLE",
    "DEFAULT_TREE",
    "FAMILIES",
    "HEAD_LABELS",
    "LINEAR_KERNELS",
    "PRECISIONS",
    "PRESETS",
    "PRETRAINED_LR",
    "SOFT_TOP_K",
    "GenerateConfig",
    "HeadConfig",
    "LambdaSchedule",
    "RuntimeConfig",
    "ServeConfig",
    "TrainConfig",
    "TrunkPreset",
    "default_lambda",
    "draft_len_value",
    "read_config_file",
]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a JSON or TOML file whose keys are the flag names."""
    p = Path(path)
    if not p.is_file():
        raise MultitokenError(f"no such config file: {p}", "--config")
    try:
        values = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MultitokenError(f"cannot parse {p}: {exc}", "--config") from None
    if not isinstance(values, dict):
        raise MultitokenError(
            f"{p} holds a {type(values).__name__}, not a table of options", "--config"
        )
    return values
