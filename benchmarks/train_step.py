"""Training-step cost of each MTP head family against next-token-only training.

Prints a table of step time and peak memory for: the trunk alone (next-token loss only), and each
family at depth 1 and 4 (Meta with its memory-efficient head-by-head backward and naively), on a
from-scratch preset trunk, byte-level vocabulary. Every configuration runs in a fresh process so
its memory peak is its own.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``; on CPU, the process's peak resident
set (VmHWM, reset before the measured steps) minus its resident set before the model was built —
so it counts weights, gradients, optimizer state and activations, like the CUDA figure.

    python benchmarks/train_step.py                      # small preset, seq 512 (README table)
    python benchmarks/train_step.py --preset tiny --steps 3 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    ("next-token only", None, 0, True),
    ("bpd D=1", "bpd", 1, True),
    ("bpd D=4", "bpd", 4, True),
    ("meta D=1 (mem-efficient)", "meta", 1, True),
    ("meta D=1 (naive)", "meta", 1, False),
    ("meta D=4 (mem-efficient)", "meta", 4, True),
    ("meta D=4 (naive)", "meta", 4, False),
    ("deepseek D=1", "deepseek", 1, True),
    ("deepseek D=4", "deepseek", 4, True),
]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(args: argparse.Namespace, family: str | None, depth: int, efficient: bool) -> dict:
    """One configuration, in this process: median step time (s) and peak memory (MB)."""
    import torch

    from multitoken.config import HeadConfig
    from multitoken.model import MTPModel
    from multitoken.text.tokenizer import ByteTokenizer
    from multitoken.training.losses import cross_entropy, shift_labels
    from multitoken.trunk import build_trunk

    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rss_before = _rss_kb("VmRSS")
    tok = ByteTokenizer()
    trunk = build_trunk(args.preset, tok)
    model = MTPModel(trunk, HeadConfig(family=family, depth=depth)) if family else trunk
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if family is None:
                logits = model(input_ids=tokens[:, :-1]).logits
                loss = cross_entropy(logits, shift_labels(tokens, 0))[0]
            else:
                loss = model(tokens, lam=0.3, memory_efficient=efficient).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (_rss_kb("VmHWM") - rss_before) / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"step_s": statistics.median(times), "peak_mb": peak_mb, "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", help="comma-separated substrings: run only matching configurations")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = p.parse_args()

    if args.one is not None:
        label, family, depth, efficient = CONFIGS[int(args.one)]
        print(json.dumps(measure(args, family, depth, efficient)))
        return

    passthrough = [
        "--preset",
        args.preset,
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    rows = []
    wanted = [w.strip() for w in args.only.split(",")] if args.only else None
    for i, (label, *_config) in enumerate(CONFIGS):
        if wanted and i > 0 and not any(w in label for w in wanted):
            continue  # the next-token baseline (row 0) always runs: every ratio needs it
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--one", str(i)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append({"config": label, **result})
        print(f"  measured {label}: {result['step_s']:.3f} s/step", file=sys.stderr, flush=True)

    base = rows[0]
    print(
        f"\npreset {args.preset}, byte-level, seq {args.seq_len}, batch {args.batch_size}, "
        f"bf16 autocast, {args.device}, median of {args.steps} steps"
    )
    print(
        f"| {'configuration':<26} | {'params':>7} | {'step (s)':>8} | {'× next-token':>12} "
        f"| {'peak MB':>8} | {'× next-token':>12} |"
    )
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 10}|{'-' * 14}|{'-' * 10}|{'-' * 14}|")
    for r in rows:
        print(
            f"| {r['config']:<26} | {r['params'] / 1e6:6.1f}M | {r['step_s']:8.3f} | "
            f"{r['step_s'] / base['step_s']:11.2f}× | {r['peak_mb']:8.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:11.2f}× |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
