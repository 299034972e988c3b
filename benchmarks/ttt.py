"""The training-time test, measured: what unrolling a reused DeepSeek module in training buys
past D, on a real model.

Decoding drafts K > D tokens with DeepSeek heads by reusing module D on its own output state
(``--draft-len`` past D); teacher forcing never feeds a module its own state, so without the
training-time test (``--ttt-steps N``, after EAGLE-3 / HASS) the reused steps read states they
were never trained on. This trains depth-D heads on SmolLM2-135M-Instruct (frozen, ``--labels
trunk``, draft vocabulary 8192) twice over the same data and feature cache — ``--ttt-steps 0``
and ``--ttt-steps N`` — and scores both on the same held-out rows as a chain of K = D + N
drafts against the trunk's greedy path (the untrained-past-D heads unrolled exactly as decoding
reuses them, :func:`multitoken.training.evaluate.evaluate`): a_1..a_K and τ.

BPD and Meta heads need no such test: they never read a drafted token or a state a draft made
(docs/real-model.md, the table "what decoding feeds a head that teacher forcing does not").

Usage: python benchmarks/ttt.py MODEL DATA [OUT] [STEPS] [--depth D] [--ttt N]
MODEL: a plain transformers folder (``runs/real/model`` after ``make real``'s export);
DATA: a ``--data`` spec (``sharegpt``, a folder of code, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from smollm2 import train_frozen

from multitoken.hardware import choose_precision
from multitoken.text.tokenizer import load_tokenizer
from multitoken.training.data import Corpus
from multitoken.training.evaluate import evaluate
from multitoken.training.packing import validation_batches


def held_out(model, trunk: str, data: str, unroll: int) -> dict:
    """``model``'s heads scored as a chain of D + ``unroll`` drafts on the held-out rows
    training used (same corpus split, row length and count)."""
    heads = model.heads
    trained = heads.ttt_steps
    heads.ttt_steps = unroll  # decoding's reuse of module D, as training_logits unrolls it
    try:
        corpus = Corpus.from_specs([data], 0.05)
        batches = validation_batches(corpus, load_tokenizer(trunk), 256, 8, 8)
        device = next(model.parameters()).device
        autocast = choose_precision("auto", device).autocast(device)
        return evaluate(model, batches, 1.0, autocast, None, "trunk")
    finally:
        heads.ttt_steps = trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out", nargs="?", default="runs/ttt")
    parser.add_argument("steps", nargs="?", type=int, default=150)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--ttt", type=int, default=3)
    args = parser.parse_args()
    out, rows = Path(args.out), {}
    for ttt in (0, args.ttt):
        torch.manual_seed(0)
        name = f"d{args.depth}-ttt{ttt}"
        result = train_frozen(
            args.model, args.data, out, name, args.steps, family="deepseek", depth=args.depth,
            labels="trunk", ttt_steps=ttt,
        )  # fmt: skip
        val = held_out(result.model, args.model, args.data, args.ttt)
        rows[ttt] = {"accept": val["accept"], "tau": val["tau"], "tau_top3": val["tau_top3"]}
        print(json.dumps({name: rows[ttt]}), flush=True)
    K = args.depth + args.ttt
    heads = " | ".join(f"a_{k}" for k in range(1, K + 1))
    print(f"\n| --ttt-steps | {heads} | τ (K = {K}) | τ, 3-wide |")
    print("|---" * (K + 3) + "|")
    for ttt, r in rows.items():
        rates = " | ".join(f"{a:.3f}" for a in r["accept"])
        print(f"| {ttt} | {rates} | {r['tau']:.3f} | {r['tau_top3']:.3f} |")


if __name__ == "__main__":
    main()
