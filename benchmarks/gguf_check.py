"""Bring a GGUF file you have and check the whole path on it: it loads, plain decoding equals
transformers' greedy decoding of the same file, heads train on it (trunk frozen, a few steps on
this Python's stdlib), and speculative decoding with those heads equals plain decoding.

    python benchmarks/gguf_check.py path/to/model.gguf [--family deepseek] [--steps 20]

Prints the file's tensor types (the gguf package's count per ggml type), then one line per check.
Exits 1 when a check fails. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time

import torch


def tensor_types(path: str) -> dict[str, int]:
    import gguf

    reader = gguf.GGUFReader(path)
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def main() -> None:
    import multitoken
    from multitoken.decode.api import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("--family", default="deepseek")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--new", type=int, default=48, help="new tokens per prompt")
    args = parser.parse_args()

    print("tensor types:", tensor_types(args.gguf))
    start = time.perf_counter()
    model = multitoken.load(args.gguf)
    print(f"loaded {type(model.trunk).__name__} in {time.perf_counter() - start:.0f} s")
    prompts = ["def parse(text):\n", "The capital of France is", "import os\n\n"]
    ids = [model.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    failed = False
    plain = generate(model, ids, max_new_tokens=args.new, speculate=False, eos_id=None).tokens
    for prompt, ours in zip(ids, plain):
        with torch.no_grad():
            hf = model.trunk.generate(
                torch.tensor([prompt]), max_new_tokens=args.new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )[0, len(prompt) :].tolist()  # fmt: skip
        same = ours == hf
        failed |= not same
        print(f"plain == transformers greedy: {same}  {model.tokenizer.decode(ours)[:60]!r}")
    with tempfile.TemporaryDirectory() as out:
        result = multitoken.train(
            trunk=args.gguf, freeze_trunk=True, family=args.family, depth=2,
            max_steps=args.steps, seq_len=128, batch_size=4, eval_batches=2,
            save_every=args.steps, out=f"{out}/run",
        )  # fmt: skip
        heads = multitoken.load(args.gguf, heads=result.checkpoint)
        for options in ({}, {"tree": "chain", "draft_len": 2}, {"tree": "2,1"}):
            spec = generate(heads, ids, max_new_tokens=args.new, eos_id=None, **options)
            same = spec.tokens == plain
            failed |= not same
            name = ", ".join(f"{k}={v}" for k, v in options.items()) or "default"
            print(f"{args.family} heads, {name}: equal to plain {same}, τ {spec.stats.tau:.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
