"""Heads-only training throughput on a frozen trunk: tokens/s per epoch, epoch 1 vs later epochs,
with and without the feature cache and the reduced draft vocabulary (FR-Spec).

Each configuration is one ``multitoken.train`` run with ``--freeze-trunk`` on the same data, in an
output folder (and feature cache) of its own, so its first epoch runs the trunk:

    live              --feature-cache-gb 0: the frozen trunk runs every step (the baseline)
    cache             the trunk runs in epoch 1 only; later epochs read its states from disk
    cache+draft       the same, the heads unembedding over --draft-vocab tokens only
    live+draft        no cache, draft vocabulary (what the draft vocabulary alone buys)

Tokens/s of an epoch = its tokens / the sum of its steps' times as the trainer measures them
(``tokens_per_s`` of every metrics.jsonl line: data, cache, forward, backward, optimizer;
validation and checkpoints are outside). The data: ``--data``, or by default the first
standard-library modules (sorted by name) that give ``--epoch-tokens`` tokens of training rows.

    python benchmarks/heads_train_speed.py TRUNK                  # a model folder or a .gguf
    python benchmarks/heads_train_speed.py TRUNK --epochs 3 --epoch-tokens 8192 --draft-vocab 8192
    python benchmarks/heads_train_speed.py TRUNK --configs cache cache+draft --precision fp32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("live", "cache", "cache+draft", "live+draft")


def build_corpus(folder: Path, tokenizer, epoch_tokens: int, seq_len: int) -> Path:
    """Copy standard-library modules (sorted by name, skipping small ones) into ``folder`` until
    their per-file rows hold ``epoch_tokens`` tokens; plus one held-out module for validation."""
    from multitoken.training.data import stdlib_files

    folder.mkdir(parents=True)
    rows = 0
    files = [p for p in stdlib_files() if 8_000 < p.stat().st_size < 40_000]
    for path in files:
        n = len(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))) + 1
        rows += n // seq_len if n > seq_len else 0
        shutil.copy(path, folder / f"{len(list(folder.iterdir())):03d}_{path.name}")
        if rows * seq_len >= epoch_tokens:
            break
    return folder


def rows_per_epoch(corpus, tokenizer, seq_len: int) -> int:
    from multitoken.training.packing import PackedStream

    stream = PackedStream(
        corpus.train_files,
        tokenizer,
        seq_len,
        1,
        loop=False,
        per_file=True,
        **corpus.stream_kwargs("train"),
    )
    return sum(1 for _ in stream)


def run_config(args, name: str, data: list[str], steps: int, work: Path) -> dict:
    import multitoken

    options = dict(
        trunk=args.trunk,
        freeze_trunk=True,
        data=data,
        out=str(work / name.replace("+", "_")),
        family=args.family,
        depth=args.depth,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=steps,
        eval_every=steps,
        eval_batches=1,
        log_every=1,
        save_every=steps,
        val_fraction=args.val_fraction,
        precision=args.precision,
        device=args.device,
        feature_cache_gb=0 if name.startswith("live") else args.feature_cache_gb,
        feature_cache_dtype=args.feature_cache_dtype,
    )
    if name.endswith("+draft"):
        options["draft_vocab"] = args.draft_vocab
    t0 = time.perf_counter()
    result = multitoken.train(**options)
    wall = time.perf_counter() - t0
    lines = [
        json.loads(x) for x in (Path(options["out"]) / "metrics.jsonl").read_text().splitlines()
    ]
    train = [m for m in lines if m["split"] == "train"]
    return {"steps": train, "val": result.val, "cache": result.feature_cache, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trunk", help="a transformers model folder or a .gguf file")
    parser.add_argument("--data", nargs="+", help="training data (default: stdlib modules)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-tokens", type=int, default=8192, help="tokens per epoch, about")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--family", default="bpd", choices=("bpd", "meta", "deepseek"))
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS[:3]), choices=CONFIGS)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--feature-cache-gb", type=float, default=4.0)
    parser.add_argument("--feature-cache-dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument(
        "--reference",
        type=float,
        default=118.0,
        help="tokens/s to compare later epochs with (default: 118, the live figure measured on "
        "SmolLM2-135M, fp32, 2 AVX2 cores)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", help="keep the runs (and caches) in this folder")
    args = parser.parse_args(argv)

    import torch

    from multitoken.text.tokenizer import load_tokenizer
    from multitoken.training.data import Corpus

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="heads-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.trunk)
    if args.data:
        specs = args.data
    else:
        data = work / "corpus"
        if not data.exists():
            build_corpus(data, tokenizer, args.epoch_tokens, args.seq_len)
        specs = [str(data)]
    corpus = Corpus.from_specs(specs, args.val_fraction)
    rows = rows_per_epoch(corpus, tokenizer, args.seq_len)
    if rows < args.batch_size:
        parser.error(f"the data give {rows} rows per epoch, fewer than one batch")
    steps = args.epochs * rows // args.batch_size
    tokens_per_step = args.batch_size * args.seq_len
    print(
        f"trunk {args.trunk}; {len(corpus.train_files)} training files, {rows} rows of "
        f"{args.seq_len} tokens per epoch ({rows * args.seq_len:,} tokens); {args.epochs} epochs "
        f"= {steps} steps of {tokens_per_step} tokens; {args.family} D={args.depth}; "
        f"torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    results = {}
    for name in args.configs:
        results[name] = run_config(args, name, specs, steps, work)
    per_epoch: dict[str, list[float]] = {}
    for name, res in results.items():
        seconds = [0.0] * args.epochs
        counts = [0] * args.epochs
        for m in res["steps"]:
            epoch = min(args.epochs - 1, (m["step"] - 1) * args.batch_size // rows)
            seconds[epoch] += tokens_per_step / m["tokens_per_s"]
            counts[epoch] += 1
        per_epoch[name] = [c * tokens_per_step / s if s else 0.0 for c, s in zip(counts, seconds)]

    base = per_epoch.get("live", [None])[0]
    head = f"{'config':<14}" + "".join(f"{'epoch ' + str(e + 1):>11}" for e in range(args.epochs))
    head += f"{'later/live':>12}{'later/ref':>11}{'head-1 acc':>12}{'wall s':>9}"
    print(
        f"\nheads-only training, tokens/s (trunk {Path(args.trunk).name}, {args.family} "
        f"D={args.depth}, draft vocab {args.draft_vocab}, batch {args.batch_size}x{args.seq_len})"
    )
    print(head)
    for name, figures in per_epoch.items():
        later = sum(figures[1:]) / max(1, len(figures) - 1) if len(figures) > 1 else figures[0]
        ratio = f"{later / base:>11.1f}x" if base else f"{'-':>12}"
        ratio += f"{later / args.reference:>10.1f}x"
        acc = results[name]["val"]["head_acc"][0] if results[name]["val"] else float("nan")
        print(
            f"{name:<14}"
            + "".join(f"{f:>11,.0f}" for f in figures)
            + ratio
            + f"{acc:>12.3f}{results[name]['wall_s']:>9.0f}"
        )
    for name, res in results.items():
        if res["cache"]:
            print(f"  {name}: feature cache {res['cache']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "rows": rows, "per_epoch": per_epoch}, indent=2)
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
