"""How ``multitoken bench`` shows its results: the table on stdout and the ``--plot`` figure.

The figure shows what each head contributes and what that buys in wall-clock time. Left:
per-head acceptance a_k against k, one line per draft length K (where a_k falls to near zero, a
longer K only adds drafting and verify cost). Right: measured speedup over plain decoding against
K, beside τ, the bound τ / c(K+1), and ``--draft-len auto`` and transformers' methods as flat
lines, so a gap between τ and the speedup is visible at a glance.

Uses matplotlib's object API with the Agg canvas, never pyplot: no global backend switch, no
window, safe on a headless machine and inside a user's own session.
"""

from __future__ import annotations

from pathlib import Path

from multitoken.decode.trees.spec import TreeSpec
from multitoken.io.atomic import atomic_path

# auto and transformers' methods: one horizontal line each (no one K of ours)
_FLAT_LINES = {
    "auto": ("auto K (ours)", "tab:green"),
    "hf_greedy": ("transformers greedy", "tab:red"),
    "prompt_lookup": ("prompt lookup", "tab:purple"),
    "assisted": ("assisted", "tab:brown"),
}


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _draft_len_cell(r: dict) -> str:
    if r["method"] == "auto":
        return f"~{r['mean_draft_len']:.1f}"  # the mean of the K its steps chose
    return "-" if r["draft_len"] is None else str(r["draft_len"])


def _draft_cell(r: dict) -> str:
    """The heads' time per drafting step: ms, and in units of a one-token trunk pass."""
    if r.get("draft_cost") is None:
        return "-"
    return f"{r['draft_ms_per_step']:.2f}/{r['draft_cost']:.2f}"


def format_report(result: dict) -> str:
    """The table a person reads: the machine, one row per method, then c(q), the K auto chose
    and the validation loss."""
    header = [
        "method",
        "K",
        "tau",
        "a_1..a_K",
        "draft ms/t1",
        "tok/s",
        "x plain",
        "x hf",
        "identical",
    ]
    rows = [header]
    for r in result["runs"]:
        acc = "/".join(f"{a:.2f}" for a in r["acceptance"]) if r["acceptance"] else "-"
        rows.append(
            [
                _method_cell(r, result),
                _draft_len_cell(r),
                _num(r["tau"]),
                acc,
                _draft_cell(r),
                _num(r["tokens_per_s"], ".1f"),
                _num(r["speedup_vs_plain"]),
                _num(r["speedup_vs_hf_greedy"]),
                "yes" if r["identical"] else "NO",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [_machine(result)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    cost = result["verify_cost"]
    # chains read c(2..K+1), trees c(nodes): a long curve is shown where it is read
    shown = {r.get("nodes") for r in result["runs"]} | set(range(1, 9))
    curve = "  ".join(f"c({q})={c:.2f}" for q, c in zip(cost["q"], cost["c"]) if q in shown)
    lines.append(f"verify cost: {curve}  (t1 = {cost['t1_s'] * 1e3:.2f} ms)")
    for r in result["runs"]:
        if r["method"] == "auto":
            chosen = "  ".join(f"K={k}: {n}" for k, n in r["draft_len_counts"].items())
            whose = f" ({r['heads']})" if _several_heads(result) else ""
            lines.append(f"auto{whose} chose, per step: {chosen}")
    loss = result.get("val_loss")
    lines.append(
        "trunk validation loss: "
        + ("unavailable" if loss is None else f"{loss:.4f} (accuracy {result['val_accuracy']:.3f})")
        + "; tau is measured on the trunk's own greedy output"
    )
    share = result.get("repeated_8gram_share")
    if share is not None:
        lines.append(
            f"greedy continuations: {share:.0%} of new tokens complete an 8-gram seen earlier "
            "(loops: any drafter predicts them)"
        )
    return "\n".join(lines)


def _several_heads(result: dict) -> bool:
    return len({r["heads"] for r in result["runs"] if "heads" in r}) > 1


def _method_cell(r: dict, result: dict) -> str:
    """``speculative``, ``tree 3,2,1 (16 nodes)``, or ``speculative (meta, N=8192)`` when
    several sets of heads were measured: their family or folder, and the draft vocabulary N
    (acceptance depends on it)."""
    name = r["method"]
    if "tree" in r:
        name = f"tree {r['tree']}" + (f" ({r['nodes']} nodes)" if r["nodes"] else "")
    if "heads" not in r or not _several_heads(result):
        return name
    return f"{name} ({r['heads']}, N={r['draft_vocab']})"


def _machine(result: dict) -> str:
    """e.g. ``machine: cpu (AVX2), 2 threads, fp32 (auto: CPU AVX2 without native bf16), linear
    layers on onednn``."""
    device = result.get("device", "?")
    kind = f" ({result['cpu']})" if device.startswith("cpu") and result.get("cpu") else ""
    precision = result.get("precision") or result.get("dtype", "?")
    reason = f" ({result['precision_reason']})" if result.get("precision_reason") else ""
    kernel = f", linear layers on {result['linear_kernel']}" if result.get("linear_kernel") else ""
    threads = result.get("threads", "?")
    return f"machine: {device}{kind}, {threads} threads, {precision}{reason}{kernel}"


def plot(result: dict, path: str | Path) -> None:
    """Draw ``result`` (what ``multitoken bench --json`` writes) to a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only when a plot is asked for
    from matplotlib.figure import Figure

    trees = any(r["method"] == "tree" for r in result["runs"])
    fig = Figure(figsize=(15 if trees else 10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 3 if trees else 2)
    spec = sorted(
        (r for r in result["runs"] if r["method"] == "speculative"), key=lambda r: r["draft_len"]
    )
    _plot_acceptance(panels[0], spec, result)
    _plot_speedup(panels[1], spec, result)
    if trees:
        _plot_nodes(panels[2], result)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_acceptance(accept, spec: list[dict], result: dict) -> None:
    """Left panel: a_k against k, one line per speculative run (``spec``, sorted by K)."""
    several = _several_heads(result)
    for r in spec:
        ks = range(1, len(r["acceptance"]) + 1)
        name = f"{r['heads']} K = {r['draft_len']}" if several else f"K = {r['draft_len']}"
        accept.plot(ks, r["acceptance"], marker="o", label=name)
    accept.set(xlabel="draft position k", ylabel="acceptance a_k", ylim=(0, 1.05))
    if spec:
        accept.set_xticks(range(1, max(len(r["acceptance"]) for r in spec) + 1))
    heads = (
        "several heads" if several else f"{result.get('family', '?')}, D = {result.get('depth')}"
    )
    accept.set_title(f"per-head acceptance ({heads})")
    if spec:
        accept.legend()


def _plot_speedup(speed, spec: list[dict], result: dict) -> None:
    """Right panel: speedup and τ against K per set of heads (with the bound τ / c(K+1) for
    one), and every method without one K of ours as a flat line."""
    several = _several_heads(result)
    groups: dict[str | None, list[dict]] = {}
    for r in spec:
        groups.setdefault(r.get("heads"), []).append(r)
    for label, rows in groups.items():
        ks = [r["draft_len"] for r in rows]
        tag = f" {label}" if several else ""
        line = speed.plot(
            ks, [r["speedup_vs_plain"] for r in rows], marker="o", label=f"speculative{tag}"
        )[0]
        speed.plot(
            ks,
            [r["tau"] for r in rows],
            ls=":",
            marker=".",
            color=line.get_color(),
            label=f"τ{tag}",
        )
        if all("verify_bound" in r for r in rows) and not several:
            speed.plot(ks, [r["verify_bound"] for r in rows], ls="--", label="τ / c(K+1)")
    ks = sorted({r["draft_len"] for r in spec})
    speed.axhline(1.0, color="grey", lw=0.8, label="plain (ours)")
    for r in result["runs"]:
        if r["method"] in _FLAT_LINES and r["speedup_vs_plain"] is not None:
            label, color = _FLAT_LINES[r["method"]]
            if several and "heads" in r:
                label, color = f"{label} {r['heads']}", None
            speed.axhline(r["speedup_vs_plain"], ls="-.", lw=1, label=label, color=color)
    speed.set(xlabel="draft length K", ylabel="speedup vs plain (wall clock)")
    speed.set_title(
        f"{result.get('max_new_tokens')} new tokens × {result['prompts']['count']} prompts"
    )
    if ks:
        speed.set_xticks(ks)
    speed.legend(fontsize="small")


def _nodes_of(r: dict) -> float | None:
    """Tokens a step of this row verified: K + 1 for a chain, the tree's nodes, or the mean
    over its steps for auto rows."""
    if r["method"] == "speculative":
        return r["draft_len"] + 1
    return r.get("nodes") or r.get("mean_nodes")


# The kinds of rows the node-budget panel draws, by what a row is (its method and its --tree
# shape as the tree grammar reads it), with their marker and line style.
_MARKERS = {
    "chains": ("o", "-"),
    "auto K": ("x", "-"),
    "static trees": ("s", "-"),
    "dynamic:N": ("^", "-"),
    "dynamic:N + lookup": ("^", "--"),
    "tree auto": ("*", "-"),
    "tree auto + lookup": ("*", "--"),
}


def _row_kind(r: dict) -> str | None:
    """Which of :data:`_MARKERS` a bench row is (None: a row the panel does not draw)."""
    if r["method"] == "speculative":
        return "chains"
    if r["method"] == "auto":
        return "auto K"
    if r["method"] != "tree":
        return None
    spec = TreeSpec.parse(r["tree"])
    lookup = " + lookup" if spec.lookup else ""
    if spec.static is not None:
        return "static trees"
    if spec.per_row:
        return ("tree auto" if spec.auto else "dynamic:N") + lookup
    return None


def _plot_nodes(ax, result: dict) -> None:
    """Third panel (with tree rows): speedup over plain decoding against the tokens each step
    verifies, per set of heads: chains (K + 1), static trees, dynamic:N budgets, and the auto
    rows at their mean — where the verify cost c(q) overtakes what more nodes accept."""
    several = _several_heads(result)
    kinds = {kind: (lambda r, kind=kind: _row_kind(r) == kind) for kind in _MARKERS}
    for label in sorted({r["heads"] for r in result["runs"] if "heads" in r}):
        color = None
        for kind, match in kinds.items():
            rows = [
                (_nodes_of(r), r["speedup_vs_plain"])
                for r in result["runs"]
                if r.get("heads") == label and match(r) and r["speedup_vs_plain"] is not None
            ]
            rows = sorted((x, y) for x, y in rows if x)
            if not rows:
                continue
            name = f"{kind} {label}" if several else kind
            marker, style = _MARKERS[kind]
            line = ax.plot(*zip(*rows), marker=marker, ls=style, color=color, label=name)[0]
            color = line.get_color() if several else None
    ax.axhline(1.0, color="grey", lw=0.8, label="plain (ours)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens verified per step (nodes, root included)", ylabel="speedup vs plain")
    ax.set_title("speedup against node budget")
    ax.legend(fontsize="x-small", ncol=2 if several else 1)
