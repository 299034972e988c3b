"""Self-distillation data: the trunk's own continuations of prompts, to train heads on.

Heads are accepted when they predict what the trunk itself will write, so labels the trunk agrees
with raise acceptance (Medusa §2.3.2). ``multitoken distill`` decodes prompts in batches (with the
checkpoint's heads when it has them — decoding is lossless, so only the speed changes) and appends
one JSON line per prompt: ``{"text": prompt + continuation, "prompt": ..., "completion": ...}``.
A chat prompt (``{"messages": [...]}``) is rendered with the tokenizer's chat template and a
generation prompt, and its line is ``{"messages": [..., {"role": "assistant", "content":
completion}], "text": <the whole chat rendered>, "prompt": <rendered prompt>, "completion": ...}``,
which :func:`multitoken.training.data.document_text` trains on directly (through ``text``).

The file is resumable: prompts already written are skipped, and each line is written whole.
Every prompt is rendered and encoded before anything is decoded or written, so bad input
fails at once and leaves the output file as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from multitoken.config import GenerateConfig
from multitoken.decode.api import generate
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel
from multitoken.text.chat import ChatTemplateError
from multitoken.text.prompts import Prompt, window_prompts
from multitoken.text.tokenizer import Tokenizer
from multitoken.training.data import FULL_SPAN, Corpus, iter_texts

log = logging.getLogger(__name__)


def corpus_prompts(
    corpus: Corpus, tokenizer: Tokenizer, count: int, prompt_tokens: int, split: str = "train"
) -> list[str]:
    """``count`` windows of ``prompt_tokens`` tokens from a split of the corpus, each starting at
    a line, spread evenly (see :func:`multitoken.text.prompts.window_prompts`). Chat records are
    rendered with the tokenizer's template, as training saw them."""
    files = corpus.train_files if split == "train" else corpus.val_files
    span = corpus.stream_kwargs(split).get("span", FULL_SPAN)
    ids = window_prompts(iter_texts(files, span, tokenizer), tokenizer, count, prompt_tokens)
    return [tokenizer.decode(x) for x in ids]


@dataclass(frozen=True)
class _Job:
    """One prompt ready to decode: its text, ids, and the chat it came from (if any)."""

    text: str
    ids: list[int]
    messages: list[dict] | None


def _prepare(prompts: Sequence[str | Prompt], tokenizer: Tokenizer) -> list[_Job]:
    """Render and encode every prompt; a chat whose template fails stops here, before decoding.

    Plain text is encoded as a whole text (with a BOS, for tokenizers that add one), a rendered
    chat as it is: the same ids training gives these texts (see :mod:`multitoken.training.packing`)."""
    jobs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            jobs.append(_Job(prompt, tokenizer.encode(prompt, add_special_tokens=True), None))
            continue
        text = prompt.render(tokenizer)
        if prompt.is_chat:
            # The written line renders the answered chat too; try it now (with an empty answer)
            # so a template that refuses it cannot stop the run halfway.
            try:
                _answered(prompt.messages, "", tokenizer)
            except ChatTemplateError as exc:
                raise MultitokenError(f"{prompt.where}: {exc.message}", "--prompts") from None
        ids = tokenizer.encode(text, add_special_tokens=not prompt.is_chat)
        jobs.append(_Job(text, ids, prompt.messages))
    return jobs


def _answered(messages: list[dict], completion: str, tokenizer: Tokenizer) -> tuple[list, str]:
    """The chat with the completion as the assistant's turn, and its rendered text."""
    chat = [*messages, {"role": "assistant", "content": completion}]
    return chat, tokenizer.apply_chat_template(chat, add_generation_prompt=False)


def _record(job: _Job, completion: str, tokenizer: Tokenizer) -> dict:
    if job.messages is None:
        return {"text": job.text + completion, "prompt": job.text, "completion": completion}
    chat, text = _answered(job.messages, completion, tokenizer)
    return {"messages": chat, "text": text, "prompt": job.text, "completion": completion}


def _batches(items: list[_Job], size: int) -> Iterator[list[_Job]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _lines_done(out: Path) -> int:
    """Complete lines already in ``out``; a line cut by a crash is dropped so it is redone."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    return data.count(b"\n")


def distill(
    model: MTPModel,
    prompts: Sequence[str | Prompt],
    out: Path,
    config: GenerateConfig,
    batch_size: int = 8,
) -> int:
    """Append the trunk's continuations of ``prompts`` to ``out`` (JSONL); returns lines written.

    ``prompts`` are texts or :class:`~multitoken.text.prompts.Prompt` records (chats are rendered
    with the tokenizer's template). Decoding stops at the model's stop tokens (its eos, and a chat
    model's end-of-turn token). Prompts whose line is already in ``out`` (a previous,
    interrupted run) are skipped. Nothing is written, and
    ``out`` is not created, until the first batch has decoded."""
    tok = model.tokenizer
    jobs = _prepare(prompts, tok)
    if config.speculate and model.heads is None:
        # Said once here rather than by every batch's decode call.
        log.warning("no MTP heads: distilling with the trunk alone")
        config = dataclasses.replace(config, speculate=False)
    stop = model.stop_ids()
    done = _lines_done(out)
    written = 0
    f: IO[str] | None = None
    try:
        with tqdm(total=len(jobs), initial=done, unit="prompt", desc="distill") as bar:
            for batch in _batches(jobs[done:], batch_size):
                result = generate(model, [job.ids for job in batch], config, eos_id=stop)
                lines = []
                for job, ids in zip(batch, result.tokens):
                    completion = tok.decode([t for t in ids if t not in stop])
                    lines.append(json.dumps(_record(job, completion, tok), ensure_ascii=False))
                if f is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    f = out.open("a", encoding="utf-8")
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                written += len(lines)
                bar.update(len(batch))
    finally:
        if f is not None:
            f.close()
    return written
