"""The ``make real`` report: one table (stdout and OUT/real.md) and one figure (OUT/real.png)
from OUT/bench_code.json and OUT/bench_chat.json, as ``benchmarks/real.py`` writes them.

    python benchmarks/summarize_real.py [OUT]        (default OUT: runs/real)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETS = (("code", "held-out stdlib code (validation split)"), ("chat", "held-out chat prompts"))
FAMILIES = ("bpd", "meta", "deepseek")
OURS = ("speculative", "auto", "tree")
CHAINS = ("speculative", "auto")


def _rows(result: dict) -> list[dict]:
    """Each run with its display name, its speed over prompt lookup and, for tree rows, over
    the best chain (fixed K or auto) of the same heads."""
    by = {r["method"]: r for r in result["runs"] if "heads" not in r}
    lookup = by.get("prompt_lookup")
    best_chain: dict[str, float] = {}
    for r in result["runs"]:
        if r["method"] in CHAINS:
            best_chain[r["heads"]] = max(best_chain.get(r["heads"], 0.0), r["tokens_per_s"])
    rows = []
    for r in result["runs"]:
        name = r["method"]
        if r["method"] in OURS:
            name = f"{r['heads']} {r['method']}"
        if r["method"] == "speculative":
            name += f" K={r['draft_len']}"
        if r["method"] == "tree":
            name += f" {r['tree']}"
        vs_lookup = r["tokens_per_s"] / lookup["tokens_per_s"] if lookup else None
        chain = best_chain.get(r.get("heads")) if r["method"] == "tree" else None
        vs_chain = r["tokens_per_s"] / chain if chain else None
        rows.append({**r, "name": name, "speedup_vs_lookup": vs_lookup, "vs_chain": vs_chain})
    return rows


def _cell(value, fmt=".2f") -> str:
    return "-" if value is None else format(value, fmt)


def table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    cost = first["verify_cost"]
    curve = ", ".join(f"c({q}) = {c:.2f}" for q, c in zip(cost["q"], cost["c"]))
    lines = [
        f"machine: {first['device']} ({first.get('cpu')}), {first['threads']} threads, "
        f"{first['precision']} ({first.get('precision_reason', '')})",
        f"verify cost: {curve} (t1 = {cost['t1_s'] * 1e3:.1f} ms)",
        "",
        "| prompts | method | τ | a_1 … a_K | mean K | nodes/step | draft ms/step | tokens/s | "
        "× transformers greedy | × prompt lookup | × own best chain | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in SETS:
        if key not in results:
            continue
        result = results[key]
        where = f"{label}, {result['prompts']['count']} × {result['max_new_tokens']}"
        for r in _rows(result):
            acc = "/".join(f"{a:.2f}" for a in r["acceptance"]) if r.get("acceptance") else "-"
            mean_k = r.get("mean_draft_len", r["draft_len"] if r["method"] in OURS else None)
            lines.append(
                f"| {where} | {r['name']} | {_cell(r['tau'])} | {acc} | {_cell(mean_k, '.1f')} | "
                f"{_cell(r.get('mean_nodes'), '.1f')} | "
                f"{_cell(r.get('draft_ms_per_step'), '.1f')} | {r['tokens_per_s']:.1f} | "
                f"{_cell(r['speedup_vs_hf_greedy'])} | {_cell(r['speedup_vs_lookup'])} | "
                f"{_cell(r['vs_chain'])} | {'yes' if r['identical'] else 'NO'} |"
            )
        share = result.get("repeated_8gram_share")
        if share is not None:
            lines.append(
                f"| {where} | (greedy tokens completing an earlier 8-gram: {share:.0%}) "
                "| | | | | | | | | | |"
            )
    return "\n".join(lines)


def figure(results: dict[str, dict], path: Path) -> None:
    """Speedup over transformers greedy, per method, one group of bars per prompt set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = []
    for key, _ in SETS:
        for r in _rows(results.get(key, {"runs": []})):
            if r["name"] not in names and r["method"] != "hf_greedy":
                names.append(r["name"])
    width = 0.8 / max(1, len(results))
    for i, (key, label) in enumerate(s for s in SETS if s[0] in results):
        speed = {r["name"]: r["speedup_vs_hf_greedy"] for r in _rows(results[key])}
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [speed.get(n) or 0 for n in names], width, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("speedup over transformers greedy")
    same = all(r["identical"] for result in results.values() for r in result["runs"])
    verdict = "every output identical to" if same else "NOT every output identical to"
    ax.set_title(f"SmolLM2-135M-Instruct, greedy, batch 1: {verdict} plain greedy")
    ax.legend()
    fig.savefig(path, dpi=110)


def summarize(out: Path) -> None:
    results = {}
    for key, _ in SETS:
        path = out / f"bench_{key}.json"
        if path.exists():
            results[key] = json.loads(path.read_text())
    if not results:
        sys.exit(f"no bench_code.json or bench_chat.json under {out}")
    text = table(results) + "\n\n" + training_table(out)
    print(text)
    (out / "real.md").write_text(text + "\n")
    figure(results, out / "real.png")
    print(f"wrote {out / 'real.md'}, {out / 'real.png'} and {out / 'tau.png'}")


def training_table(out: Path) -> str:
    """Held-out acceptance against training tokens, per family (each run's metrics.jsonl), and
    the scaling curve OUT/tau.png."""
    from multitoken.training.plot import plot_tau_curves, tau_curve

    curves = {family: tau_curve(out / family / "metrics.jsonl") for family in FAMILIES}
    curves = {family: points for family, points in curves.items() if points}
    lines = ["| family | training tokens | held-out a_1 | τ (K = 3) | τ, 3-wide tree |"]
    lines.append("|---|---|---|---|---|")
    for family, points in curves.items():
        for p in points:
            lines.append(
                f"| {family} | {p['tokens']:,} | {_cell(p['a1'], '.3f')} | {p['tau']:.3f} | "
                f"{_cell(p['tau_top3'], '.3f')} |"
            )
    plot_tau_curves(curves, out / "tau.png", title="SmolLM2-135M-Instruct, heads held-out τ")
    return "\n".join(lines)


if __name__ == "__main__":
    summarize(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/real"))
