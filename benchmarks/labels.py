"""Which labels train a frozen trunk's heads best, at equal compute: text, trunk or soft.

Trains the same heads three times over the same rows (one feature cache: the trunk runs once
per row, so every run costs the same), each learning another label (``--labels``), and prints
the held-out acceptance against the trunk's greedy path (multitoken.training.evaluate) of each:

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

from smollm2 import ablation_args, train_frozen_heads

from multitoken.config import HEAD_LABELS


def main() -> None:
    model, data, out, steps = ablation_args("runs/labels", 60, __doc__)
    family = sys.argv[5] if len(sys.argv) > 5 else "bpd"
    rows = {
        labels: train_frozen_heads(
            model, data, out, labels, steps, family=family, depth=3, labels=labels, eval_batches=4
        )
        for labels in HEAD_LABELS
    }
    print(f"\n{family}, {steps} steps | held-out a_1..a_3 | τ (K = 3) | τ, 3-wide tree |")
    print("|---|---|---|---|")
    for labels, val in rows.items():
        rates = "/".join(f"{a:.3f}" for a in val["accept"])
        print(f"| {labels} | {rates} | {val['tau']:.3f} | {val['tau_top3']:.3f} |")


if __name__ == "__main__":
    main()
