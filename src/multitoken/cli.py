"""``multitoken`` command line. Flags are generated from the config dataclasses, so the CLI and the
Python API share one copy of every default; a ``--config`` file (JSON or TOML, keys = flag names)
sits between the defaults and the flags given on the command line.

Bad input prints one line, ``multitoken: error: --flag: what is wrong``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from multitoken.config import (
    GenerateConfig,
    HeadConfig,
    RuntimeConfig,
    TrainConfig,
    read_config_file,
)
from multitoken.errors import MultitokenError

EXIT_USAGE = 2


def error_line(exc: MultitokenError) -> str:
    """``--flag: what is wrong``: the error as the command line says it. The message itself
    speaks of the input; only here is it tied to the option to change."""
    return f"{exc.flag}: {exc.message}" if exc.flag else exc.message


def _base_type(annotation) -> type:
    """``int | None`` -> int, ``list[str]`` -> list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return origin or annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field; the default shown is the dataclass's (the parser's is SUPPRESS, so
    only flags the user typed override the config file)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "heads":
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta.get("help", "")
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs.update(nargs="+", action="extend", metavar="PATH")
        else:
            kwargs["type"] = meta.get("parse", kind)  # e.g. --draft-len: auto or a number
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        group.add_argument(flag, **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2, like every other error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="multitoken",
        description="Multi-token prediction: train MTP heads (bpd, meta, deepseek) on a causal LM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train a trunk with MTP heads",
        description="Train a causal LM with multi-token-prediction heads. Example: multitoken "
        "train --preset tiny --family deepseek --depth 2 --max-steps 300 --out runs/x",
    )
    train.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or TOML file of options (keys are flag names); flags win",
    )
    add_dataclass_flags(train, HeadConfig, "heads")
    add_dataclass_flags(train, TrainConfig, "training")

    gen = sub.add_parser(
        "generate",
        help="decode with a trained checkpoint (self-speculative by default)",
        description="Generate text. The prompt comes from --prompt, --prompt-file or stdin.",
    )
    gen.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run folder, or a plain transformers model folder or .gguf file "
        "(with --heads)",
    )
    gen.add_argument("--heads", metavar="DIR", help="heads folder to attach to that trunk")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="file whose whole text is the prompt")
    gen.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    add_dataclass_flags(gen, GenerateConfig, "decoding")
    add_dataclass_flags(gen, RuntimeConfig, "hardware")

    dist = sub.add_parser(
        "distill",
        help="write the trunk's own continuations of prompts (self-distillation data)",
        description="Decode prompts with a checkpoint (or a plain transformers model folder with "
        "its tokenizer) and append {text, prompt, completion} lines to a JSONL file to train "
        "heads on. Chat prompts ({messages: [...]}) are rendered with the model's chat template "
        "and written back as chats with the answer appended. Resumable: rerun the same command "
        "to continue.",
    )
    dist.add_argument(
        "--checkpoint",
        "--trunk",
        dest="checkpoint",
        required=True,
        metavar="PATH",
        help="a multitoken checkpoint or run folder, a plain transformers model folder, or a "
        ".gguf file",
    )
    src = dist.add_mutually_exclusive_group()
    src.add_argument(
        "--prompts",
        help='prompts file: one per line, or JSONL with a "text" string or a "messages" chat',
    )
    src.add_argument(
        "--from-corpus",
        type=int,
        default=256,
        metavar="N",
        help="N prompts from the checkpoint's training corpus (default: 256)",
    )
    dist.add_argument(
        "--data",
        nargs="+",
        metavar="SPEC",
        help="corpus for --from-corpus: files, folders, globs, .jsonl or 'stdlib' (default: the "
        "checkpoint's training data; needed for a plain model folder)",
    )
    dist.add_argument(
        "--prompt-tokens", type=int, default=64, help="tokens per corpus prompt (default: 64)"
    )
    dist.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    dist.add_argument("--out", required=True, help="JSONL file to append to")
    add_dataclass_flags(dist, GenerateConfig, "decoding")
    add_dataclass_flags(dist, RuntimeConfig, "hardware")

    from multitoken import bench

    add_dataclass_flags(bench.add_parser(sub), RuntimeConfig, "hardware")

    exp = sub.add_parser(
        "export",
        help="write the trunk alone, the heads alone, or the DeepSeek-V3 layout",
        description="Export a checkpoint to a new folder. --trunk-only: a plain transformers "
        "model folder with its tokenizer (loads without multitoken); --heads-only: the portable "
        "heads (heads.safetensors + heads.json) to ship beside the trunk; --deepseek-v3: trunk + "
        "deepseek MTP modules as model.layers.{L+k}.* with num_nextn_predict_layers.",
    )
    exp.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run folder (or a model folder or .gguf file)",
    )
    exp.add_argument("--heads", metavar="DIR", help="heads folder to attach first")
    exp.add_argument("--out", required=True, help="new folder to write")
    what = exp.add_mutually_exclusive_group(required=True)
    what.add_argument("--trunk-only", dest="format", action="store_const", const="trunk-only")
    what.add_argument("--heads-only", dest="format", action="store_const", const="heads")
    what.add_argument("--deepseek-v3", dest="format", action="store_const", const="deepseek-v3")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    fit = tok_sub.add_parser("train", help="fit a byte-level BPE tokenizer on a corpus")
    fit.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="text files, folders, globs or .jsonl (default: Python stdlib source)",
    )
    fit.add_argument("--vocab-size", type=int, default=8192, help="(default: 8192)")
    fit.add_argument("--out", required=True, help="tokenizer.json to write")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from multitoken.trainer import run

    values = read_config_file(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    values.update(given)
    result = run(TrainConfig.from_dict(values))
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise MultitokenError("give --prompt or --prompt-file, not both", "--prompt")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise MultitokenError(f"no such file: {path}", "--prompt-file")
        return path.read_text(encoding="utf-8", errors="replace")
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise MultitokenError("no prompt: pass --prompt, --prompt-file or pipe text in", "--prompt")
    return sys.stdin.read()


class _TextStream:
    """Prints text as tokens are accepted. A byte-level token can end inside a UTF-8 character:
    the undecodable tail is held back until the next tokens complete it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, _row: int, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids)
        safe = len(text.rstrip("\ufffd"))
        sys.stdout.write(text[self.shown : safe])
        sys.stdout.flush()
        self.shown = max(self.shown, safe)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        sys.stdout.write(text[self.shown :] + "\n")


def _load_for_decoding(args: argparse.Namespace, heads: str | None = None):
    """``--checkpoint`` loaded and placed on ``--device`` in ``--precision``; the choice is
    reported once the command's input has all been checked (bad input stays one line)."""
    import multitoken
    from multitoken.hardware import place_for_decoding

    runtime = RuntimeConfig.from_options(args)
    runtime.validate()  # before minutes of loading a large model
    model = multitoken.load(args.checkpoint, heads=heads, flag="--checkpoint")
    precision = place_for_decoding(model, runtime.device, runtime.precision)
    return model, precision


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    prompt = _read_prompt(args)
    if not prompt:
        raise MultitokenError("the prompt is empty", "--prompt")
    model, precision = _load_for_decoding(args, heads=args.heads)
    options = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GenerateConfig)
        if hasattr(args, f.name)
    }
    stream = None
    if not args.json:
        stream = _TextStream(model.tokenizer)
        sys.stdout.write(prompt)
    (text,), stats = model.generate(prompt, on_tokens=stream, **options)
    if args.json:
        stats["precision"] = precision.name
        print(json.dumps({"prompt": prompt, "text": text, "stats": stats}))
    else:
        stream.finish()
        print(
            f"[{stats['tokens']} tokens, {stats['trunk_passes']} trunk passes, "
            f"tau {stats['tau']:.2f}, {stats['tokens_per_s']:.1f} tokens/s; "
            f"{precision.describe()}]",
            file=sys.stderr,
        )
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from multitoken.checkpoint import is_run_or_checkpoint, read_meta, resolve_checkpoint
    from multitoken.data import Corpus
    from multitoken.distill import corpus_prompts, distill
    from multitoken.gguf import is_gguf
    from multitoken.prompts import read_prompt_records

    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise MultitokenError(f"{out} must end in .jsonl", "--out")
    if args.batch_size < 1 or args.prompt_tokens < 1 or args.from_corpus < 1:
        raise MultitokenError(
            "--batch-size, --prompt-tokens and --from-corpus must be >= 1", "--batch-size"
        )
    # Cheap checks first: a bad prompts file should not wait for a large model to load.
    prompts = read_prompt_records(args.prompts) if args.prompts else None
    ckpt = Path(args.checkpoint)
    plain = not is_run_or_checkpoint(ckpt)
    kind = "GGUF file" if is_gguf(ckpt) else "folder" if (ckpt / "config.json").is_file() else None
    if prompts is None and args.data is None and plain and kind:
        raise MultitokenError(
            f"{ckpt} is a plain model {kind} with no training corpus to take prompts from; "
            "pass --prompts FILE or --data SPEC",
            "--prompts",
        )
    corpus = None
    if prompts is None:
        train_config = {} if plain else read_meta(resolve_checkpoint(ckpt))["train_config"]
        specs = args.data if args.data is not None else train_config.get("data")
        corpus = Corpus.from_specs(specs or None, train_config.get("val_fraction", 0.05))
    model, precision = _load_for_decoding(args)
    if prompts is None:
        prompts = corpus_prompts(corpus, model.tokenizer, args.from_corpus, args.prompt_tokens)
    options = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GenerateConfig)
        if hasattr(args, f.name)
    }
    written = distill(model, prompts, out, GenerateConfig(**options), args.batch_size)
    print(f"{out}: {written} new lines ({len(prompts)} prompts in all); {precision.describe()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import multitoken

    out = multitoken.export(args.checkpoint, args.out, args.format, heads=args.heads)
    print(f"wrote {out}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from multitoken.data import Corpus, iter_texts
    from multitoken.tokenizer import train_bpe

    corpus = Corpus.from_specs(args.data or None)
    out = Path(args.out)
    if out.is_dir():
        raise MultitokenError(
            f"{out} is a folder; give a file name such as tokenizer.json", "--out"
        )
    files = sorted(set(corpus.train_files) | set(corpus.val_files))  # one file may serve both
    tok = train_bpe(iter_texts(files), args.vocab_size, out)
    print(f"wrote {out} ({tok.vocab_size} tokens)")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("multitoken: warning: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_warnings_to_stderr() -> None:
    """Warnings as one ``multitoken: warning:`` line each; installed once per process."""
    log = logging.getLogger("multitoken")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.WARNING)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_warnings_to_stderr()
    from multitoken.trainer import NonFiniteLoss

    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "distill":
            return _cmd_distill(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "bench":
            from multitoken import bench

            return bench.run(args)
        return _cmd_tokenizer(args)
    except MultitokenError as exc:
        print(f"multitoken: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as exc:
        print(f"multitoken: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("multitoken: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
