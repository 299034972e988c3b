"""Which labels train a frozen trunk's heads best, at equal compute: text, trunk or soft.

Trains the same heads three times over the same rows (one feature cache: the trunk runs once
per row, so every run costs the same), each learning another label (``--labels``), and prints
the held-out acceptance against the trunk's greedy path (multitoken.evaluate) of each:

    text    the text's own tokens
    trunk   the trunk's greedy path, where the text follows it (the default with --freeze-trunk)
    soft    the trunk's next-token distributions over its top 16, by soft cross-entropy

Usage: python benchmarks/labels.py MODEL DATA [OUT] [STEPS] [FAMILY]
Measured (SmolLM2-135M-Instruct, bpd D = 3, ShareGPT, 60 steps of 8 x 256 tokens, 2-core AMD
EPYC, bf16 autocast, one run each): held-out a_1 / τ (K = 3) — trunk 0.143 / 1.215, soft
0.121 / 1.161, text 0.107 / 1.145.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from multitoken.config import HEAD_LABELS, TrainConfig
from multitoken.trainer import run


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    model, data = sys.argv[1], sys.argv[2]
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("runs/labels")
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 60
    family = sys.argv[5] if len(sys.argv) > 5 else "bpd"
    rows = {}
    for labels in HEAD_LABELS:
        torch.manual_seed(0)
        options = dict(
            trunk=model, freeze_trunk=True, family=family, depth=3, draft_vocab=8192,
            labels=labels, data=[data], seq_len=256, batch_size=8, max_steps=steps, lr=1e-3,
            eval_every=max(steps // 2, 1), eval_batches=4, save_every=10**6,
            out=str(out / labels), feature_cache_dir=str(out / "feature-cache"),
        )  # fmt: skip
        rows[labels] = run(TrainConfig.from_dict(options)).val
    print(f"\n{family}, {steps} steps | held-out a_1..a_3 | τ (K = 3) | τ, 3-wide tree |")
    print("|---|---|---|---|")
    for labels, val in rows.items():
        rates = "/".join(f"{a:.3f}" for a in val["accept"])
        print(f"| {labels} | {rates} | {val['tau']:.3f} | {val['tau_top3']:.3f} |")


if __name__ == "__main__":
    main()
