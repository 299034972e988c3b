"""Tokenizers behind one small interface: raw UTF-8 bytes, or any Hugging Face ``tokenizer.json``.

Training code only needs ids in, ids out, a vocabulary size, three special ids and, for chat
data, a way to render messages as text, so both kinds implement the same :class:`Tokenizer`
protocol. A checkpoint stores the tokenizer with :meth:`Tokenizer.save` (files plus a small
JSON-able spec) and gets it back with :func:`tokenizer_from_saved`, so a trained model never
depends on where its tokenizer came from. :mod:`multitoken.io.tokenizer_files` goes the other
way: it writes any of them as files plain ``transformers.AutoTokenizer`` loads.

The byte tokenizer is the default because it needs no files, no training and no network, and
it can represent any text exactly.

Chat templates travel with an ``HFTokenizer`` (read from the folder, kept in checkpoints) and are
rendered by :mod:`multitoken.text.chat`.

Special tokens: a text that starts something (a prompt, a training document) is encoded as the
model's own tokenizer encodes it, with what that tokenizer puts around a whole text (a BOS for
Llama-style tokenizers; nothing for GPT-2's or Qwen2's): ``encode(text, add_special_tokens=True)``,
as ``transformers``' ``tokenizer(text)``. A fragment (a continuation, a window of a corpus) and a
rendered chat, whose template already spells its BOS, get nothing added, as
``apply_chat_template(tokenize=True)``. What is added is :attr:`Tokenizer.added_specials`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from multitoken.errors import MultitokenError
from multitoken.io.atomic import atomic_path
from multitoken.io.gguf import gguf_tokenizer_parts
from multitoken.quiet import quiet_transformers
from multitoken.text.chat import ChatTemplateError, render_chat_template

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 saves the template
MIN_BPE_VOCAB = 300  # 256 byte symbols + specials + a few merges; below this BPE is pointless.

# Special-token spellings used by common model families, most specific first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>", "[CLS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")


@dataclass(frozen=True)
class AddedSpecials:
    """Token ids a tokenizer puts around a text it encodes whole (``add_special_tokens=True``).

    ``prefix`` is a BOS for Llama-style tokenizers; ``suffix`` an EOS for the few that append
    one. Both are empty for GPT-2's and Qwen2's tokenizers and for the byte tokenizer."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def around(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as a whole text: the prefix, ``ids``, the suffix."""
        return [*self.prefix, *ids, *self.suffix]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the package needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    added_specials: AddedSpecials

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``add_special_tokens=True`` encodes a whole text as the model expects its input to start
        (a prompt, a training document): with :attr:`added_specials` around it, exactly as
        transformers' ``tokenizer(text)``. The default encodes a fragment, or a rendered chat,
        which spells its special tokens itself: nothing is added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens; invalid UTF-8 becomes U+FFFD."""
        ...

    def save(self, directory: Path) -> dict:
        """Write the files this tokenizer needs into ``directory``; return a JSON-able spec."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None if this tokenizer has none."""
        ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """``messages`` (``{"role", "content"}`` dicts) as text in the model's chat format."""
        ...


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 text; 256, 257, 258 are ``<bos>``, ``<eos>``, ``<pad>``.

    A whole text gets no special tokens either: trunks trained from scratch on bytes have always
    seen documents separated by eos alone, and the byte tokenizer's export (which transformers
    loads) has no post-processor, so both encode a prompt the same way."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    added_specials = AddedSpecials()

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids (nothing is added, see the class docstring)."""
        ids = list(text.encode("utf-8"))
        return self.added_specials.around(ids) if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special (and out-of-range) ids are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict:
        """Nothing to write: the spec alone rebuilds a byte tokenizer."""
        return {"type": "bytes"}

    @property
    def chat_template(self) -> None:
        """Raw bytes come with no chat format."""
        return None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Always refused: there is no template to render with."""
        raise ChatTemplateError(_no_template_reason("the byte tokenizer"))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its bos/eos/pad ids resolved.

    Special tokens are passed by spelling (``eos`` etc.) when known, e.g. from a saved spec or a
    ``tokenizer_config.json``; otherwise they are guessed from common names. Only eos is
    mandatory, because the packer separates documents with it; bos and pad fall back to eos.

    ``chat_template`` is the model's Jinja chat template, if it has one. ``split_special_tokens``
    makes special-token spellings in the text encode as ordinary text (transformers' option of
    the same name): the byte tokenizer's export needs it so ``"<eos>"`` typed in text stays bytes.

    What a whole text gets around it (:attr:`added_specials`) is what the ``tokenizer.json``
    post-processor adds, as transformers 5 does: with a ``tokenizer.json`` present it ignores
    ``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json`` and trusts the file.
    ``added_specials`` (spellings, as a saved spec holds them: ``{"prefix": [...], "suffix":
    [...]}``) overrides that: the post-processor is then replaced by one that adds those, so
    saving and exporting keep the rule.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        source: str = "tokenizer",
        chat_template: str | None = None,
        split_special_tokens: bool = False,
        added_specials: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._tok = tokenizer
        self.source = source
        self._chat_template = chat_template or None
        self.split_special_tokens = bool(split_special_tokens)
        tokenizer.encode_special_tokens = self.split_special_tokens
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos_id = self._find(eos, EOS_NAMES)
        if eos_id is None:
            raise MultitokenError(
                f"{source} has no end-of-text token (looked for {', '.join(EOS_NAMES)})",
                flag="--tokenizer",
            )
        self.eos_id = eos_id
        bos_id = self._find(bos, BOS_NAMES)
        self.bos_id = eos_id if bos_id is None else bos_id
        pad_id = self._find(pad, PAD_NAMES)
        self.pad_id = eos_id if pad_id is None else pad_id
        # Specials the tokenizer really has, as opposed to bos/pad standing in for eos: only
        # these are template variables, as in transformers, where an unset bos_token renders "".
        self._own = {
            key: self._tok.id_to_token(token_id)
            for key, token_id in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id))
            if token_id is not None
        }
        if added_specials is not None:
            self._set_added_specials(added_specials)
        self.added_specials = self._probe_added_specials()

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        chat_template: str | None = None,
        split_special_tokens: bool = False,
        added_specials: Mapping[str, Sequence[str]] | None = None,
    ) -> HFTokenizer:
        """Load a ``tokenizer.json``; any read or parse failure becomes a ``--tokenizer`` error."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise MultitokenError(f"cannot read {path}: {exc.strerror}", "--tokenizer") from exc
        try:
            tok = tokenizers.Tokenizer.from_buffer(data)
        # The Rust extension raises plain ``Exception`` for every malformed file.
        except Exception as exc:
            reason = " ".join(str(exc).split())  # keep the message on one line
            raise MultitokenError(
                f"{path} is not a valid tokenizer.json: {reason}", "--tokenizer"
            ) from exc
        return cls(
            tok,
            bos=bos,
            eos=eos,
            pad=pad,
            source=str(path),
            chat_template=chat_template,
            split_special_tokens=split_special_tokens,
            added_specials=added_specials,
        )

    def _find(self, preferred: str | None, names: Sequence[str]) -> int | None:
        """Id of ``preferred`` if it exists, else of the first of ``names`` that does."""
        for name in (preferred, *names) if preferred else names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _probe_added_specials(self) -> AddedSpecials:
        """What the post-processor puts before and after a text, read off one encoded probe:
        the tokens it adds have no sequence id. The probe is the eos spelling, which encodes to
        at least one token (the eos itself, or its characters under ``split_special_tokens``)."""
        probe = self._tok.encode(self._tok.id_to_token(self.eos_id), add_special_tokens=True)
        sequence = [i for i, s in enumerate(probe.sequence_ids) if s is not None]
        if not sequence:  # cannot happen for a text that encodes to tokens; all would be prefix
            return AddedSpecials(tuple(probe.ids))
        ids = probe.ids
        return AddedSpecials(tuple(ids[: sequence[0]]), tuple(ids[sequence[-1] + 1 :]))

    def _set_added_specials(self, spellings: Mapping[str, Sequence[str]]) -> None:
        """Make the post-processor add exactly the tokens spelled ``prefix`` and ``suffix``."""
        prefix, suffix = list(spellings.get("prefix", ())), list(spellings.get("suffix", ()))
        wanted = AddedSpecials(self._ids_of(prefix), self._ids_of(suffix))
        if self._probe_added_specials() == wanted:
            return  # keep the file's own post-processor (e.g. GPT-2's ByteLevel offsets)
        self._tok.post_processor = processors.TemplateProcessing(
            single=[*prefix, "$A", *suffix],
            special_tokens=sorted({(t, self._tok.token_to_id(t)) for t in prefix + suffix}),
        )

    def _ids_of(self, spellings: Sequence[str]) -> tuple[int, ...]:
        ids = []
        for spelling in spellings:
            token_id = self._tok.token_to_id(spelling)
            if token_id is None:
                raise MultitokenError(
                    f"{self.source} has no token {spelling!r} to put around texts", "--tokenizer"
                )
            ids.append(token_id)
        return tuple(ids)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; with ``add_special_tokens`` through the post-processor, exactly as
        transformers' ``tokenizer(text)`` (see :meth:`Tokenizer.encode`)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the library's byte-level decoder already replaces invalid UTF-8."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: Path) -> dict:
        """Write ``tokenizer.json``; the spec pins the special tokens so loading never re-guesses,
        and carries the chat template and options that ``tokenizer.json`` has no place for."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        # A stand-in (None) is saved as such: loading finds the same tokenizer lacks it again.
        own = {key: self._own.get(key) for key in ("bos", "eos", "pad")}
        spec: dict[str, Any] = {"type": "hf", "file": TOKENIZER_FILE, **own}
        if self._chat_template is not None:
            spec["chat_template"] = self._chat_template
        if self.split_special_tokens:
            spec["split_special_tokens"] = True
        # Also in tokenizer.json's post-processor; the spec states it so that a spec without it
        # is known to come from before the rule existed (see tokenizer_from_saved).
        spec["added_specials"] = {
            "prefix": [self._tok.id_to_token(i) for i in self.added_specials.prefix],
            "suffix": [self._tok.id_to_token(i) for i in self.added_specials.suffix],
        }
        return spec

    def special_tokens(self) -> dict[str, str]:
        """Spellings of the bos/eos/pad tokens, keyed ``bos``, ``eos``, ``pad`` (bos and pad are
        eos's when the tokenizer has no token of their own)."""
        return {
            "bos": self._tok.id_to_token(self.bos_id),
            "eos": self._tok.id_to_token(self.eos_id),
            "pad": self._tok.id_to_token(self.pad_id),
        }

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (e.g. to write it out)."""
        return self._tok

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or None."""
        return self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Render ``messages`` with the chat template, as ``transformers`` would (``tokenize=False``).

        Raises :class:`ChatTemplateError` when there is no template or the template refuses
        the messages (e.g. its ``raise_exception`` on roles that do not alternate)."""
        if self._chat_template is None:
            raise ChatTemplateError(_no_template_reason(self.source))
        return render_chat_template(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens={f"{key}_token": value for key, value in self._own.items()},
            source=self.source,
        )

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def tokenizer_from_saved(directory: Path, spec: dict) -> Tokenizer:
    """Rebuild the tokenizer that :meth:`Tokenizer.save` wrote into ``directory``.

    A spec from before ``added_specials`` was saved describes a checkpoint that was trained and
    prompted with nothing added around texts, so it keeps encoding that way."""
    kind = spec.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_file(
            Path(directory) / spec.get("file", TOKENIZER_FILE),
            bos=spec.get("bos"),
            eos=spec.get("eos"),
            pad=spec.get("pad"),
            chat_template=spec.get("chat_template"),
            split_special_tokens=bool(spec.get("split_special_tokens", False)),
            added_specials=_saved_added_specials(spec, directory),
        )
    raise MultitokenError(f"unknown saved tokenizer type {kind!r} in {directory}", "--tokenizer")


def _saved_added_specials(spec: dict, directory: Path) -> dict[str, list[str]]:
    """A spec's ``added_specials``, checked; none saved (an older spec) means nothing added."""
    value = spec.get("added_specials", {"prefix": [], "suffix": []})
    if not (
        isinstance(value, dict)
        and all(
            isinstance(value.get(key, []), list)
            and all(isinstance(t, str) for t in value.get(key, []))
            for key in ("prefix", "suffix")
        )
    ):
        raise MultitokenError(f"malformed added_specials in {directory}", "--tokenizer")
    return value


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None``/``"bytes"``: the byte tokenizer; otherwise a tokenizer.json or a model folder.

    A folder is a local transformers model directory. Its ``tokenizer.json`` is used when there
    is one, with the special tokens, chat template and ``split_special_tokens`` its
    ``tokenizer_config.json`` (and ``chat_template.jinja``) name, which are more reliable than
    guessing from common spellings. A folder without ``tokenizer.json`` (e.g. only
    ``vocab.json`` + ``merges.txt``) is handed to ``AutoTokenizer``, and its fast tokenizer's
    backend is used. Nothing is downloaded.
    """
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():  # a GGUF's vocabulary is in its metadata
        return load_gguf_tokenizer(path)
    if path.is_dir():
        options = _options_from_config(path)
        if (path / TOKENIZER_FILE).is_file():
            return HFTokenizer.from_file(path / TOKENIZER_FILE, **options)
        return _tokenizer_via_transformers(path, options)
    if not path.is_file():
        raise MultitokenError(f"no such tokenizer file or folder: {spec}", "--tokenizer")
    return HFTokenizer.from_file(path)


def _tokenizer_via_transformers(folder: Path, options: dict[str, Any]) -> HFTokenizer:
    """A folder's tokenizer as transformers builds it (e.g. from vocab + merges files)."""
    missing = MultitokenError(
        f"{folder} has no tokenizer (no {TOKENIZER_FILE} and none transformers can load "
        "offline); pass --tokenizer",
        "--tokenizer",
    )
    if not any(folder.iterdir()):
        raise missing
    from transformers import AutoTokenizer

    try:
        with quiet_transformers(warnings=False):  # its advice on missing files: not our one line
            auto = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # Any failure (missing files, unknown class, absent sentencepiece, ...) means the same thing
    # to the user: this folder does not give a tokenizer we can use.
    except Exception:
        raise missing from None
    backend = getattr(auto, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise missing
    for key in ("bos", "eos", "pad"):  # the loaded object has resolved special_tokens_map.json too
        value = getattr(auto, f"{key}_token", None)
        if isinstance(value, str) and value:
            options[key] = value
    template = getattr(auto, "chat_template", None)
    if isinstance(template, str) and template and not options.get("chat_template"):
        options["chat_template"] = template
    return HFTokenizer(backend, source=str(folder), **options)


def _options_from_config(folder: Path) -> dict[str, Any]:
    """:class:`HFTokenizer` keyword arguments from a transformers model folder's config files:
    ``bos``/``eos``/``pad`` spellings, ``chat_template``, ``split_special_tokens``."""
    config = _read_json_object(folder / CONFIG_FILE)
    found: dict[str, Any] = {}
    for key in ("bos", "eos", "pad"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):  # older configs store AddedToken objects
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    template = _template_from_config(config.get("chat_template"))
    try:  # the separate file is what current transformers writes, and it wins over the entry
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    except OSError:
        pass
    if template:
        found["chat_template"] = template
    if config.get("split_special_tokens") is True:
        found["split_special_tokens"] = True
    return found


def _read_json_object(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # Optional file: a missing or odd config just means we guess by name.
    return config if isinstance(config, dict) else {}


def _template_from_config(value: object) -> str | None:
    """A config's ``chat_template``: a string, or a list of ``{name, template}`` of which
    transformers uses the one named ``default``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                template = entry.get("template")
                return template if isinstance(template, str) else None
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> HFTokenizer:
    """Fit a byte-level BPE on ``texts`` and write it atomically to ``out`` (a tokenizer.json).

    Byte-level means every string is encodable (no unknown token). ``<|endoftext|>`` doubles as
    bos and eos, GPT-2 style. The file is written to a temporary name and renamed, so a crash
    mid-write never leaves a truncated tokenizer that a later run would pick up.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise MultitokenError(
            f"BPE vocabulary size {vocab_size} is too small (minimum {MIN_BPE_VOCAB})",
            "--vocab-size",
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return HFTokenizer(tok, bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>", source=str(out))


# ---------------------------------------------------------------------------------------------
# Chat templates


def _no_template_reason(source: str) -> str:
    return (
        f"{source} has no chat template; use a tokenizer that has one (a model folder whose "
        f"{CONFIG_FILE} holds chat_template, or a {CHAT_TEMPLATE_FILE}) or give plain text"
    )


def load_gguf_tokenizer(path: str | Path, flag: str = "--tokenizer") -> HFTokenizer:
    """The tokenizer a GGUF file describes, with its special tokens and chat template."""
    backend, special, template = gguf_tokenizer_parts(path, flag)
    try:
        return HFTokenizer(backend, source=str(path), chat_template=template, **special)
    except MultitokenError as exc:  # e.g. no end-of-text token: said of the flag given
        raise MultitokenError(exc.message, flag) from None
