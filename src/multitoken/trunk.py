"""The trunk adapter: a `transformers` causal LM used as it is, and what MTP heads need from it.

Heads need the trunk's token embedding, unembedding (lm_head), final norm, decoder-layer class
(to build their own blocks), the rotary embedding where the model has one, and the keyword
arguments its decoder layers are called with. All of these are found through the model's generic
interfaces (``get_input_embeddings``, ``get_output_embeddings``, ``base_model``) and one probe
forward pass with hooks that watches what the base model actually does — never an if/elif over
architecture names. Anything missing is a one-line :class:`MultitokenError`.

The parts themselves, and how heads run blocks like the trunk's, are
:mod:`multitoken.trunk_parts` (named here too); this module finds them in a model, and loads or
builds trunks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from multitoken.errors import MultitokenError, first_line
from multitoken.io.gguf import is_gguf, load_gguf_trunk
from multitoken.presets import PRESETS
from multitoken.quiet import quiet_transformers
from multitoken.trunk_parts import (
    _CACHE_NAMES,
    _LAYER_KWARGS,
    LOGIT_TRANSFORMS,
    TrunkParts,
    layer_arguments,
    layer_kind,
    mtp_block_config,
    mtp_layer_kind,
    run_layer,
    watch_states,
)

__all__ = [
    "LOGIT_TRANSFORMS",
    "TrunkParts",
    "build_trunk",
    "inspect_trunk",
    "layer_arguments",
    "layer_kind",
    "load_causal_lm",
    "load_trunk",
    "mtp_block_config",
    "mtp_layer_kind",
    "quiet_transformers",
    "run_layer",
    "watch_states",
]


def inspect_trunk(model: PreTrainedModel) -> TrunkParts:
    """Find the parts heads need by interface and by watching one probe forward pass."""
    config = model.config.get_text_config()
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise MultitokenError(
            f"{type(model).__name__} has no base model under its LM head", "--trunk"
        )
    embed, unembed = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or unembed is None:
        raise MultitokenError(
            f"{type(model).__name__} exposes no input/output embeddings", "--trunk"
        )
    owner, layers = _decoder_layers(model, base, getattr(config, "num_hidden_layers", None))
    probe = torch.tensor([[1, 2, 3, 4]], device=embed.weight.device) % config.vocab_size
    seen = _watch_probe(base, owner, layers, probe)
    final_norm = _final_norm(model, layers, seen)
    rotary = _rotary(seen)
    # GPT-NeoX, Falcon and GPT-BigCode layers take their cache as ``layer_past``, Llama's as
    # ``cache``: a head block handed the wrong name would attend over its new slots only
    takes = inspect.signature(layers[0].forward).parameters
    cache_name = next((n for n in _CACHE_NAMES if n in takes), None)
    named = set(seen.layer_kwargs) | ({"cache"} if cache_name else set())
    layer_kwargs = tuple(k for k in _LAYER_KWARGS if k in named)
    known = {*_LAYER_KWARGS, *_CACHE_NAMES}
    foreign = tuple(
        k
        for k, v in seen.layer_kwargs.items()
        if k not in known and not isinstance(v, (bool, int, float, str, type(None)))
    )
    required = tuple(
        name
        for name, p in list(takes.items())[1:]
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and name not in known
    )
    if "position_embeddings" in layer_kwargs and rotary is None:
        raise MultitokenError(
            f"{type(model).__name__} passes position embeddings to its layers but no rotary "
            "module was found",
            "--trunk",
        )
    return TrunkParts(
        model,
        base,
        layers,
        final_norm,
        embed,
        unembed,
        rotary,
        layer_kwargs,
        cache_name or "cache",
        foreign,
        required,
    )


@dataclass
class _Probe:
    """What one forward of the base model showed: each watched module's output, in call order,
    the keyword arguments layer 0 was called with, and the base model's last hidden state."""

    outputs: dict[nn.Module, object]
    order: list[nn.Module]
    calls: list[object]  # each call's output, in the order of ``order``
    layer_kwargs: dict[str, object]
    last: torch.Tensor


def _decoder_layers(
    model: PreTrainedModel, base: nn.Module, n_layers: int | None
) -> tuple[nn.Module, nn.ModuleList]:
    """The one list of ``n_layers`` modules nearest the base model, its decoder layers, and the
    module that holds it (the base model itself, or OPT's ``decoder``). Searched level by level,
    so a list inside a layer (experts) is never taken for it."""
    owners = [base]
    for _ in range(3):
        found = [
            (owner, m)
            for owner in owners
            for m in owner.children()
            if isinstance(m, nn.ModuleList) and len(m) == n_layers
        ]
        if len(found) == 1:
            return found[0]
        if found:
            break
        owners = [child for owner in owners for child in owner.children()]
    raise MultitokenError(
        f"cannot find the {n_layers} decoder layers of {type(model).__name__}", "--trunk"
    )


def _watch_probe(
    base: nn.Module, owner: nn.Module, layers: nn.ModuleList, probe: torch.Tensor
) -> _Probe:
    """Run ``probe`` through the base model with hooks on the children of the layers' owner
    (the last layer standing for the layer list) and on layer 0's arguments."""
    seen = _Probe({}, [], [], {}, probe)

    def record(module, _args, output):
        seen.outputs[module] = output  # the last call's
        seen.order.append(module)  # a module called again (a rotary per layer kind) recurs
        seen.calls.append(output)

    def record_kwargs(module, args, kwargs):
        seen.layer_kwargs.update(layer_arguments(module, args, kwargs)[1])

    hooks = [m.register_forward_hook(record) for m in owner.children() if m is not layers]
    hooks.append(layers[-1].register_forward_hook(record))
    hooks.append(layers[0].register_forward_pre_hook(record_kwargs, with_kwargs=True))
    try:
        with torch.no_grad():
            seen.last = base(input_ids=probe, use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return seen


def _final_norm(model: PreTrainedModel, layers: nn.ModuleList, seen: _Probe) -> nn.Module:
    """The last module whose output is the base model's output: a norm after the last layer,
    or nn.Identity where the last layer's output is already it."""
    last = seen.last
    for module in reversed(seen.order):
        out = seen.outputs[module]
        if module is layers[-1]:
            out = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out) and out.shape == last.shape and torch.equal(out, last):
                return nn.Identity()
            break
        if torch.is_tensor(out) and out.shape == last.shape and torch.equal(out, last):
            return module
    raise MultitokenError(f"cannot find the final norm of {type(model).__name__}", "--trunk")


def _rotary(seen: _Probe) -> nn.Module | None:
    """The child whose output the layers take as their ``position_embeddings``: the rotary
    embedding, whatever it returns (cos and sin; DeepSeek-V2's complex frequencies)."""
    given = seen.layer_kwargs.get("position_embeddings")
    if given is None:
        return None
    return next((m for m, out in zip(seen.order, seen.calls) if out is given), None)


def build_trunk(preset: str, tokenizer) -> PreTrainedModel:
    """A randomly initialised Llama trunk of a named preset, sized for ``tokenizer``."""
    config = PRESETS[preset].llama_config(
        tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    )
    return AutoModelForCausalLM.from_config(config)


def load_causal_lm(
    folder: Path, flag: str, *, warnings: bool = True, **options: Any
) -> PreTrainedModel | tuple[PreTrainedModel, dict]:
    """``AutoModelForCausalLM.from_pretrained`` of a local model folder: offline, quietly (see
    :func:`quiet_transformers`), and whatever a damaged or foreign folder makes transformers
    raise is one line naming the folder. ``options`` go to ``from_pretrained`` (with
    ``output_loading_info=True`` it returns the model and that info)."""
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with quiet_transformers(warnings=warnings):
            return AutoModelForCausalLM.from_pretrained(
                folder, config=config, local_files_only=True, **options
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise MultitokenError(
            f"cannot load a causal LM from {folder}: {first_line(exc)}", flag
        ) from None


def load_trunk(path: str | Path, flag: str = "--trunk") -> PreTrainedModel:
    """A local `transformers` causal-LM folder, or a GGUF file (:mod:`multitoken.io.gguf`).
    Nothing is fetched from a hub."""
    p = Path(path)
    if is_gguf(p):
        return load_gguf_trunk(p, flag)
    if not (p / "config.json").is_file():
        raise MultitokenError(f"{p} is not a transformers model folder (no config.json)", flag)
    return load_causal_lm(p, flag)
