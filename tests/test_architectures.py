"""The architecture matrix (issue 19): every decoder-only type of tests/architectures.py, with
each head family, trains heads, drafts what training taught and decodes exactly as plain
greedy decoding (itself transformers' greedy) — or is refused up front in one line naming
the reason. docs/models.md shows the same matrix."""

from __future__ import annotations

import pytest
from architectures import FAMILIES, TYPES, check, expected_refusal


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model_type", TYPES)
def test_every_architecture_trains_and_decodes_exactly_or_is_refused(model_type, family):
    out = check(model_type, family)
    reason = expected_refusal(model_type, family)
    if reason is None:
        assert out.ok, out.error or out.refused
    else:
        assert not out.ok and out.refused is not None, out.error or "it was not refused"
        assert reason in out.refused and "\n" not in out.refused


def test_the_matrix_covers_thirty_types_that_work():
    working = [t for t in TYPES if all(expected_refusal(t, f) is None for f in FAMILIES)]
    assert len(working) >= 30 and len(set(TYPES)) == len(TYPES)
