"""GGUF trunks: a ``.gguf`` file (llama.cpp's format) wherever a model folder is accepted.

The file is read by transformers' own GGUF support (``from_pretrained(folder, gguf_file=name)``)
and dequantised at load time into a plain dense causal LM: fp32 for quantised files, the file's
own float type for F16/BF16 ones. The precision it then runs in is chosen as for any trunk
(decoding casts it, training keeps fp32 master weights). Nothing of the quantisation stays on the
model, so it saves, exports and trains like a model loaded from a folder.

The tokenizer comes from the file's metadata (vocabulary, merges, special-token ids, chat
template) through ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``; end-of-turn tokens
the file names (``tokenizer.ggml.eot_token_id``/``eom_token_id``) become stop tokens.

Before any of that the file is checked cheaply (the ``gguf`` package, magic bytes, header, size),
so a truncated or foreign file is a one-line :class:`MultitokenError`, not a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import MultitokenError, first_line
from multitoken.quiet import quiet_transformers

SUFFIX = ".gguf"
MAGIC = b"GGUF"
_SOURCE_ATTR = "_multitoken_gguf"  # set on a trunk loaded from a GGUF: the file, described
# Tokens that end a generation: eos, and the end-of-turn/-message tokens of chat models.
_STOP_KEYS = tuple(f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom"))
# What loading a file can raise, from transformers and the gguf package: a damaged or foreign
# file, not a bug of ours. Each becomes one line naming the file.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,
    NotImplementedError,
    ImportError,
    struct.error,
)


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; whether it exists is checked on load)."""
    p = Path(path)
    return p.suffix.lower() == SUFFIX and not p.is_dir()


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says, read without touching its tensor data."""

    path: Path
    architecture: str
    name: str | None
    file_type: str | None  # llama.cpp's name for the quantisation, e.g. "Q4_1", "F16"
    tensors: int
    float_dtype: str  # the dtype it dequantises to: "float32", or the file's half type
    stop_ids: tuple[int, ...]  # eos and the end-of-turn tokens the file names
    vocab_size: int | None  # tokens in the file's vocabulary

    def describe(self) -> str:
        kind = f"{self.architecture}, {self.file_type}" if self.file_type else self.architecture
        return f"{self.path.name} (GGUF {kind})"


def require_packages(path: Path, flag: str) -> None:
    """transformers reads GGUF files with the ``gguf`` package and loads them with accelerate."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MultitokenError(
            f"reading {path.name} needs the gguf package (pip install gguf)", flag
        ) from None
    if importlib.util.find_spec("accelerate") is None:
        raise MultitokenError(
            f"loading {path.name} needs the accelerate package (pip install accelerate)", flag
        )


def read_gguf(path: str | Path, flag: str = "--trunk") -> GGUFInfo:
    """Check ``path`` is a whole GGUF file and describe it; any fault is one line."""
    p = Path(path)
    if not p.is_file():
        raise MultitokenError(f"no such GGUF file: {p}", flag)
    require_packages(p, flag)
    with open(p, "rb") as f:
        if f.read(4) != MAGIC:
            raise MultitokenError(f"{p} is not a GGUF file (it does not start with GGUF)", flag)
    size = p.stat().st_size
    try:
        metadata, types, data_end = _read_header(p)
    except UnknownTensorType as exc:
        raise MultitokenError(
            f"{p} holds tensors of a type the installed gguf package cannot read ({exc}); a "
            "newer gguf package may (pip install -U gguf)",
            flag,
        ) from None
    except struct.error:  # a field runs past the end of the file
        raise MultitokenError(f"{p} is truncated or corrupt: its header ends early", flag) from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise MultitokenError(f"{p} is corrupt: {first_line(exc)}", flag) from None
    if data_end is not None and data_end > size:
        raise MultitokenError(
            f"{p} is truncated: its tensors need {data_end} bytes, the file has {size}", flag
        )
    import gguf

    file_type = metadata.get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        file_type = file_type.removeprefix("ALL_")
    except ValueError:
        file_type = None if file_type is None else f"file type {file_type}"
    stops = [metadata.get(key) for key in _STOP_KEYS]
    vocab = metadata.get("tokenizer.ggml.tokens")  # string arrays are read as their length
    return GGUFInfo(
        path=p,
        architecture=str(metadata.get("general.architecture")),
        name=metadata.get("general.name"),
        file_type=file_type,
        tensors=len(types),
        float_dtype=_float_dtype(types),
        stop_ids=tuple(dict.fromkeys(i for i in stops if isinstance(i, int))),
        vocab_size=vocab if isinstance(vocab, int) else None,
    )


def _read_header(path: Path) -> tuple[dict, list[int], int | None]:
    """(metadata, ggml type of each tensor, where the tensor data ends or None if checked).

    Metadata arrays of strings (the vocabulary) are given as their length. transformers' own
    reader skips them and is fast, but knows fewer tensor types than the ``gguf`` package that
    dequantises the file (it refused the Q5_0 tensors of llama.cpp's Q4_K_M files); where it is
    missing (older releases) or refuses the file, the gguf package's reader parses everything,
    checking that every tensor fits in the file, and only what that reader refuses is a fault."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    except ImportError:
        return _read_header_with_gguf(path)
    try:
        metadata, _ = read_gguf_metadata(str(path))
        header = GgufHeader.from_file(str(path))
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError):
        return _read_header_with_gguf(path)
    end = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    return metadata, [t.ggml_type for t in header.tensors], end


def _read_header_with_gguf(path: Path) -> tuple[dict, list[int], None]:
    """:func:`_read_header` by the ``gguf`` package's reader; a tensor type it does not know
    is :class:`UnknownTensorType`."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except ValueError as exc:
        kind = next((a for a in exc.args if "GGMLQuantizationType" in str(a)), None)
        if kind is not None:
            raise UnknownTensorType(first_line(exc)) from None
        raise
    metadata = {}
    for key, field in reader.fields.items():
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            metadata[key] = len(field.data)
        elif field.types[0] == gguf.GGUFValueType.STRING:
            metadata[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            metadata[key] = field.parts[field.data[0]][0].item()
    return metadata, [int(t.tensor_type) for t in reader.tensors], None


class UnknownTensorType(Exception):
    """A tensor type the installed gguf package cannot read (a newer llama.cpp's)."""


def _float_dtype(types: list[int]) -> str:
    """float32 for quantised blocks (they dequantise exactly to it); else the file's own half
    type where it has one (its F32 tensors are the norms)."""
    from gguf import GGMLQuantizationType as T

    kinds = set(types)
    if not kinds <= {T.F32, T.F16, T.BF16}:
        return "float32"
    return "bfloat16" if T.BF16 in kinds else "float16" if T.F16 in kinds else "float32"


@contextlib.contextmanager
def _quiet(*, warnings: bool = True):
    """No progress bars: transformers' own, and the plain tqdm its GGUF dequantiser draws
    (``warnings``: as for :func:`multitoken.quiet.quiet_transformers`)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as legacy
    except ImportError:
        legacy = None
    bar = getattr(legacy, "tqdm", None)
    if bar is not None:
        legacy.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        with quiet_transformers(warnings=warnings):
            yield
    finally:
        if bar is not None:
            legacy.tqdm = bar


def load_gguf_trunk(path: str | Path, flag: str = "--trunk"):
    """The causal LM in a GGUF file, dequantised into a plain dense transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    info = read_gguf(path, flag)
    p = info.path.resolve()
    options: dict = {"gguf_file": p.name, "local_files_only": True}
    try:
        from transformers import GgufConfig
    except ImportError:  # releases before it always dequantised
        pass
    else:  # dense weights, not GGUF blocks computed by a kernel
        options["quantization_config"] = GgufConfig(dequantize=True)
    with _quiet():
        try:
            config = AutoConfig.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
        except _LOAD_ERRORS as exc:
            raise MultitokenError(
                f"transformers cannot load {p}, a GGUF of architecture {info.architecture!r}: "
                f"{first_line(exc)}",
                flag,
            ) from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                p.parent, config=config, dtype=getattr(torch, info.float_dtype), **options
            )
        except _LOAD_ERRORS as exc:
            raise MultitokenError(
                f"cannot load a causal LM from {p}: {first_line(exc)}", flag
            ) from None
    strip_quantizer_marks(model)
    stops = getattr(model.generation_config, "eos_token_id", None)
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    vocab = model.get_input_embeddings().weight.shape[0]
    stops += [i for i in info.stop_ids if i not in stops and 0 <= i < vocab]
    if stops:
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    setattr(model, _SOURCE_ATTR, info.describe())
    return model


def strip_quantizer_marks(model) -> None:
    """Forget that ``model`` came through transformers' GGUF quantizer. Its weights are dense
    already; the marks would only make ``save_pretrained`` refuse and a saved config.json ask
    for a GGUF file. Current transformers removes them itself when told to dequantise."""
    config = getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else None
    method = getattr(config, "quant_method", method)
    if config is not None and str(getattr(method, "value", method)) != "gguf":
        return  # someone else's quantisation: not ours to undo
    for name in ("hf_quantizer", "quantization_method"):
        if name in vars(model):
            delattr(model, name)
    if config is not None:
        del model.config.quantization_config
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and "_is_quantized" in vars(sub):
            del sub._is_quantized


def gguf_source(trunk) -> str | None:
    """``"name.gguf (GGUF llama, Q4_1)"`` for a trunk loaded from a GGUF file, else None."""
    return getattr(trunk, _SOURCE_ATTR, None)


def gguf_tokenizer_parts(path: str | Path, flag: str = "--tokenizer") -> tuple:
    """What the tokenizer a GGUF file describes is built from (``multitoken.text.tokenizer`` builds
    it): its fast-tokenizer backend with exactly the file's vocabulary, its special tokens
    (``{"bos": ..., "eos": ..., "pad": ...}`` where named) and its chat template (or None)."""
    from transformers import AutoTokenizer

    info = read_gguf(path, flag)
    p = info.path.resolve()
    try:
        with _quiet(warnings=False):
            auto = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
    except Exception as exc:  # any failure means the same: no tokenizer we can use in this file
        raise MultitokenError(
            f"cannot build the tokenizer of {info.describe()}: {first_line(exc)}", flag
        ) from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise MultitokenError(f"{info.describe()} gives no fast tokenizer", flag)
    options = {}
    for key in ("bos", "eos", "pad"):
        value = getattr(auto, f"{key}_token", None)
        if isinstance(value, str) and value:
            options[key] = value
    template = getattr(auto, "chat_template", None)
    backend = _without_invented_tokens(backend, info.vocab_size, set(options.values()))
    return backend, options, template if isinstance(template, str) and template else None


def _without_invented_tokens(backend, vocab_size: int | None, used: set[str]):
    """transformers' byte-level GGUF tokenizer adds GPT-2's ``<|endoftext|>`` when the file's
    vocabulary lacks it, one id past the model's embedding. The file never produces that id:
    drop it, so the tokenizer has exactly the file's vocabulary (unless a special token in
    ``used`` is that token: then the tokenizer stays as transformers built it)."""
    import tokenizers

    if vocab_size is None or backend.get_vocab_size(with_added_tokens=True) <= vocab_size:
        return backend
    data = json.loads(backend.to_str())
    added = data.get("added_tokens", [])
    if any(t["id"] >= vocab_size and t["content"] in used for t in added):
        return backend
    data["added_tokens"] = [t for t in added if t["id"] < vocab_size]
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception:  # the Rust side raises plain Exception; keep what transformers built
        return backend
