"""``multitoken generate``: decode one prompt with a trained checkpoint, streaming the text as
tokens are accepted (or printing it with its statistics as JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multitoken.cli.decoding import add_model_flags, load_for_decoding
from multitoken.cli.flags import add_dataclass_flags, given_fields
from multitoken.config import GenerateConfig, RuntimeConfig
from multitoken.errors import MultitokenError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``generate`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "generate",
        help="decode with a trained checkpoint (self-speculative by default)",
        description="Generate text. The prompt comes from --prompt, --prompt-file or stdin.",
    )
    add_model_flags(parser)
    parser.add_argument("--prompt", help="prompt text")
    parser.add_argument("--prompt-file", help="file whose whole text is the prompt")
    parser.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    add_dataclass_flags(parser, GenerateConfig, "decoding")
    add_dataclass_flags(parser, RuntimeConfig, "hardware")
    return parser


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from ``--prompt``, ``--prompt-file`` or piped stdin (never a waiting terminal)."""
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


class TextStream:
    """Prints the prompt, then text as tokens are accepted. A byte-level token can end inside a
    UTF-8 character: the undecodable tail is held back until the next tokens complete it. The
    prompt waits for the first tokens, so an option refused before decoding prints nothing."""

    def __init__(self, tokenizer, prompt: str = "") -> None:
        self.tokenizer, self.ids, self.shown, self.prompt = tokenizer, [], 0, prompt

    def __call__(self, _row: int, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids)
        safe = len(text.rstrip("\ufffd"))
        sys.stdout.write(self._take_prompt() + text[self.shown : safe])
        sys.stdout.flush()
        self.shown = max(self.shown, safe)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        sys.stdout.write(self._take_prompt() + text[self.shown :] + "\n")

    def _take_prompt(self) -> str:
        prompt, self.prompt = self.prompt, ""
        return prompt


def run(args: argparse.Namespace) -> int:
    """Decode the prompt; the statistics go to stderr, or into the JSON with the text."""
    prompt = read_prompt(args)
    if not prompt:
        raise MultitokenError("the prompt is empty", "--prompt")
    model, precision = load_for_decoding(args, heads=args.heads)
    options = given_fields(GenerateConfig, args)
    stream = None
    if not args.json:
        stream = TextStream(model.tokenizer, prompt)
    (text,), stats = model.generate(prompt, on_tokens=stream, **options)
    if args.json:
        stats["precision"] = precision.name
        print(json.dumps({"prompt": prompt, "text": text, "stats": stats}))
    else:
        stream.finish()
        print(
            f"[{stats['tokens']} tokens, {stats['trunk_passes']} trunk passes, "
            f"tau {stats['tau']:.2f}, {stats['tokens_per_s']:.1f} tokens/s; "
            + ("" if stats["seed"] is None else f"seed {stats['seed']}; ")
            + f"{precision.describe()}]",
            file=sys.stderr,
        )
    return 0
