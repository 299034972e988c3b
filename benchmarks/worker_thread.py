"""Plain decoding from the main thread and from a worker thread (where ``multitoken serve``'s
engine decodes), per linear kernel: why ``--linear-kernel auto`` takes torch's kernel off the
main thread (:func:`multitoken.decode.kernels.choose_linear_kernel`).

Usage: python benchmarks/worker_thread.py MODEL [TOKENS]
MODEL: a checkpoint or plain transformers folder (``runs/real/model`` after ``make real``).
Prints tokens/s for each kernel this CPU can run, from each thread, one prompt, greedy.
"""

from __future__ import annotations

import sys
import threading
import time

import multitoken
from multitoken.decode.api import generate
from multitoken.decode.kernels import onednn_available
from multitoken.hardware import cpu_kind, place_for_decoding


def tokens_per_s(model, kernel: str, new: int) -> float:
    prompt = list(range(100, 180))
    generate(model, [prompt], max_new_tokens=8, speculate=False, linear_kernel=kernel)  # warm
    start = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=new, speculate=False, linear_kernel=kernel)
    return out.stats.tokens / (time.perf_counter() - start)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    model = multitoken.load(sys.argv[1])
    place_for_decoding(model, "auto", "auto")
    kernels = ["torch"] + (["onednn"] if onednn_available() else [])
    print(f"CPU: {cpu_kind()}; plain decoding, {new} new tokens, tokens/s")
    print("| kernel | main thread | worker thread |\n|---|---|---|")
    for kernel in kernels:
        main_rate = tokens_per_s(model, kernel, new)
        print(f"| {kernel} | {main_rate:.1f} | {in_a_worker(model, kernel, new):.1f} |", flush=True)


def in_a_worker(model, kernel: str, new: int) -> float:
    got = {}
    worker = threading.Thread(target=lambda: got.update(rate=tokens_per_s(model, kernel, new)))
    worker.start()
    worker.join()
    return got["rate"]


if __name__ == "__main__":
    main()
