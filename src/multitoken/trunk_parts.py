"""What MTP heads use of a trunk: :class:`TrunkParts`, references into it, and how a block like
its decoder layers is built and run (masks, rotary embeddings, caches, layer kinds).

Apart from :mod:`multitoken.trunk`, which finds these parts in a loaded model (and loads and
builds trunks), because the heads and the decoder only ever use the parts: they need none of
the discovery. ``multitoken.trunk`` names everything here as well.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from multitoken.decode.kvcache import FULL, SLIDING, RaggedCache, sliding_window
from multitoken.errors import MultitokenError

# Keyword arguments of a decoder layer that this adapter knows how to supply ("cache" stands
# for the layer's own name of its KV cache argument, one of _CACHE_NAMES).
_LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids", "cache", "use_cache")
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


# How architectures turn the unembedding's output into their logits, by the config field that
# switches each on (elementwise, so the rows of a draft vocabulary take it alike): the one place
# the adapter knows such a convention by name.
LOGIT_TRANSFORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "final_logit_softcapping": lambda x, cap: torch.tanh(x / cap) * cap,  # Gemma 2, 3, 4
    "logit_scale": lambda x, scale: x * scale,  # Cohere, Cohere 2
    "logits_scaling": lambda x, scale: x / scale,  # Granite, GraniteMoE
}


@dataclass(eq=False)
class TrunkParts:
    """References into the trunk (not copies): the pieces MTP heads share or imitate."""

    model: PreTrainedModel
    base: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module  # nn.Identity when the model has none
    embed: nn.Module
    unembed: nn.Module
    rotary: nn.Module | None
    layer_kwargs: tuple[str, ...]  # which of _LAYER_KWARGS the base model passes its layers
    cache_name: str = "cache"  # what the decoder layers call their KV cache argument
    # Layer arguments outside _LAYER_KWARGS the base model gives its layers (Gemma-4's
    # per-layer inputs and shared KV, Bloom's ALiBi biases): a head block built from such a
    # layer cannot be given them; ``required_foreign``, those the layer cannot run without
    foreign_args: tuple[str, ...] = ()
    required_foreign: tuple[str, ...] = ()

    def refuse_foreign(self, builds_blocks: bool) -> None:
        """One line where heads cannot work on this trunk: its layers need arguments the
        adapter cannot build (nothing can verify drafts through them), or, for heads that
        build their blocks from its layers (``builds_blocks``), take any it does not know."""
        names = self.required_foreign or (self.foreign_args if builds_blocks else ())
        if names:
            raise MultitokenError(
                f"{type(self.model).__name__}'s decoder layers take {', '.join(names)}, which "
                "this adapter cannot give "
                + ("them" if self.required_foreign else "a head block built from them")
                + " (it builds attention masks, rotary embeddings, positions and KV caches)",
                "--family" if not self.required_foreign else "--trunk",
            )

    @property
    def config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def logits(
        self, x: torch.Tensor, unembed: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The trunk's logits from the final norm's output ``x`` [..., d]: its unembedding (or
        ``unembed``, a restriction of it to a draft vocabulary) followed by whatever the model
        does to its logits (:data:`LOGIT_TRANSFORMS`), so heads score tokens as the trunk does."""
        out = (unembed or self.unembed)(x)
        config = self.config  # looked up once: drafting unembeds every step
        for name, transform in LOGIT_TRANSFORMS.items():
            value = getattr(config, name, None)
            if value:
                out = transform(out, value)
        return out

    def new_layer(self, *, like: int | None = None, mtp_index: int | None = None) -> nn.Module:
        """A fresh decoder layer with a KV-cache slot of its own (``layer_idx`` 0: at decode time
        each head keeps a cache of its own), initialised as the trunk's ``_init_weights`` would.

        ``like=b``: built exactly as the trunk's layer b is (dense or MoE, attention kind), by
        copying that layer's structure; Meta heads sit beside layer b.

        ``mtp_index=k``: built as the block of MTP module k, the way checkpoints that ship MTP
        modules after their last layer define it (DeepSeek-V3 tech report §2.2; transformers'
        ``get_mtp_config``): the class of the trunk's last layer, always MoE where the config
        makes the first layers dense (``first_k_dense_replace``), and the layer kind
        ``mtp_layer_types[k]`` / ``mtp_mlp_layer_types[k]`` (default: the last layer's)."""
        if like is not None:
            layer = copy.deepcopy(self.layers[like])
            built_with = None
            for module in layer.modules():  # hooks others put on the trunk are not the head's
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
        else:
            cls = type(self.layers[-1])
            built_with = mtp_block_config(self.config, mtp_index or 0)
            try:
                layer = cls(built_with, layer_idx=0)
            except (TypeError, ValueError, KeyError, IndexError) as exc:
                raise MultitokenError(
                    f"cannot build a {cls.__name__} for the heads: {exc}".splitlines()[0],
                    "--trunk",
                ) from None
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = 0  # the slot in the head's own cache
            # At run time the layer reads the trunk's own config (attention implementation and
            # the like), as the trunk's layers do, not a copy or the altered one it was built by.
            config = getattr(module, "config", None)
            if isinstance(config, PretrainedConfig) and (config is built_with or like is not None):
                module.config = self.config
        layer.apply(self.model._init_weights)
        return layer.to(device=self.embed.weight.device, dtype=self.embed.weight.dtype)

    def new_norm(self) -> nn.Module:
        """A fresh norm of the trunk's final-norm kind (RMSNorm for Llama) at its identity init."""
        if isinstance(self.final_norm, nn.Identity):
            raise MultitokenError(
                "the trunk has no final norm to copy for the heads' norms", "--trunk"
            )
        norm = copy.deepcopy(self.final_norm)
        for name, param in norm.named_parameters():
            with torch.no_grad():
                param.fill_(0.0 if "bias" in name else 1.0)
        return norm

    def block_kind(self, *, like: int | None = None, mtp_index: int | None = None) -> str:
        """The attention kind (``layer_types`` vocabulary) of the block :meth:`new_layer` builds
        with the same arguments: trunk layer ``like``'s own, or MTP module ``mtp_index``'s."""
        if like is not None:
            return layer_kind(self.config, like)
        declared = mtp_layer_kind(self.config, "layer_types", mtp_index or 0)
        return declared or layer_kind(self.config, -1)

    def window(self, kind: str) -> int | None:
        """The positions a layer of ``kind`` looks back over (None: all of them)."""

        return self.config.sliding_window if kind == SLIDING else None

    def block_kwargs(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        padding_mask: torch.Tensor | None = None,
        kind: str | None = None,
    ) -> dict:
        """The keyword arguments a decoder layer of attention ``kind`` (None: full) needs to run
        over ``hidden`` [B, q, d] at ``position_ids`` [B, q]: the causal mask — with a sliding
        window for a sliding layer — for the attention implementation in use (and, with
        ``padding_mask`` [B, cached + q], cached slots a row must not see; a prepared
        [B, 1, q, cached + q] mask is taken as it is), rotary cos/sin, the cache."""
        kwargs: dict = {}
        if "attention_mask" in self.layer_kwargs:
            kwargs["attention_mask"] = self.attention_mask(
                hidden, position_ids, kind, cache, padding_mask
            )
        if "position_embeddings" in self.layer_kwargs and self.rotary is not None:
            kwargs["position_embeddings"] = self.position_embeddings(hidden, position_ids, kind)
        if "position_ids" in self.layer_kwargs:
            kwargs["position_ids"] = position_ids
        if "cache" in self.layer_kwargs:
            kwargs[self.cache_name] = cache
        if "use_cache" in self.layer_kwargs:
            kwargs["use_cache"] = cache is not None
        return kwargs

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) a layer of attention ``kind`` (None: full) reads at
        ``position_ids``. Models whose layer kinds rotate differently (Gemma-3: local and
        global rope bases) give their rotary embedding the kind, as their own forward does."""
        if not _takes_layer_type(type(self.rotary)):
            return self.rotary(hidden, position_ids=position_ids)
        if kind is None:  # full attention, where the model has full layers at all
            kinds = getattr(self.config, "layer_types", None) or [FULL]
            kind = FULL if FULL in kinds else kinds[-1]
        return self.rotary(hidden, position_ids=position_ids, layer_type=kind)

    def attention_mask(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        kind: str | None,
        cache=None,
        padding_mask: torch.Tensor | None = None,
    ) -> Any:
        """The ``attention_mask`` argument of :meth:`block_kwargs`, in the form the attention
        implementation in use takes (None where it needs none)."""
        sliding = kind is not None and self.window(kind) is not None
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        return make_mask(self.config, hidden, padding_mask, cache, position_ids=position_ids)

    def with_kind(self, kwargs: dict, hidden: torch.Tensor, kind: str) -> dict:
        """Training-time ``kwargs`` of a forward over positions 0..T-1 of ``hidden`` [B, T, d]
        (no cache) with the attention mask (and the rotary, where it depends on the kind) a
        layer of ``kind`` takes. Whoever built ``kwargs``
        (the trunk for its layer b, :meth:`block_kwargs` for a full layer) need not have built
        them for this kind, and a head must attend in training as it will in decoding."""
        positions = torch.arange(hidden.size(1), device=hidden.device).unsqueeze(0)
        kwargs = dict(kwargs)
        if "attention_mask" in self.layer_kwargs:
            kwargs["attention_mask"] = self.attention_mask(hidden, positions, kind)
        if "position_embeddings" in kwargs and _takes_layer_type(type(self.rotary)):
            kwargs["position_embeddings"] = self.position_embeddings(hidden, positions, kind)
        return kwargs

    def ragged_block_kwargs(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, kv: RaggedCache, kind: str
    ) -> dict:
        """:meth:`block_kwargs` for q new slots ``hidden`` [B, q, d] over a head's own ragged
        cache ``kv``, row r's at positions ``position_ids[r, 0]`` onwards. Once a row has holes
        its slots are not its positions, and transformers would slide the window over slots:
        a sliding layer's mask is then built from positions (``RaggedCache.window_mask``)."""
        window = self.window(kind)
        q = hidden.size(1)
        if kv.ragged and window is not None:
            mask = kv.window_mask(position_ids[:, 0], q, window, hidden.dtype)
        else:
            mask = kv.padding_mask(q)
        return self.block_kwargs(hidden, position_ids, kv.cache, mask, kind)


@functools.cache
def _takes_layer_type(cls: type) -> bool:
    """Whether a rotary embedding class computes (cos, sin) per layer kind."""
    return "layer_type" in inspect.signature(cls.forward).parameters


def layer_kind(config, index: int) -> str:
    """The attention kind of trunk layer ``index`` as transformers' models choose its mask:
    ``layer_types[index]`` where the config lists per-layer kinds (Qwen2, Gemma), else sliding
    wherever the config sets a window for every layer (Mistral), else full attention."""

    kinds = getattr(config, "layer_types", None)
    if kinds:
        return kinds[index]
    return SLIDING if sliding_window(config) is not None else FULL


def mtp_layer_kind(config, name: str, mtp_index: int) -> str | None:
    """The entry of the per-layer list ``name`` (``layer_types``, ``mlp_layer_types``) that MTP
    module ``mtp_index``'s block has: ``mtp_<name>`` where the config declares it, else the last
    trunk layer's. None when the config has no such list."""
    kinds = getattr(config, name, None)
    if not kinds:
        return None
    declared = getattr(config, f"mtp_{name}", None)
    return declared[mtp_index] if declared and mtp_index < len(declared) else kinds[-1]


def mtp_block_config(config, mtp_index: int):
    """The config to build MTP module ``mtp_index``'s block from with ``layer_idx`` 0: the trunk's
    own config object when nothing differs, else a copy whose per-layer fields describe the
    block at every index."""
    changes: dict = {}
    if getattr(config, "first_k_dense_replace", None):  # DeepSeek-V3's MTP layers are MoE
        changes["first_k_dense_replace"] = 0
    for name in ("layer_types", "mlp_layer_types"):
        kind = mtp_layer_kind(config, name, mtp_index)
        kinds = getattr(config, name, None)
        if kind is not None and any(k != kind for k in kinds):
            changes[name] = [kind] * len(kinds)
    if not changes:
        return config
    config = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def layer_arguments(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Name every argument of a decoder-layer call (some models pass the mask or the cache
    positionally): the hidden states, and the rest as keyword arguments."""
    bound = inspect.signature(layer.forward).bind_partial(*args, **kwargs).arguments
    extra = bound.pop(next(iter(inspect.signature(layer.forward).parameters)))  # hidden states
    named = {k: v for k, v in bound.items() if k != "kwargs"}
    named.update(bound.get("kwargs", {}))
    return extra, named


@contextlib.contextmanager
def watch_states(parts: TrunkParts, branch_layer: int | None = None):
    """While open, every trunk forward records into the yielded dict: ``"hidden"``, h^0 (the
    final norm's output, what lm_head reads) and, with ``branch_layer``, ``"branch"``, the stream
    entering that layer. The hooks are registered once for the whole block."""
    seen: dict[str, torch.Tensor] = {}
    final = parts.layers[-1] if isinstance(parts.final_norm, nn.Identity) else parts.final_norm

    def grab_final(_module, _args, output):
        seen["hidden"] = output[0] if isinstance(output, tuple) else output

    def grab_branch(module, args, kwargs):
        # Positional: the first argument is the stream (binding the signature costs ~70 µs)
        seen["branch"] = args[0] if args else layer_arguments(module, args, kwargs)[0]

    hooks = [final.register_forward_hook(grab_final)]
    if branch_layer is not None:
        layer = parts.layers[branch_layer]
        hooks.append(layer.register_forward_pre_hook(grab_branch, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a decoder layer; some architectures still return a tuple whose first item is it."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
