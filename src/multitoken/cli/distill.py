"""``multitoken distill``: write the trunk's own continuations of prompts as training data for
its heads (self-distillation); resumable by rerunning the same command."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitoken.cli.decoding import load_for_decoding
from multitoken.cli.flags import add_dataclass_flags, given_fields
from multitoken.config import GenerateConfig, RuntimeConfig
from multitoken.errors import MultitokenError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``distill`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "distill",
        help="write the trunk's own continuations of prompts (self-distillation data)",
        description="Decode prompts with a checkpoint (or a plain transformers model folder with "
        "its tokenizer) and append {text, prompt, completion} lines to a JSONL file to train "
        "heads on. Chat prompts ({messages: [...]}) are rendered with the model's chat template "
        "and written back as chats with the answer appended. Resumable: rerun the same command "
        "to continue.",
    )
    parser.add_argument(
        "--checkpoint",
        "--trunk",
        dest="checkpoint",
        required=True,
        metavar="PATH",
        help="a multitoken checkpoint or run folder, a plain transformers model folder, or a "
        ".gguf file",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompts",
        help='prompts file: one per line, or JSONL with a "text" string or a "messages" chat',
    )
    source.add_argument(
        "--from-corpus",
        type=int,
        default=256,
        metavar="N",
        help="N prompts from the checkpoint's training corpus (default: 256)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="SPEC",
        help="corpus for --from-corpus: files, folders, globs, .jsonl or 'stdlib' (default: the "
        "checkpoint's training data; needed for a plain model folder)",
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=64, help="tokens per corpus prompt (default: 64)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    parser.add_argument("--out", required=True, help="JSONL file to append to")
    add_dataclass_flags(parser, GenerateConfig, "decoding")
    add_dataclass_flags(parser, RuntimeConfig, "hardware")
    return parser


def _check_numbers(args: argparse.Namespace) -> Path:
    """The output file and the counts; returns the output path."""
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise MultitokenError(f"{out} must end in .jsonl", "--out")
    if args.batch_size < 1 or args.prompt_tokens < 1 or args.from_corpus < 1:
        raise MultitokenError(
            "--batch-size, --prompt-tokens and --from-corpus must be >= 1", "--batch-size"
        )
    return out


def _prompt_corpus(args: argparse.Namespace):
    """The corpus to cut prompts from: ``--data``, else the checkpoint's training data. A plain
    model folder or GGUF file has no training data to fall back on."""
    from multitoken.io.checkpoint import is_run_or_checkpoint, read_meta, resolve_checkpoint
    from multitoken.io.gguf import is_gguf
    from multitoken.training.data import Corpus

    ckpt = Path(args.checkpoint)
    plain = not is_run_or_checkpoint(ckpt)
    kind = "GGUF file" if is_gguf(ckpt) else "folder" if (ckpt / "config.json").is_file() else None
    if args.data is None and plain and kind:
        raise MultitokenError(
            f"{ckpt} is a plain model {kind} with no training corpus to take prompts from; "
            "pass --prompts FILE or --data SPEC",
            "--prompts",
        )
    train_config = {} if plain else read_meta(resolve_checkpoint(ckpt))["train_config"]
    specs = args.data if args.data is not None else train_config.get("data")
    return Corpus.from_specs(specs or None, train_config.get("val_fraction", 0.05))


def run(args: argparse.Namespace) -> int:
    """Cheap checks first: a bad prompts file should not wait for a large model to load."""
    from multitoken.text.prompts import read_prompt_records
    from multitoken.training.distill import corpus_prompts, distill

    out = _check_numbers(args)
    prompts = read_prompt_records(args.prompts) if args.prompts else None
    corpus = _prompt_corpus(args) if prompts is None else None
    model, precision = load_for_decoding(args)
    if prompts is None:
        prompts = corpus_prompts(corpus, model.tokenizer, args.from_corpus, args.prompt_tokens)
    options = GenerateConfig(**given_fields(GenerateConfig, args))
    written = distill(model, prompts, out, options, args.batch_size)
    print(f"{out}: {written} new lines ({len(prompts)} prompts in all); {precision.describe()}")
    return 0
