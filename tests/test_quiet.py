"""quiet_transformers: no progress bars (and, asked, no log lines) inside; whatever was set
before comes back on the way out, after an error too."""

from __future__ import annotations

import pytest

from multitoken.quiet import quiet_transformers


def test_quiet_transformers_restores_what_was_set_even_after_an_error():
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        with quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.get_verbosity() == hf_logging.INFO  # warnings still shown
        with pytest.raises(RuntimeError), quiet_transformers(warnings=False):
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            raise RuntimeError
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        with quiet_transformers():
            pass
        assert not hf_logging.is_progress_bar_enabled()  # not turned on by leaving
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
