"""MTPModel: a `transformers` trunk plus one family of MTP heads, and the training forward.

The trunk stays an ordinary causal LM (``model.trunk``): dropping the heads is decoding method 1.
The training forward returns the λ-weighted loss of docs/design.md with the trunk's loss and
each head's loss and accuracy reported separately.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from multitoken.config import HEAD_LABELS, SOFT_TOP_K, HeadConfig
from multitoken.decode.kvcache import refuse_recurrent
from multitoken.errors import MultitokenError
from multitoken.heads import HeadInputs, MTPHeads, build_heads, head_class
from multitoken.training.losses import (
    LossOutput,
    cross_entropy,
    greedy_path_labels,
    shift_labels,
    soft_cross_entropy,
    soft_labels,
    trunk_top_k,
)
from multitoken.trunk import TrunkParts, inspect_trunk, layer_arguments, watch_states


class _StopForward(Exception):
    """Raised from a pre-hook to end the trunk's forward early, carrying what the layer got."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict) -> None:
        super().__init__("stop")
        self.hidden, self.kwargs = hidden, kwargs


@dataclass
class TrunkOutput:
    logits: torch.Tensor  # [B, T, V] the trunk's next-token logits
    hidden: torch.Tensor  # [B, T, d] h^0, after the final norm
    branch_hidden: torch.Tensor | None  # [B, T, d] stream entering the branch layer (meta)
    block_kwargs: dict  # decoder-layer kwargs for positions 0..T-1 (mask, rotary)


@dataclass
class TrunkFeatures:
    """What the heads read of a frozen trunk's forward over rows ``tokens[:, :T]``, computed
    before (``multitoken.training.featcache``): the states and, per row, the trunk's own next-token
    loss summed over the row, its top-1 hits and the number of labels, from which the main
    loss and accuracy of any batch of rows follow; and the trunk's predictions the heads may
    learn instead of the text (``--labels trunk``, ``--labels soft``)."""

    states: torch.Tensor  # [B, T, d] h^0 (bpd, deepseek) or the stream entering layer b (meta)
    main_nll: torch.Tensor  # [B] float32
    main_hits: torch.Tensor  # [B] float32
    main_count: torch.Tensor  # [B] float32
    greedy: torch.Tensor | None = None  # [B, T] the trunk's top-1 token at each position
    # multitoken.training.losses.trunk_top_k of the trunk's logits: [B, T, k] long ids, likeliest first
    # (topk_ids[..., 0] is ``greedy``), and [B, T, k] float32 probabilities renormalised over
    # them (rounded to fp16, as the cache stores them)
    topk_ids: torch.Tensor | None = None
    topk_probs: torch.Tensor | None = None


class MTPModel(nn.Module):
    def __init__(
        self,
        trunk: PreTrainedModel,
        head_config: HeadConfig | None,
        heads: MTPHeads | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.parts: TrunkParts = inspect_trunk(trunk)
        self.head_config = head_config  # None: a trunk without MTP heads (decodes plainly)
        if head_config is None:
            self.heads = None
        else:
            vocab = self.parts.unembed.weight.shape[0]
            head_config.validate(num_layers=self.parts.num_layers, vocab_size=vocab)
            refuse_recurrent(trunk.config)
            self.parts.refuse_foreign(head_class(head_config.family).copies_trunk_layers)
            self.heads = heads if heads is not None else build_heads(self.parts, head_config)
        self.tokenizer = None  # set by multitoken.load

    def generate(
        self, prompts: str | list[str], *, add_special_tokens: bool = True, **options
    ) -> tuple[list[str], dict]:
        """Text in, text out: ``model.generate("def f(", max_new_tokens=64, draft_len=3)``.

        Prompts are encoded as transformers' ``tokenizer(prompt)`` (with a BOS, for tokenizers
        that add one); pass ``add_special_tokens=False`` for text that spells its special tokens
        itself, e.g. a chat rendered with ``model.tokenizer.apply_chat_template``.
        Options are those of :class:`multitoken.config.GenerateConfig`. Returns the generated
        texts and the call's statistics (trunk passes, τ, per-head acceptance, tokens/s)."""
        from multitoken.decode.api import generate

        if self.tokenizer is None:
            raise MultitokenError(
                "this model has no tokenizer; use multitoken.decode.api.generate with token ids",
                "tokenizer",
            )
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        out = generate(self, ids, eos_id=self.stop_ids(), **options)
        return [self.tokenizer.decode(t) for t in out.tokens], out.stats.to_dict()

    def stop_ids(self) -> set[int]:
        """Tokens that end a generation: the tokenizer's eos and whatever the trunk's generation
        config names (a chat model ends its turn with a token of its own, e.g. <|im_end|>)."""
        ids = set() if self.tokenizer is None else {self.tokenizer.eos_id}
        config = getattr(self.trunk, "generation_config", None)
        named = getattr(config, "eos_token_id", None)
        ids.update([named] if isinstance(named, int) else (named or []))
        return ids

    def train(self, mode: bool = True) -> MTPModel:
        """A frozen trunk stays in inference mode (no dropout) while its heads train."""
        super().train(mode)
        if mode and not self.trunk_trainable:
            self.trunk.eval()
        return self

    @property
    def trunk_trainable(self) -> bool:
        """False when the trunk is frozen (heads-only training): it then runs without a graph."""
        return any(p.requires_grad for p in self.trunk.parameters())

    @property
    def family(self) -> str:
        return self.head_config.family if self.head_config else "none"

    @property
    def depth(self) -> int:
        return self.head_config.depth if self.head_config else 0

    @property
    def trained_depth(self) -> int:
        """The drafts along the chain that training teaches and reports (D, or more where a
        module is reused past D: ``--ttt-steps``)."""
        return self.heads.trained_depth if self.heads is not None else 0

    # ------------------------------------------------------------------------------------------
    def trunk_forward(
        self, input_ids: torch.Tensor, branch_layer: int | None = None
    ) -> TrunkOutput:
        """Run the trunk as the causal LM it is, watching h^0 and (optionally) layer b's input."""
        with watch_states(self.parts, branch_layer) as seen:
            logits = self.trunk(input_ids=input_ids, use_cache=False).logits
        hidden = seen["hidden"]
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        return TrunkOutput(
            logits, hidden, seen.get("branch"), self.parts.block_kwargs(hidden, position_ids)
        )

    def trunk_prefix(self, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, dict]:
        """Run the trunk's own forward up to ``layer`` and stop there: the stream entering that
        layer [B, T, d] and the keyword arguments the model passes its layers (mask, rotary)."""

        def stop(module, args, kwargs):
            raise _StopForward(*layer_arguments(module, args, kwargs))

        hook = self.parts.layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.parts.base(input_ids=input_ids, use_cache=False)
        except _StopForward as stopped:
            return stopped.hidden, stopped.kwargs
        finally:
            hook.remove()
        raise RuntimeError(f"the trunk's forward never reached layer {layer}")

    def head_labels(
        self, tokens: torch.Tensor, k: int, greedy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Labels of head k (k >= 1) as its logits index them: over its draft vocabulary, if it
        has one (:meth:`multitoken.heads.draft_vocab.DraftVocab.draft_labels`). ``greedy``
        [B, T]: the frozen trunk's top-1 tokens, for labels from its greedy path instead of the
        text (:func:`multitoken.training.losses.greedy_path_labels`)."""
        labels = (
            shift_labels(tokens, k) if greedy is None else greedy_path_labels(tokens, greedy, k)
        )
        to_draft = getattr(self.heads, "draft_labels", None)
        return labels if to_draft is None else to_draft(labels)

    def forward(
        self,
        tokens: torch.Tensor,
        lam: float,
        memory_efficient: bool = True,
        features: TrunkFeatures | None = None,
        labels: str = "text",
        soft_top_k: int = SOFT_TOP_K,
    ) -> LossOutput:
        """Training forward over packed rows ``tokens`` [B, T+1]: inputs are ``tokens[:, :T]``.

        ``features``: the frozen trunk's states over these rows, computed before (the feature
        cache); the trunk then does not run at all. ``labels``: ``text``, ``trunk`` for a
        frozen trunk's greedy path, or ``soft`` for its next-token distributions over its
        ``soft_top_k`` likeliest tokens (``TrainConfig.labels``; with ``features``, the top-k
        they hold)."""
        if labels not in HEAD_LABELS:
            raise ValueError(f"unknown labels {labels!r} (choose from {', '.join(HEAD_LABELS)})")
        if labels != "text" and self.trunk_trainable:
            raise RuntimeError(f"labels {labels!r} from the trunk's outputs need a frozen trunk")
        inputs = tokens[:, :-1]
        heads = self.heads
        frozen = not self.trunk_trainable
        if features is not None:
            if not frozen:
                raise RuntimeError("precomputed trunk features need a frozen trunk")
            states = features.states.to(self.parts.embed.weight.dtype)
            positions = torch.arange(inputs.size(1), device=states.device).unsqueeze(0)
            count = features.main_count.sum().clamp(min=1)
            main_loss = features.main_nll.sum() / count
            main_acc = features.main_hits.sum() / count
            hidden, branch_hidden = (None, states) if heads.reads_branch else (states, None)
            block_kwargs = self.parts.block_kwargs(states, positions)
            greedy = features.greedy if labels == "trunk" else None
            soft = None
            if labels == "soft":
                if features.topk_ids is None or features.topk_probs is None:
                    raise RuntimeError("soft labels need features holding the trunk's top-k")
                soft = (features.topk_ids, features.topk_probs)
            return self._head_losses(
                tokens, lam, main_loss, main_acc, hidden, branch_hidden, block_kwargs, greedy, soft
            )
        if heads.headwise and memory_efficient and torch.is_grad_enabled() and not frozen:
            branch_hidden, layer_kwargs = self.trunk_prefix(inputs, heads.branch_layer)
            labels = [shift_labels(tokens, 0)]
            labels += [self.head_labels(tokens, k) for k in range(1, self.depth + 1)]
            weights = [1.0, *heads.loss_weights(self.depth, lam)]
            return heads.headwise_loss(branch_hidden, layer_kwargs, labels, weights)
        branch = heads.branch_layer if heads.reads_branch else None
        with torch.no_grad() if frozen else contextlib.nullcontext():  # Medusa-1: heads only
            out = self.trunk_forward(inputs, branch)
        main_loss, main_acc = cross_entropy(out.logits, shift_labels(tokens, 0))
        greedy = out.logits.argmax(-1) if labels == "trunk" else None
        soft = trunk_top_k(out.logits.detach(), soft_top_k) if labels == "soft" else None
        return self._head_losses(
            tokens,
            lam,
            main_loss,
            main_acc,
            out.hidden,
            out.branch_hidden,
            out.block_kwargs,
            greedy,
            soft,
        )

    def _head_losses(
        self,
        tokens: torch.Tensor,
        lam: float,
        main_loss: torch.Tensor,
        main_acc: torch.Tensor,
        hidden: torch.Tensor | None,
        branch_hidden: torch.Tensor | None,
        block_kwargs: dict,
        greedy: torch.Tensor | None = None,
        soft: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LossOutput:
        """The λ-weighted total of the trunk's loss and every head's, from the trunk's states.
        Head k learns the text's token (``greedy`` and ``soft`` None), the trunk's greedy path
        (``greedy`` [B, T]), or the trunk's top-k distribution k positions on (``soft``: ids
        [B, T, K], probs [B, T, K]; :func:`multitoken.training.losses.soft_labels`), over its draft
        vocabulary if it has one."""
        weights = self.heads.loss_weights(self.depth, lam)
        # a module reused past D (training-time test) weighs as much at each step as itself
        weights = weights + weights[-1:] * (self.heads.trained_depth - self.depth)
        pad = self.parts.config.pad_token_id
        inputs = HeadInputs(
            tokens, hidden, branch_hidden, block_kwargs, pad if isinstance(pad, int) else 0
        )
        logits = self.heads.training_logits(inputs)
        to_draft = getattr(self.heads, "draft_labels", None)
        total = main_loss
        losses, accs = [], []
        for k, (w, lg) in enumerate(zip(weights, logits), start=1):
            if soft is None:
                loss_k, acc_k = cross_entropy(lg, self.head_labels(tokens, k, greedy))
            else:
                ids, probs = soft_labels(*soft, k)  # [B, T, K] each
                ids = ids if to_draft is None else to_draft(ids)
                loss_k, acc_k = soft_cross_entropy(lg, ids, probs)
            total = total + w * loss_k
            losses.append(loss_k.detach())
            accs.append(acc_k)
        return LossOutput(
            total, main_loss.detach(), main_acc, torch.stack(losses), torch.stack(accs)
        )
