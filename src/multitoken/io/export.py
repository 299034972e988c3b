"""Export a trained model in the layouts other tools load, each written atomically.

- ``trunk-only``: the trunk as a plain `transformers` folder with its tokenizer (decoding
  method 1 of docs/design.md: drop the heads). ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` load it without multitoken installed. A GGUF trunk exports
  this way as dense safetensors (:mod:`multitoken.io.gguf` loads it with no quantizer left on it).
- ``heads``: the heads alone (``heads.safetensors`` + ``heads.json``), to ship beside the trunk
  they were trained on (see :mod:`multitoken.io.headfile`).
- ``deepseek-v3``: trunk and DeepSeek MTP modules in the DeepSeek-V3 checkpoint layout
  (see :mod:`multitoken.io.v3layout`), with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.heads import DeepSeekHeads
from multitoken.io.atomic import atomic_folder
from multitoken.io.headfile import save_heads
from multitoken.io.tokenizer_files import write_hf_tokenizer
from multitoken.model import MTPModel
from multitoken.text.tokenizer import Tokenizer
from multitoken.trunk import quiet_transformers

FORMATS = ("trunk-only", "heads", "deepseek-v3")


def check_out(out: Path) -> None:
    """The destination must be new (or an empty folder): an export never mixes with old files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MultitokenError(f"{out} already exists and is not an empty folder", "--out")
    if not out.parent.is_dir():
        raise MultitokenError(f"{out.parent} is not an existing folder", "--out")


def export(model: MTPModel, tokenizer: Tokenizer, out: str | Path, fmt: str) -> Path:
    """Write ``model`` to the new folder ``out`` in layout ``fmt`` (one of :data:`FORMATS`)."""
    out = Path(out)
    if fmt not in FORMATS:
        raise MultitokenError(f"unknown export format {fmt!r} ({', '.join(FORMATS)})", "--format")
    if fmt != "trunk-only" and model.heads is None:
        raise MultitokenError("this model has no heads to export", "--checkpoint")
    if fmt == "deepseek-v3" and not isinstance(model.heads, DeepSeekHeads):
        raise MultitokenError(
            f"only deepseek heads have a DeepSeek-V3 layout; these are {model.family} heads",
            "--deepseek-v3",
        )
    quantizer = getattr(model.trunk, "hf_quantizer", None)
    if fmt != "heads" and quantizer is not None:  # transformers would refuse to save it
        method = getattr(quantizer.quantization_config, "quant_method", "quantized")
        raise MultitokenError(
            f"the trunk is loaded with {getattr(method, 'value', method)} quantisation; only "
            "dense weights export (a GGUF trunk loaded by multitoken is dense)",
            "--checkpoint",
        )
    check_out(out)
    with atomic_folder(out) as tmp:
        if fmt == "heads":
            save_heads(model, tmp)
        else:
            if fmt == "trunk-only":
                with quiet_transformers():
                    model.trunk.save_pretrained(tmp, safe_serialization=True)
            else:
                from multitoken.io.v3layout import write_v3_layout

                write_v3_layout(model, tmp)
            write_hf_tokenizer(tokenizer, tmp)
    return out
