"""Keeping transformers quiet while it loads and saves: our progress bar and our one-line errors
are what the user reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(*, warnings: bool = True) -> Iterator[None]:
    """No transformers progress bars: it draws one per load and save, and ours is the one the
    user watches. ``warnings=False``: no transformers log lines below an error either, where its
    advice would break our one-line messages or it repeats itself on every call. What was set
    before is restored on the way out, exception or not."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if not warnings:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if not warnings:
            hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
