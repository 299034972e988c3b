"""The bench report (multitoken.bench.plot) on a hand-made result: one table row per run with
'-' for what was not measured and 'NO' for output that differs, the machine line, the lines after
the table, and a figure written atomically (a failed draw leaves the old file, no temporary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitoken.bench.plot import format_report, plot


def run(method: str, draft_len: int | None, **fields) -> dict:
    """One run as multitoken.bench.run writes it; ``fields`` override the measured figures."""
    values = dict(
        method=method,
        draft_len=draft_len,
        tau=2.0,
        acceptance=[0.9, 0.5][: draft_len or 0],
        tokens_per_s=120.0,
        speedup_vs_plain=1.5,
        speedup_vs_hf_greedy=1.25,
        identical=True,
    )
    return {**values, **fields}


def result(**fields) -> dict:
    plain = run("plain", None, tau=None, speedup_vs_plain=None, speedup_vs_hf_greedy=None)
    auto = run("auto", None, mean_draft_len=1.3, draft_len_counts={"1": 3, "2": 1})
    values = dict(
        device="cpu",
        cpu="AVX2",
        threads=2,
        precision="fp32",
        precision_reason="auto: CPU AVX2 without native bf16",
        family="bpd",
        depth=2,
        max_new_tokens=8,
        prompts={"count": 2},
        runs=[plain, run("speculative", 1), run("speculative", 2, identical=False), auto],
        verify_cost={"q": [1, 2, 3], "c": [1.0, 1.1, 1.25], "t1_s": 0.002},
        val_loss=None,
    )
    return {**values, **fields}


def table(text: str) -> list[list[str]]:
    """The table rows of a report, split into cells (lines 2 .. before 'verify cost')."""
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("verify cost"))
    return [line.split() for line in lines[1:end]]


def test_each_run_is_one_row_with_dashes_for_what_was_not_measured():
    header, plain, k1, k2, auto = table(format_report(result()))
    assert header[:3] == ["method", "K", "tau"]
    assert plain == ["plain", "-", "-", "-", "-", "120.0", "-", "-", "yes"]
    assert k1 == ["speculative", "1", "2.00", "0.90", "-", "120.0", "1.50", "1.25", "yes"]
    assert k2[3] == "0.90/0.50" and k2[-1] == "NO"  # a differing output is shouted
    assert auto[:2] == ["auto", "~1.3"]  # the mean K its steps chose


def test_the_lines_around_the_table_name_machine_costs_choices_and_loss():
    lines = format_report(result(repeated_8gram_share=0.25)).splitlines()
    assert lines[0] == ("machine: cpu (AVX2), 2 threads, fp32 (auto: CPU AVX2 without native bf16)")
    assert "verify cost: c(1)=1.00  c(2)=1.10  c(3)=1.25  (t1 = 2.00 ms)" in lines
    assert "auto chose, per step: K=1: 3  K=2: 1" in lines
    assert lines[-2].startswith("trunk validation loss: unavailable;")
    assert lines[-1].startswith("greedy continuations: 25% of new tokens")


def test_a_gpu_machine_line_names_no_cpu_and_a_known_loss_is_printed():
    text = format_report(
        result(device="cuda:0", linear_kernel="torch", val_loss=1.5, val_accuracy=0.5)
    )
    assert text.splitlines()[0].startswith("machine: cuda:0, 2 threads, fp32")
    assert text.splitlines()[0].endswith(", linear layers on torch")
    assert "trunk validation loss: 1.5000 (accuracy 0.500)" in text
    assert "greedy continuations" not in text  # not measured, not printed


def test_the_figure_is_a_png_and_a_failed_draw_keeps_the_old_one(tmp_path: Path, monkeypatch):
    path = tmp_path / "bench.png"
    plot(result(), path)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot(result(), path)
    assert path.read_bytes() == png and [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_the_node_panel_places_each_row_at_the_tokens_it_verifies():
    from multitoken.bench.plot import _nodes_of

    assert _nodes_of({"method": "speculative", "draft_len": 3}) == 4
    assert _nodes_of({"method": "tree", "tree": "3,2", "nodes": 10, "mean_nodes": 10.0}) == 10
    assert _nodes_of({"method": "tree", "tree": "auto", "nodes": None, "mean_nodes": 7.5}) == 7.5
    assert _nodes_of({"method": "auto", "draft_len": None, "mean_nodes": 2.25}) == 2.25


def test_the_node_panel_names_a_row_by_what_it_is_not_by_its_spelling():
    """``auto+lookup`` was drawn as a static tree because its spec has no colon: the kind comes
    from the tree grammar, lookup included."""
    from multitoken.bench.plot import _row_kind

    def tree(spec: str) -> dict:
        return {"method": "tree", "tree": spec}

    assert _row_kind({"method": "speculative", "draft_len": 2}) == "chains"
    assert _row_kind({"method": "auto"}) == "auto K"
    assert _row_kind(tree("3,2,1")) == _row_kind(tree("chain:3")) == "static trees"
    assert _row_kind(tree("dynamic:8")) == "dynamic:N"
    assert _row_kind(tree("dynamic:8+lookup:6")) == "dynamic:N + lookup"
    assert _row_kind(tree("auto")) == "tree auto"
    assert _row_kind(tree("auto+lookup")) == "tree auto + lookup"
    assert _row_kind({"method": "plain"}) is None
