"""How a DeepSeek module starts, measured: module 1's held-out acceptance on a real model.

Trains depth-1 heads on SmolLM2-135M-Instruct (frozen, ``--labels trunk``, draft vocabulary
8192) over the same code for each start, one feature cache shared by all, and prints module 1's
held-out a_1 and τ against the trunk's greedy path beside a BPD head's:

    identity   the default: eh_proj reads hnorm(h) only, the block's residual writes are zero
               (DeepSeekModule._start_as_identity), so a fresh module predicts what the trunk does
    copy       --init-from-trunk: the block is a copy of the trunk's last layer (the old default)
    noise      eh_proj and the block as the trunk's _init_weights leaves them
    bpd        a BPD head (residual FFN on h^0), for reference

Usage: python benchmarks/deepseek_init.py MODEL DATA [OUT] [STEPS]
MODEL: a plain transformers folder (``runs/real/model`` after ``make real``'s export);
DATA: a ``--data`` spec. Measured (2-core AMD EPYC, bf16 autocast, 100 steps of 8 x 256
tokens of stdlib code, held-out a_1): identity 0.706, copy 0.676, noise 0.672, bpd 0.673.
"""

from __future__ import annotations

import json

import torch
from smollm2 import ablation_args, train_frozen_heads

from multitoken.heads import deepseek

STARTS = ("identity", "copy", "noise", "bpd")


def train(start: str, model: str, data: str, out, steps: int) -> dict:
    if start == "noise":  # undo the identity start: eh_proj drawn as the trunk draws weights
        identity = deepseek.DeepSeekModule._start_as_identity

        def noise(self, d: int) -> None:  # as _init_weights draws it (initializer_range)
            torch.nn.init.normal_(self.eh_proj.weight, std=0.02)

        deepseek.DeepSeekModule._start_as_identity = noise
    try:
        family = "bpd" if start == "bpd" else "deepseek"
        copy = True if start == "copy" else None
        return train_frozen_heads(
            model, data, out, start, steps, family=family, depth=1, labels="trunk",
            init_from_trunk=copy,
        )  # fmt: skip
    finally:
        if start == "noise":
            deepseek.DeepSeekModule._start_as_identity = identity


def main() -> None:
    model, data, out, steps = ablation_args("runs/deepseek-init", 100, __doc__)
    rows = {}
    for start in STARTS:
        val = train(start, model, data, out, steps)
        rows[start] = {"a_1": val["accept"][0], "tau": val["tau"], "tau_top3": val["tau_top3"]}
        print(json.dumps({start: rows[start]}), flush=True)
    print("\n| start | held-out a_1 | τ (K = 1) | τ, 3-wide |\n|---|---|---|---|")
    for start, r in rows.items():
        print(f"| {start} | {r['a_1']:.3f} | {r['tau']:.3f} | {r['tau_top3']:.3f} |")


if __name__ == "__main__":
    main()
