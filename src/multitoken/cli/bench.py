"""``multitoken bench``: check every input, load the model and its heads, measure with
:func:`multitoken.bench.run.bench`, and report (a table, and ``--json`` / ``--plot`` where asked).

Every input is checked before any timing: a mistake costs a second, not minutes of measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from multitoken.cli.flags import add_dataclass_flags
from multitoken.cli.stderr import error_line
from multitoken.config import GenerateConfig, RuntimeConfig
from multitoken.errors import MultitokenError

if TYPE_CHECKING:  # torch and transformers load only once a command runs, not for --help
    from transformers import PreTrainedModel

    from multitoken.hardware import Precision
    from multitoken.model import MTPModel
    from multitoken.training.data import Corpus


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to the CLI's subcommands (built with the subparsers' own parser class)."""
    p = subparsers.add_parser(
        "bench",
        help="measure decoding speed: ours (plain, speculative) vs transformers' methods",
        description="Decode the same prompts greedily with every method, check that the outputs "
        "are identical, and report tau, per-head acceptance, tokens/s, speedups, the verify-cost "
        "curve c(q) and the trunk's validation loss.",
    )
    add = p.add_argument
    add(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint or run folder, or a plain transformers model folder (with --heads)",
    )
    add(
        "--heads",
        nargs="+",
        metavar="DIR",
        help="heads folder(s) or runs to attach to that trunk; several are measured side by side "
        "against one set of baselines",
    )
    _add_drafting_flags(add)
    add(
        "--prompts",
        metavar="FILE",
        help='one prompt per line, or .jsonl with a "text" or a "messages" chat (rendered with '
        "the chat template)",
    )
    add(
        "--data",
        nargs="+",
        metavar="SPEC",
        help="corpus whose validation split gives the prompts and the trunk's validation loss "
        "(default: the checkpoint's training data; 'stdlib' for the default corpus; use "
        "it when the heads were trained on distilled text)",
    )
    add("--num-prompts", type=int, metavar="N", help="default: 8, or all of --prompts FILE")
    add("--prompt-tokens", type=int, metavar="N", default=64, help="prompt length (default: 64)")
    add("--max-new-tokens", type=int, metavar="N", default=64, help="per prompt (default: 64)")
    add("--draft-model", metavar="DIR", help="small model (same vocabulary) for assisted")
    add("--prompt-lookup", type=int, metavar="N", default=3, help="0: off (default: 3)")
    add("--repeats", type=int, metavar="N", default=1, help="timed passes per method (default: 1)")
    add("--json", metavar="FILE", help="write every figure as JSON")
    add("--plot", metavar="FILE", help="write a PNG: acceptance and speedup against K")
    kernel = next(f for f in dataclasses.fields(GenerateConfig) if f.name == "linear_kernel")
    add(
        "--linear-kernel",
        default=kernel.default,
        choices=kernel.metadata["choices"],
        help=f"{kernel.metadata['help']} (default: {kernel.default})",
    )
    add_dataclass_flags(p, RuntimeConfig, "hardware")
    return p


def _add_drafting_flags(add) -> None:
    """What our rows draft: chains of each K, and trees."""
    add("--draft-lens", metavar="K,...", help="e.g. 1,2,4 (default: 1..D; deepseek adds D+2)")
    add(
        "--tree",
        action="append",
        default=[],
        metavar="SPEC",
        help="also verify this tree of drafts, one row per --tree (e.g. --tree 3,2,1 --tree "
        "dynamic:16 --tree auto --tree auto+lookup)",
    )


_LEAST = {"num_prompts": 1, "prompt_tokens": 1, "repeats": 1, "prompt_lookup": 0}


def _check_numbers(args: argparse.Namespace) -> None:
    # the decoding options bench shares with generate are checked where generate's are
    GenerateConfig(max_new_tokens=args.max_new_tokens, linear_kernel=args.linear_kernel).validate()
    for name, least in _LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise MultitokenError(f"must be >= {least}, got {value}", "--" + name.replace("_", "-"))


def _check_trees(specs: list[str]) -> None:
    """Each --tree parses (its depth is checked against each set of heads when rows are made)."""
    from multitoken.decode.trees.spec import TreeSpec

    for spec in specs:
        if TreeSpec.parse(spec).chain:
            raise MultitokenError("chains are the speculative and auto rows already", "--tree")


def _output_path(value: str | None, flag: str) -> Path | None:
    """Checked before minutes of measuring, not after."""
    path = None if value is None else Path(value)
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise MultitokenError(f"cannot write {path}: not a file in an existing folder", flag)
    return path


def _prompts(args: argparse.Namespace, tokenizer, corpus, corpus_error: str | None):
    """(prompts, where they came from, the flag to blame if they are too long)."""
    from multitoken.bench.run import read_prompt_file
    from multitoken.text.prompts import window_prompts
    from multitoken.training.data import FULL_SPAN, iter_texts

    if args.prompts is not None:
        prompts = read_prompt_file(args.prompts, tokenizer)[: args.num_prompts]
        return prompts, str(args.prompts), "--prompts"
    if corpus is None:
        raise MultitokenError(
            f"cannot rebuild the checkpoint's validation split ({corpus_error}); give a file",
            "--prompts",
        )
    texts = iter_texts(corpus.val_files, corpus.stream_kwargs("val").get("span", FULL_SPAN))
    windows = window_prompts(texts, tokenizer, args.num_prompts or 8, args.prompt_tokens)
    # A window is a fragment; as a prompt it starts as the tokenizer starts a text (a BOS).
    prompts = [tokenizer.added_specials.around(ids) for ids in windows]
    if not prompts:
        raise MultitokenError(
            f"no line of the validation split starts {args.prompt_tokens} tokens of text",
            "--prompt-tokens",
        )
    return prompts, "validation", "--prompt-tokens"


def _more_heads(model: MTPModel, folders: list[str]) -> dict[str, MTPModel]:
    """Further ``--heads`` on ``model``'s trunk object, labelled by folder name (made unique)."""
    from multitoken.io.checkpoint import resolve_checkpoint
    from multitoken.io.headfile import is_heads_folder, load_heads

    labels = [model.family]
    also = {}
    for folder in folders:
        path = Path(folder)
        label = path.name if path.name not in labels else f"{path.name}-{len(labels)}"
        labels.append(label)
        if not is_heads_folder(path):
            path = resolve_checkpoint(path, "--heads")
        also[label] = load_heads(model.trunk, path, "--heads").eval()
    return also


@dataclasses.dataclass
class _Inputs:
    """Everything ``bench`` measures with, each piece checked."""

    model: MTPModel
    also: dict[str, MTPModel]  # further --heads on the same trunk, by label
    precision: Precision
    draft_lens: list[int]
    checkpoint: Path  # the checkpoint folder a run folder resolves to
    train_config: dict  # the checkpoint's training options; {} for a plain model folder
    draft_model: PreTrainedModel | None  # the assistant, for assisted generation
    corpus: Corpus | None  # the validation split, where it can be rebuilt
    prompts: list[list[int]]
    source: str  # where the prompts came from


def _load_model(args: argparse.Namespace) -> tuple[MTPModel, dict[str, MTPModel], Precision]:
    """The trunk with its first ``--heads`` and the further ones, placed as asked."""
    import multitoken
    from multitoken.hardware import place_for_decoding

    runtime = RuntimeConfig.from_options(args)
    runtime.validate()
    heads = args.heads or [None]
    model = multitoken.load(args.checkpoint, heads=heads[0], flag="--checkpoint")
    if model.heads is None:
        raise MultitokenError(f"{args.checkpoint} has no heads to measure; add --heads", "--heads")
    also = _more_heads(model, heads[1:])
    precision = place_for_decoding(model, runtime.device, runtime.precision)
    for other in also.values():
        place_for_decoding(other, runtime.device, runtime.precision)
    return model, also, precision


def _training_config(args: argparse.Namespace) -> tuple[Path, dict]:
    """The checkpoint folder and the options it was trained with ({} for a plain model)."""
    from multitoken.io.checkpoint import is_run_or_checkpoint, read_meta, resolve_checkpoint

    ckpt, meta = Path(args.checkpoint), {"train_config": {}}
    if is_run_or_checkpoint(ckpt):
        ckpt = resolve_checkpoint(ckpt, "--checkpoint")
        meta = read_meta(ckpt)
    return ckpt, meta.get("train_config", {})


def _corpus(args: argparse.Namespace, config: dict) -> tuple[Corpus | None, str | None]:
    """The corpus of ``--data`` or of training, or why there is none: prompts from a file need
    none, so its absence is an error only later, if the prompts were to come from it."""
    from multitoken.training.data import Corpus

    try:
        specs = args.data if args.data is not None else config.get("data")
        return Corpus.from_specs(specs or None, config.get("val_fraction", 0.05)), None
    except MultitokenError as exc:
        return None, error_line(exc)


def _check_inputs(args: argparse.Namespace) -> _Inputs:
    """Every input, in the order a person would fix them; nothing is timed yet."""
    from multitoken.bench.run import check_fits, load_draft_model, parse_draft_lens
    from multitoken.decode.trees.spec import TreeSpec

    model, also, precision = _load_model(args)
    depth = max(m.depth for m in [model, *also.values()])
    draft_lens = parse_draft_lens(args.draft_lens, model.family, depth)
    ckpt, config = _training_config(args)
    vocab = model.trunk.get_output_embeddings().weight.shape[0]
    draft = None if args.draft_model is None else load_draft_model(args.draft_model, vocab)
    corpus, corpus_error = _corpus(args, config)
    prompts, source, flag = _prompts(args, model.tokenizer, corpus, corpus_error)
    lookups = [
        TreeSpec.parse(spec).lookup for spec in args.tree or []
    ]  # trees' lookup paths go deeper
    longest = max(draft_lens + lookups + [args.prompt_lookup, model.depth])  # auto: up to D
    check_fits(model, prompts, args.max_new_tokens, longest, flag)
    return _Inputs(model, also, precision, draft_lens, ckpt, config, draft, corpus, prompts, source)


def _describe(args: argparse.Namespace, inputs: _Inputs) -> dict:
    """The report's opening figures: what was measured, where, and the trunk's validation loss."""
    import torch

    from multitoken.hardware import cpu_kind
    from multitoken.training.evaluate import trunk_validation

    model, precision, config = inputs.model, inputs.precision, inputs.train_config
    result: dict = {"checkpoint": str(inputs.checkpoint), "family": model.family}
    result.update(depth=model.depth, device=str(model.parts.embed.weight.device))
    result.update(threads=torch.get_num_threads(), cpu=cpu_kind())
    result.update(precision=precision.name, precision_reason=precision.reason)
    result.update(val_loss=None, val_accuracy=None)
    if inputs.corpus is not None:
        seq_len, batch = config.get("seq_len", 256), config.get("batch_size", 8)
        try:
            result.update(trunk_validation(model, inputs.corpus, seq_len, batch))
        except MultitokenError as exc:  # a split too small for a batch: time all the same
            print(f"multitoken: no validation loss: {error_line(exc)}", file=sys.stderr)
    counts = list(map(len, inputs.prompts))
    result["prompts"] = {"source": inputs.source, "count": len(counts), "tokens": counts}
    result.update(max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    return result


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command: every input is checked before any timing; then measure, report."""
    from multitoken.bench.plot import format_report, plot
    from multitoken.bench.run import bench
    from multitoken.decode.kernels import choose_linear_kernel
    from multitoken.io.atomic import write_json_atomic

    _check_numbers(args)
    _check_trees(args.tree)
    json_path, plot_path = _output_path(args.json, "--json"), _output_path(args.plot, "--plot")
    inputs = _check_inputs(args)
    model = inputs.model
    kernel = choose_linear_kernel(args.linear_kernel, model)
    print(f"multitoken: {inputs.precision.describe()}", file=sys.stderr)  # every input checked
    result = _describe(args, inputs)
    measured = bench(
        model,
        inputs.prompts,
        inputs.draft_lens,
        args.max_new_tokens,
        inputs.draft_model,
        args.prompt_lookup,
        args.repeats,
        also=inputs.also,
        linear_kernel=kernel,
        trees=args.tree,
    )
    result.update(measured)
    print(format_report(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
    if plot_path is not None:
        plot(result, plot_path)
    return 0
