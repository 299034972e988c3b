"""The :class:`Tokenizer` protocol and its two kinds: raw UTF-8 bytes (:class:`ByteTokenizer`)
and a Hugging Face ``tokenizers.Tokenizer`` with its special tokens resolved (:class:`HFTokenizer`).

Apart from :mod:`multitoken.text.tokenizer`, which finds, loads, rebuilds and trains tokenizers
(and names everything here too), because what a tokenizer is does not depend on where it came
from: code that only encodes and decodes needs none of the loading.

The byte tokenizer is the default because it needs no files, no training and no network, and
it can represent any text exactly.

Special tokens: a text that starts something (a prompt, a training document) is encoded as the
model's own tokenizer encodes it, with what that tokenizer puts around a whole text (a BOS for
Llama-style tokenizers; nothing for GPT-2's or Qwen2's): ``encode(text, add_special_tokens=True)``,
as ``transformers``' ``tokenizer(text)``. A fragment (a continuation, a window of a corpus) and a
rendered chat, whose template already spells its BOS, get nothing added, as
``apply_chat_template(tokenize=True)``. What is added is :attr:`Tokenizer.added_specials`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import tokenizers
from tokenizers import processors

from multitoken.errors import MultitokenError
from multitoken.text.chat import ChatTemplateError, render_chat_template

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 saves the template

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


def _no_template_reason(source: str) -> str:
    return (
        f"{source} has no chat template; use a tokenizer that has one (a model folder whose "
        f"{CONFIG_FILE} holds chat_template, or a {CHAT_TEMPLATE_FILE}) or give plain text"
    )
