"""DeepSeek MTP modules in the DeepSeek-V3 checkpoint layout, written and read.

DeepSeek-V3 (technical report §2.2) ships its MTP module inside the main checkpoint as if it were
one more decoder layer: with L trunk layers, module k (k = 0..D-1) is stored as
``model.layers.{L+k}.*`` — its transformer block under the layer's usual names (``self_attn.*``,
``mlp.*``, ``input_layernorm.*``, ...) beside ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and copies of the shared embedding (``embed_tokens``) and unembedding
(``shared_head.head``). ``config.json`` gives D as ``num_nextn_predict_layers`` (the name vLLM and
SGLang read) and ``num_mtp_layers`` (what transformers' ``generate(use_mtp=True)`` reads). A loader
that knows nothing of MTP sees an ordinary L-layer causal LM plus keys it does not use.

Blocks are stored exactly as transformers stores the trunk's own layers: ``save_pretrained``
undoes the conversions transformers applies at load time (DeepSeek-V3's routed experts are one
fused tensor in memory, one tensor per expert on disk), and this module applies the same function
to the MTP keys in both directions.

What the loaders compute (module k reads h^{k-1} and Emb(t_{i+k}); docs/design.md §DeepSeek modules):

- multitoken and vLLM (``deepseek_mtp.py``): module k+1 reads the block output h^k; the logits
  are ``shared_head.head(shared_head.norm(h^k))``. This is the paper's chain.
- transformers 5.24 (``MtpLayer``): the same logits, but the state handed on is the normed one,
  so module k+1 reads ``hnorm(shared_head.norm_k(h^k))`` instead of ``hnorm(h^k)``. Drafts of
  module 1 agree; from module 2 on they differ unless ``shared_head.norm`` is the identity (an
  RMSNorm with unit weight changes only the scale, which ``hnorm`` removes up to its eps).
  SGLang's NextN model also returns the normed state. Verification keeps every decoder lossless
  either way; only acceptance changes. DeepSeek-V3 itself has D = 1.
- vLLM's module also zeroes the embedding it reads at position 0; multitoken does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig

from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.heads import DeepSeekHeads
from multitoken.model import MTPModel
from multitoken.trunk import load_causal_lm, mtp_layer_kind, quiet_transformers

# config.json names of D: DeepSeek-V3's (engines) first, then transformers' own.
DEPTH_KEYS = ("num_nextn_predict_layers", "num_mtp_layers")


@dataclass
class _Entry:
    """One tensor of the layout in its in-memory form: a weight of ``heads.mtp[k]`` (``key`` in
    that module's state dict) or, with ``key`` None, a copy of a trunk tensor the module shares."""

    tensor: torch.Tensor
    k: int
    key: str | None
    shares: str = ""  # with key None: "embedding" or "head"


def _layers_name(model: MTPModel) -> str:
    """Where the trunk keeps its decoder layers (``model.layers`` for Llama and DeepSeek-V3)."""
    return next(n for n, m in model.trunk.named_modules() if m is model.parts.layers)


def _entries(model: MTPModel) -> dict[str, _Entry]:
    """Every MTP tensor of the layout, by in-memory name under ``{layers}.{L+k}.``."""
    prefix, L = _layers_name(model), model.parts.num_layers
    entries: dict[str, _Entry] = {}
    for k, module in enumerate(model.heads.mtp):
        base = f"{prefix}.{L + k}."
        for key, tensor in module.state_dict().items():
            # the block's weights sit directly under the layer, as in a trunk layer
            entries[base + key.removeprefix("block.")] = _Entry(tensor, k, key)
        for name, what, shared in (
            ("embed_tokens", "embedding", model.parts.embed),
            ("shared_head.head", "head", model.parts.unembed),
        ):
            for key, tensor in shared.state_dict().items():
                entries[f"{base}{name}.{key}"] = _Entry(tensor, k, None, what)
    return entries


def _checkpoint_form(model: MTPModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors renamed and rearranged as transformers' ``save_pretrained`` stores them."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions stores weights as they are
        return dict(tensors)
    return revert_weight_conversion(model.trunk, dict(tensors))


def _mtp_config(model: MTPModel) -> dict:
    """The config.json fields that announce D modules, for engines and for transformers (whose
    ``get_mtp_config`` also wants the block kind of each module where the trunk lists kinds)."""
    D, config = model.depth, model.parts.config
    fields: dict = dict.fromkeys(DEPTH_KEYS, D)
    for name in ("layer_types", "mlp_layer_types"):
        if getattr(config, name, None):
            fields[f"mtp_{name}"] = [mtp_layer_kind(config, name, k) for k in range(D)]
    return fields


def write_v3_layout(model: MTPModel, folder: Path) -> None:
    """Write ``model`` into the existing empty ``folder`` as a plain transformers model folder
    (config.json, model.safetensors, generation_config.json) of the trunk with its D DeepSeek
    modules stored as layers L..L+D-1, DeepSeek-V3's layout."""
    if not isinstance(model.heads, DeepSeekHeads):
        has = "no" if model.heads is None else model.family
        raise MultitokenError(
            f"only deepseek heads have a DeepSeek-V3 layout; this model has {has} heads",
            "--format",
        )
    folder = Path(folder)
    if not folder.is_dir() or any(folder.iterdir()):
        raise MultitokenError(f"{folder} must be an existing empty folder", "--out")
    state = dict(model.trunk.state_dict())
    for name, entry in _entries(model).items():
        # copies: the layout stores the shared embedding and head once per module, and
        # safetensors refuses tensors that share memory
        state[name] = entry.tensor.detach().clone()
    with quiet_transformers():
        model.trunk.save_pretrained(folder, state_dict=state)  # converts all keys alike
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(_mtp_config(model))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.trunk.config).save_pretrained(folder)


def mtp_depth(folder: Path) -> int:
    """D, the number of MTP modules a model folder's config.json announces (0 when none)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return 0
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MultitokenError(f"cannot read {path}: {exc}", "--checkpoint") from None
    for source in (config, config.get("text_config") or {}):
        for key in DEPTH_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return 0


def _load_trunk(folder: Path):
    """The trunk as an ordinary causal LM from the folder, without a word about the MTP keys:
    transformers' load report lists them as unexpected, so its warnings are silenced and what
    matters in that report is checked from the loading info instead."""
    trunk, info = load_causal_lm(
        folder,
        "--checkpoint",
        warnings=False,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below, by name
    )
    for problem in ("missing_keys", "mismatched_keys"):
        found = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(problem, ()))
        if found:
            what = "is missing" if problem == "missing_keys" else "has the wrong shape"
            raise MultitokenError(f"{folder}: trunk weight {found[0]} {what}", "--checkpoint")
    # The trunk alone has no MTP weights: a config that still announced D would mislead whoever
    # loads a folder this trunk is saved to.
    for key in DEPTH_KEYS:
        if hasattr(trunk.config, key):
            setattr(trunk.config, key, 0)
    return trunk


def _read_stored(folder: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors named ``keys`` that the folder's safetensors files hold (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in keys.intersection(f.keys()):
                out[key] = f.get_tensor(key)
    return out


def load_v3_layout(folder: Path) -> MTPModel:
    """An MTPModel from a folder in DeepSeek-V3's layout: the trunk as the causal LM it is, and
    DeepSeek heads of depth D whose weights are the stored ``model.layers.{L+k}.*``."""
    folder = Path(folder)
    depth = mtp_depth(folder)
    if depth < 1:
        raise MultitokenError(
            f"{folder} holds no MTP modules (its config.json sets neither "
            f"{' nor '.join(DEPTH_KEYS)})",
            "--checkpoint",
        )
    model = MTPModel(_load_trunk(folder), HeadConfig(family="deepseek", depth=depth))
    entries = _entries(model)
    own = {name: e for name, e in entries.items() if e.key is not None}
    _check_shared_copies(folder, {name: e for name, e in entries.items() if e.key is None})

    # Number every in-memory element of the modules' own weights and pass the numbers through
    # the save-time conversion: the result says which stored element lands where. Conversions
    # only move elements (split, stack, rename), so this inverts them exactly, whatever the
    # architecture. (The shared embedding/head copies, the largest tensors, are left out.)
    numbers, start = {}, 0
    for name, entry in own.items():
        n = entry.tensor.numel()
        numbers[name] = torch.arange(start, start + n).view(entry.tensor.shape)
        start += n
    where = _checkpoint_form(model, numbers)  # stored key -> element numbers, stored shape
    stored = _read_stored(folder, set(where))
    flat = torch.empty(start, dtype=torch.float64)  # holds fp32/bf16/fp16 values exactly
    filled = torch.zeros(start, dtype=torch.bool)
    for key, index in where.items():
        if key not in stored:
            raise MultitokenError(f"{folder}: MTP weight {key} is missing", "--checkpoint")
        if stored[key].shape != index.shape:
            raise MultitokenError(
                f"{folder}: MTP weight {key} has shape {list(stored[key].shape)}, "
                f"expected {list(index.shape)}",
                "--checkpoint",
            )
        flat[index.flatten()] = stored[key].flatten().to(torch.float64)
        filled[index.flatten()] = True
    if not bool(filled.all()):
        raise MultitokenError(
            f"cannot map the MTP weights of {folder} onto the trunk's layer class", "--checkpoint"
        )

    weights: list[dict[str, torch.Tensor]] = [{} for _ in range(depth)]
    start = 0
    for entry in own.values():
        n = entry.tensor.numel()
        weights[entry.k][entry.key] = flat[start : start + n].view(entry.tensor.shape)
        start += n
    for module, state in zip(model.heads.mtp, weights):
        module.load_state_dict(state)  # casts to the module's dtype
    return model.eval()


def _check_shared_copies(folder: Path, shared: dict[str, _Entry]) -> None:
    """The layout may store each module's copy of the embedding and head (DeepSeek-V3 does; other
    exporters leave them out, and transformers' loader allows both): where present, they must be
    the trunk's own, because multitoken's modules share them."""
    stored = _read_stored(folder, set(shared))
    for name, entry in shared.items():
        if name in stored and not torch.equal(stored[name].to(entry.tensor.dtype), entry.tensor):
            raise MultitokenError(
                f"{folder}: MTP module {entry.k + 1} has its own {entry.shares} ({name} differs "
                "from the trunk's); multitoken supports only modules that share the trunk's "
                "embedding and head",
                "--checkpoint",
            )
