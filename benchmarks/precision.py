"""Which precision should decoding use here? Speed and verify stability, fp32 against bf16.

Self-speculative decoding is lossless only if a verify pass over q tokens picks what q one-token
passes would. In fp32 the two differ by rounding far below any logit gap; in bf16 every layer's
output is rounded to 8 mantissa bits, and the rounding depends on the kernel the batch shape
selects, so near-ties flip. For each precision this prints greedy tokens/s (transformers'
``generate``, batch 1) and how often a 4-token verify pass disagrees with the greedy choice made
one token at a time.

    python benchmarks/precision.py MODEL [--new 64] [--prompts 4]

MODEL: anything ``multitoken.load`` reads (a model folder, a checkpoint, a .gguf file).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import multitoken
from multitoken.hardware import bf16_native, cpu_kind, resolve_device

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "The three largest rivers in Europe are",
    "SELECT name, COUNT(*) FROM orders",
    "Once upon a time, in a small village,",
]


def disagreements(trunk, sequence: torch.Tensor, prompt_len: int, q: int = 4) -> tuple[int, int]:
    """(positions where a q-token pass's argmax differs from the greedy token, positions)."""
    cache = DynamicCache(config=trunk.config)
    trunk(input_ids=sequence[None, :prompt_len], cache=cache, use_cache=True)
    bad = total = 0
    for start in range(prompt_len, len(sequence), q):
        chunk = sequence[start : start + q]
        pred = trunk(input_ids=chunk[None], cache=cache, use_cache=True).logits[0].argmax(-1)
        follow = sequence[start + 1 : start + q + 1]
        bad += int((pred[: len(follow)] != follow).sum())
        total += len(follow)
    return bad, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=4, help="how many prompts")
    args = parser.parse_args()
    device = resolve_device("auto")
    model = multitoken.load(args.model)
    trunk, tok = model.trunk.eval(), model.tokenizer
    print(f"{args.model} on {device} ({cpu_kind()}); bf16 native: {bf16_native(device)}")
    print("| precision | tokens/s | verify disagreements (q = 4) |")
    print("|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        trunk.to(device=device, dtype=dtype)
        bad = total = 0
        tokens, seconds = 0, 0.0
        for text in PROMPTS[: args.prompts]:
            ids = torch.tensor([tok.encode(text, add_special_tokens=True)], device=device)
            with torch.no_grad():
                t0 = time.perf_counter()
                out = trunk.generate(
                    ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False
                )
                seconds += time.perf_counter() - t0
                tokens += out.shape[1] - ids.shape[1]
                b, t = disagreements(trunk, out[0], ids.shape[1])
            bad, total = bad + b, total + t
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {tokens / seconds:.1f} | {bad} of {total} ({bad / total:.1%}) |")


if __name__ == "__main__":
    main()
