"""Summarise benchmark runs: one table (the README's) and one figure, OUT/reference.png.

python benchmarks/summarize_reference.py runs/reference               (benchmarks/reference.sh)
python benchmarks/summarize_reference.py OUT NAME="label" ...         (runs OUT/NAME/bench.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = [
    ("base", "deepseek D=3, joint training on stdlib text"),
    ("bpd", "bpd D=4, heads only, self-distilled"),
    ("meta", "meta D=4, heads only, self-distilled"),
    ("deepseek", "deepseek D=4, heads only, self-distilled"),
]


def main(out: Path, runs: list[tuple[str, str]] = RUNS) -> None:
    rows = []
    for name, label in runs:
        path = out / name / "bench.json"
        if path.exists():
            rows.append((name, label, json.loads(path.read_text())))
    if not rows:
        sys.exit(f"no bench.json under {out}")
    first = rows[0][2]
    print(
        f"trunk validation loss {first['val_loss']:.3f} nats/byte (accuracy "
        f"{first['val_accuracy']:.3f}); {first['prompts']['count']} validation prompts × "
        f"{first['max_new_tokens']} new tokens, greedy, batch 1"
    )
    print(
        "| heads | K | τ | a_1 … a_K | tokens/s | × plain | × transformers greedy | "
        "× prompt lookup | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for _name, label, result in rows:
        runs = result["runs"]
        by = {r["method"]: r for r in runs}
        lookup = by.get("prompt_lookup")
        for run in (r for r in runs if r["method"] == "speculative"):
            acc = "/".join(f"{a:.2f}" for a in run["acceptance"])
            vs_lookup = run["tokens_per_s"] / lookup["tokens_per_s"] if lookup else float("nan")
            print(
                f"| {label} | {run['draft_len']} | {run['tau']:.2f} | {acc} | "
                f"{run['tokens_per_s']:.0f} | {run['speedup_vs_plain']:.2f} | "
                f"{run['speedup_vs_hf_greedy']:.2f} | {vs_lookup:.2f} | "
                f"{'yes' if run['identical'] else 'NO'} |"
            )
    plain = rows[0][2]["runs"]
    base = {r["method"]: r for r in plain}
    print(
        f"| ours, plain decoding | - | 1.00 | - | {base['plain']['tokens_per_s']:.0f} | 1.00 | "
        f"{base['plain']['speedup_vs_hf_greedy']:.2f} | - | yes |"
    )
    for method in ("hf_greedy", "prompt_lookup"):
        if method in base:
            r = base[method]
            print(
                f"| transformers {method.replace('hf_', '')} | {r['draft_len'] or '-'} | "
                f"{r['tau']:.2f} | - | {r['tokens_per_s']:.0f} | {r['speedup_vs_plain']:.2f} | "
                f"{r['speedup_vs_hf_greedy']:.2f} | - | {'yes' if r['identical'] else 'NO'} |"
            )
    _plot(rows, out / "reference.png")
    print(f"figure: {out / 'reference.png'}")


def _plot(rows, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for name, _label, result in rows:
        spec = [r for r in result["runs"] if r["method"] == "speculative"]
        longest = max(spec, key=lambda r: r["draft_len"])
        ks = range(1, len(longest["acceptance"]) + 1)
        left.plot(ks, longest["acceptance"], marker="o", label=f"{name} (K={longest['draft_len']})")
        right.plot(
            [r["draft_len"] for r in spec],
            [r["speedup_vs_hf_greedy"] for r in spec],
            marker="o",
            label=name,
        )
    lookup = [r for r in rows[0][2]["runs"] if r["method"] == "prompt_lookup"]
    if lookup:
        right.axhline(
            lookup[0]["speedup_vs_hf_greedy"], ls="-.", color="grey", label="prompt lookup"
        )
    right.axhline(1.0, color="black", lw=0.8)
    ks = sorted({r["draft_len"] for _n, _l, res in rows for r in res["runs"] if r["draft_len"]})
    left.set_xticks(ks)
    right.set_xticks(ks)
    left.set(title="per-head acceptance a_k", xlabel="draft position k", ylim=(0, 1.02))
    right.set(title="wall-clock speedup vs transformers greedy", xlabel="draft length K")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    named = [tuple(arg.split("=", 1)) for arg in sys.argv[2:]]
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reference"), named or RUNS)
