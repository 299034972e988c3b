"""Where a decoding step's time goes: the trunk pass, the heads' drafting, and everything else.

For each family (and plain decoding), on a from-scratch preset trunk with fresh heads, greedy,
at batch 1 and batch 8 (prompts of different lengths, so batches are ragged), for chains of
K = D fixed and for each ``--tree`` (default: ``auto+lookup``, the default decoding, and
``dynamic:16+lookup``, which verifies a tree every step whatever the heads are worth):

    trunk    time inside the trunk's forward (prefill and every verify pass)
    heads    time inside the heads' draft calls (``Stats.draft_s``; for per-row trees it
             includes choosing each row's nodes and merging prompt lookup's)
    outside  the rest of the call: acceptance, cache bookkeeping, the loop — the decoder's own
             overhead (target: under 5% of a step)
    reads    device reads per step (``multitoken.decode.phases.read_host``)

Shares are of the call's wall time; each figure is the median of ``--repeats`` calls.

    python benchmarks/decode_overhead.py                   # small preset, batch 1 and 8
    python benchmarks/decode_overhead.py --preset tiny --batches 1,4 --new 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TARGET = 0.05  # the decoder's own share of a step, at most


def build(preset: str, family: str | None, depth: int):
    from multitoken.config import HeadConfig
    from multitoken.model import MTPModel
    from multitoken.text.tokenizer import ByteTokenizer
    from multitoken.trunk import build_trunk

    torch.manual_seed(0)
    trunk = build_trunk(preset, ByteTokenizer()).eval()
    heads = None if family is None else HeadConfig(family=family, depth=depth)
    return MTPModel(trunk, heads).eval()


class TrunkClock:
    """Seconds spent inside the trunk's forward, by a pre- and a post-hook on it (CPU: the
    forward returns when its work is done)."""

    def __init__(self, trunk: torch.nn.Module) -> None:
        self.seconds, self._start = 0.0, 0.0
        self.hooks = [
            trunk.register_forward_pre_hook(self._begin),
            trunk.register_forward_hook(self._end),
        ]

    def _begin(self, *_args) -> None:
        self._start = time.perf_counter()

    def _end(self, *_args) -> None:
        self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


class ReadCount:
    """Counts the decoder's device reads (every module's ``read_host``)."""

    def __init__(self) -> None:
        import sys

        from multitoken.decode import phases

        self.count, real = 0, phases.read_host
        self.modules = [
            m
            for n, m in list(sys.modules.items())
            if n.startswith("multitoken.decode") and hasattr(m, "read_host")
        ]

        def counted(tensor):
            self.count += 1
            return real(tensor)

        self.real = real
        for module in self.modules:
            module.read_host = counted

    def close(self) -> None:
        for module in self.modules:
            module.read_host = self.real


def measure(model, prompts: list[list[int]], new: int, repeats: int, tree: str | None) -> dict:
    from multitoken.decode.api import generate

    speculate = model.heads is not None
    options = {"max_new_tokens": new, "speculate": speculate}
    if speculate:
        options |= {"tree": tree} if tree else {"tree": "chain", "draft_len": model.depth}
    generate(model, prompts, **options)  # warm-up
    shares: dict[str, list[float]] = {
        "trunk": [],
        "heads": [],
        "outside": [],
        "step_ms": [],
        "reads": [],
    }
    for _ in range(repeats):
        clock, reads = TrunkClock(model.trunk), ReadCount()
        try:
            out = generate(model, prompts, **options)
        finally:
            clock.close()
            reads.close()
        wall = out.stats.wall_s
        steps = max(1, len(out.stats.draft_lens))
        shares["trunk"].append(clock.seconds / wall)
        shares["heads"].append(out.stats.draft_s / wall)
        shares["outside"].append(1 - (clock.seconds + out.stats.draft_s) / wall)
        shares["step_ms"].append(1e3 * wall / (steps + 1))  # + the prefill
        shares["reads"].append((reads.count - 1) / steps)  # - the prefill's
    return {name: statistics.median(values) for name, values in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--tree",
        action="append",
        default=None,
        help="a --tree to measure besides chains (repeatable; default: auto+lookup and "
        "dynamic:16+lookup)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trees = args.tree or ["auto+lookup", "dynamic:16+lookup"]

    from multitoken.hardware import cpu_kind
    from multitoken.heads import HEADS

    print(f"# decode overhead: {args.preset} preset, D = {args.depth}, greedy, fresh heads")
    print(f"# CPU {cpu_kind()}, {torch.get_num_threads()} threads")
    print("| decoding | batch | ms/step | trunk | heads | outside | reads/step | outside < 5% |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for family in [None, *HEADS]:
        model = build(args.preset, family, args.depth)
        for tree in [None] if family is None else [None, *trees]:
            for batch in (int(b) for b in args.batches.split(",")):
                lengths = [24 + 8 * (i % 4) for i in range(batch)]  # ragged rows
                prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
                r = measure(model, prompts, args.new, args.repeats, tree)
                name = "plain" if family is None else f"{family} {tree or f'chain K={args.depth}'}"
                ok = "yes" if r["outside"] < TARGET else "NO"
                print(
                    f"| {name} | {batch} | {r['step_ms']:.1f} | {r['trunk']:.0%} | "
                    f"{r['heads']:.0%} | {r['outside']:.0%} | {r['reads']:.2f} | {ok} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
