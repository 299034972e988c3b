"""The default decoding (``--tree auto+lookup``) with and without its slow start, taking turns.

multitoken.decode.pace grows a tree's node budget only as drafting measurably pays (a chain's worth
first, doubling with each drafting step that paid). This prints, on held-out stdlib code prompts
(greedy, batch 1), tokens/s and τ per prompt for plain decoding, the default, and the default
with the cap lifted (as if every step had paid); each variant keeps what it learnt across its
own calls, as a session would.

    python benchmarks/slow_start.py GGUF_OR_MODEL HEADS [--prompts 8] [--new 128]
"""

from __future__ import annotations

import argparse
import time

import multitoken
from multitoken.decode import api as generate_module
from multitoken.decode.api import generate
from multitoken.decode.trees import budget
from multitoken.text.prompts import window_prompts
from multitoken.training.data import FULL_SPAN, Corpus, iter_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("heads")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    mtp = multitoken.load(args.model, heads=args.heads)
    tok = mtp.tokenizer
    corpus = Corpus.from_specs(["stdlib"], 0.05)
    texts = iter_texts(corpus.val_files, corpus.stream_kwargs("val").get("span", FULL_SPAN))
    prompts = [tok.added_specials.around(w) for w in window_prompts(texts, tok, args.prompts, 128)]
    capped = budget.TreeBudget.budget

    def uncapped(self, values):  # the slow start off: growth as if every step had paid
        self.pace.growth = 8
        return capped(self, values)

    learnt: dict[str, dict] = {}
    runs = {
        name: {"tokens": 0, "seconds": 0.0, "tau": []} for name in ("plain", "slow start", "no cap")
    }
    generate(mtp, [prompts[0]], max_new_tokens=16, speculate=False)  # warm-up
    for prompt in prompts:
        for name, run in runs.items():
            budget.TreeBudget.budget = uncapped if name == "no cap" else capped
            options = {"speculate": False} if name == "plain" else {}
            if name != "plain":  # each variant carries over what it learnt, on its own
                generate_module._LEARNT[mtp.heads] = learnt.setdefault(name, {})
            start = time.perf_counter()
            out = generate(mtp, [prompt], max_new_tokens=args.new, **options)
            run["seconds"] += time.perf_counter() - start
            run["tokens"] += out.stats.tokens
            run["tau"].append(round(out.stats.tau, 2))
    budget.TreeBudget.budget = capped
    base = runs["plain"]["tokens"] / runs["plain"]["seconds"]
    for name, run in runs.items():
        rate = run["tokens"] / run["seconds"]
        print(
            f"{name:11s} {rate:6.1f} tokens/s  {rate / base:.2f}x plain  τ per prompt {run['tau']}"
        )


if __name__ == "__main__":
    main()
