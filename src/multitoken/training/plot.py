"""The scaling curve of a training run: τ against the training tokens seen, per family.

Acceptance is what training is for, so every evaluation of a run with heads redraws
``OUT/tau.png`` from ``OUT/metrics.jsonl``: the expected accepted length τ of a chain of K = D
(solid) and of a tree 3 wide (dashed) against the tokens seen, and a_1, the first draft's
acceptance (right panel). ``benchmarks/summarize_real.py`` draws several runs (one per family)
on one figure with :func:`plot_tau_curves`.

Uses matplotlib's object API with the Agg canvas, never pyplot (as :mod:`multitoken.bench.plot`).
"""

from __future__ import annotations

import json
from pathlib import Path

from multitoken.io.atomic import atomic_path


def tau_curve(metrics: Path) -> list[dict]:
    """The validation records of a run's ``metrics.jsonl`` that carry τ, in step order:
    ``{"tokens", "tau", "tau_top3", "a1"}`` each."""
    points = []
    if not metrics.is_file():
        return points
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("split") != "val" or "tau" not in record or "tokens" not in record:
            continue
        points.append(
            {
                "tokens": record["tokens"],
                "tau": record["tau"],
                "tau_top3": record.get("tau_top3"),
                "a1": record["accept"][0] if record.get("accept") else None,
            }
        )
    return sorted(points, key=lambda p: p["tokens"])


def plot_tau_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """One line per run of ``curves`` (label -> :func:`tau_curve` points), written to ``path``
    atomically. Runs with fewer than one point are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only when a plot is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for i, (label, points) in enumerate(curves.items()):
        if not points:
            continue
        color = f"C{i}"
        x = [p["tokens"] for p in points]
        left.plot(x, [p["tau"] for p in points], "o-", color=color, label=f"{label} chain")
        if all(p["tau_top3"] is not None for p in points):
            top3 = [p["tau_top3"] for p in points]
            left.plot(x, top3, "s--", color=color, alpha=0.6, label=f"{label} 3-wide tree")
        if all(p["a1"] is not None for p in points):
            right.plot(x, [p["a1"] for p in points], "o-", color=color, label=label)
    for ax, ylabel in ((left, "τ (tokens per trunk pass, held out)"), (right, "a_1")):
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
