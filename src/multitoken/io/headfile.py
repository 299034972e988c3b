"""Portable head files: the MTP heads alone, a small folder to ship beside the trunk they fit.

    heads.safetensors   the heads' own weights (pieces shared with the trunk — its embedding,
                        unembedding, final norm — are not copied: they are the trunk's)
    heads.json          {"format", "family", "depth", "vocab_size", "heads": HeadConfig,
                         "trunk": the trunk's signature}

The signature holds the trunk config fields that decide the heads' shapes (model type, hidden
size, layers, attention heads, vocabulary...) and a fingerprint of them. Heads load only onto a
trunk with the same fields; anything else is refused with the fields that differ. It also holds
a digest of the trunk's weights: heads trained on other weights of the same architecture (the
trunk was fine-tuned after them, say) still load — decoding stays exact whatever the heads are —
but with a warning that their drafts may be stale and acceptance lower. A trunk loaded from a
GGUF file signs like any other (its dequantised weights); the signature also names the file
(``weights_from``), so that warning can say when a quantisation is what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError, first_line
from multitoken.io.gguf import gguf_source
from multitoken.model import MTPModel

HEADS_FILE = "heads.safetensors"
HEADS_META = "heads.json"
FORMAT_VERSION = 1

# Config fields that shape the heads (and the blocks meta/deepseek heads build from the trunk's
# layer class). Read through the config's own attribute map, so GPT-2's n_embd is hidden_size.
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
)
_DIGEST_ELEMENTS = 4096  # per tensor: enough to tell fine-tuned weights apart, cheap for 70B

log = logging.getLogger("multitoken")


def trunk_signature(trunk: PreTrainedModel) -> dict:
    """What heads record of the trunk they were trained on."""
    config = trunk.config.get_text_config()
    fields = {name: getattr(config, name, None) for name in _SHAPE_FIELDS}
    fields = {k: v for k, v in fields.items() if isinstance(v, (int, str))}
    fields["vocab_size"] = trunk.get_input_embeddings().weight.shape[0]
    text = json.dumps(fields, sort_keys=True)
    signature = {
        "fields": fields,
        "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16],
        "weights_digest": weights_digest(trunk),
    }
    if gguf_source(trunk) is not None:  # informative only: the fields and digest decide
        signature["weights_from"] = gguf_source(trunk)
    return signature


def weights_digest(trunk: PreTrainedModel) -> str:
    """A digest of the first elements of every trunk tensor (as fp32, so the dtype it is loaded in
    does not matter): equal weights give equal digests, fine-tuned ones almost surely do not."""
    h = hashlib.sha256()
    for name, tensor in sorted(trunk.state_dict().items()):
        head = tensor.detach().flatten()[:_DIGEST_ELEMENTS].float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


def save_heads(model: MTPModel, folder: Path) -> None:
    """Write ``heads.safetensors`` and ``heads.json`` into an existing folder."""
    if model.heads is None:
        raise MultitokenError("this model has no heads to save", "--checkpoint")
    state = {k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(state, str(folder / HEADS_FILE), metadata={"family": model.family})
    signature = trunk_signature(model.trunk)
    meta = {
        "format": FORMAT_VERSION,
        "family": model.family,
        "depth": model.depth,
        "vocab_size": signature["fields"]["vocab_size"],
        "heads": model.head_config.__dict__,
        "trunk": signature,
    }
    (folder / HEADS_META).write_text(json.dumps(meta, indent=2) + "\n")


def is_heads_folder(folder: Path) -> bool:
    return (Path(folder) / HEADS_META).is_file()


def read_heads_meta(folder: Path, flag: str = "--heads") -> dict:
    path = Path(folder) / HEADS_META
    if not path.is_file():
        raise MultitokenError(f"{folder} holds no {HEADS_META} (not a heads folder)", flag)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MultitokenError(f"{path} is corrupt or unreadable ({exc})", flag) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise MultitokenError(f"{path} is not a format-{FORMAT_VERSION} heads file", flag)
    return meta


def check_trunk(meta: dict, trunk: PreTrainedModel, where: Path, flag: str = "--heads") -> None:
    """Refuse heads made for another trunk; warn when only the trunk's weights changed."""
    theirs = meta.get("trunk", {})
    ours = trunk_signature(trunk)
    wanted, have = theirs.get("fields", {}), ours["fields"]
    differ = [
        f"{k} {wanted.get(k)!r} (heads) vs {have.get(k)!r} (trunk)"
        for k in sorted(set(wanted) | set(have))
        if wanted.get(k) != have.get(k)
    ]
    if differ:
        raise MultitokenError(
            f"the heads in {where} were trained for another trunk: {'; '.join(differ)}", flag
        )
    if theirs.get("weights_digest") != ours["weights_digest"]:
        why = "fine-tuned since?"
        if theirs.get("weights_from") != ours.get("weights_from"):  # e.g. a GGUF quantisation
            why = f"{theirs.get('weights_from') or 'a model folder'} vs "
            why += f"{ours.get('weights_from') or 'a model folder'} here"
        log.warning(
            "the heads in %s were trained on other weights of this trunk (%s): "
            "output stays exact, but drafts may be stale and acceptance lower",
            where,
            why,
        )


def load_heads(trunk: PreTrainedModel, folder: str | Path, flag: str = "--heads") -> MTPModel:
    """``trunk`` with the heads of ``folder`` attached (checked against the trunk first)."""
    folder = Path(folder)
    meta = read_heads_meta(folder, flag)
    check_trunk(meta, trunk, folder, flag)
    try:
        state = load_file(str(folder / HEADS_FILE))
    except (SafetensorError, OSError) as exc:
        raise MultitokenError(
            f"{folder / HEADS_FILE} is missing, corrupt or truncated ({exc})", flag
        ) from None
    config = dict(meta["heads"])
    config["init_from_trunk"] = False  # the saved weights replace any initialisation
    try:
        model = MTPModel(trunk, HeadConfig(**config))
    except TypeError as exc:
        raise MultitokenError(
            f"{folder / HEADS_META} has an unknown head option: {exc}", flag
        ) from None
    try:
        model.heads.load_state_dict(state)
    except RuntimeError as exc:
        raise MultitokenError(
            f"{folder / HEADS_FILE} does not match its config: {first_line(exc)}", flag
        ) from None
    model.head_config.init_from_trunk = meta["heads"].get("init_from_trunk")
    return model
