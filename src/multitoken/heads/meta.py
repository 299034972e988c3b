"""Meta's parallel transformer heads (Gloeckle et al. 2024, "Better & Faster LLMs via MTP").

The trunk is shared up to branch layer b; head k is one transformer layer (the trunk's own layer
class) over the residual stream entering layer b, followed by the trunk's final norm and
unembedding (both shared). With b = L-1 the trunk's last layer is the next-token head and the D
head layers sit beside it. With a draft vocabulary (``--draft-vocab N``) the shared unembedding is
used over N tokens only (:mod:`multitoken.heads.draft_vocab`).
"""

from __future__ import annotations

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.decode.kvcache import RaggedCache
from multitoken.heads.base import Committed, HeadInputs, MTPHeads, register
from multitoken.heads.draft_vocab import DraftVocab
from multitoken.training.losses import LossOutput, cross_entropy
from multitoken.trunk import TrunkParts, layer_kind, run_layer


@register
class MetaHeads(DraftVocab, MTPHeads):
    family = "meta"

    def __init__(self, parts: TrunkParts, config: HeadConfig) -> None:
        super().__init__()
        self.parts = parts
        self.depth = config.depth
        self.branch_layer = config.resolved_branch_layer(parts.num_layers)
        b = self.branch_layer
        self.layers = nn.ModuleList(parts.new_layer(like=b) for _ in range(self.depth))
        # each head attends as layer b does (a sliding window where b slides one), in training
        # and in decoding alike
        self.kind = parts.block_kind(like=b)
        self._init_draft_vocab(getattr(config, "draft_vocab", None))
        if config.init_from_trunk:  # on a pretrained trunk each head starts as layer b's twin
            for layer in self.layers:
                layer.load_state_dict(parts.layers[b].state_dict())

    def head_logits(self, k: int, branch_hidden: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """Head k+1's logits from the stream entering layer b: [B, T, d] -> [B, T, V] (or N)."""
        h = run_layer(self.layers[k], branch_hidden, block_kwargs)
        return self.unembed_draft(self.parts.final_norm(h))

    def main_logits(self, branch_hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """The trunk's own next-token path from layer b on: layers b..L-1, final norm, lm_head,
        each layer with the mask of its own kind (``layer_kwargs`` are layer b's)."""
        by_kind: dict[str, dict] = {}
        h = branch_hidden
        for i in range(self.branch_layer, self.parts.num_layers):
            kind = layer_kind(self.parts.config, i)
            if kind not in by_kind:
                by_kind[kind] = self.parts.with_kind(layer_kwargs, branch_hidden, kind)
            h = run_layer(self.parts.layers[i], h, by_kind[kind])
        return self.parts.logits(self.parts.final_norm(h))

    def forward(self, branch_hidden: torch.Tensor, block_kwargs: dict) -> list[torch.Tensor]:
        """Teacher-forced logits of every head over positions 0..T-1 of the stream entering
        layer b [B, T, d]; ``block_kwargs`` over those positions, of any mask kind."""
        kwargs = self.parts.with_kind(block_kwargs, branch_hidden, self.kind)
        return [self.head_logits(k, branch_hidden, kwargs) for k in range(self.depth)]

    def training_logits(self, inputs: HeadInputs) -> list[torch.Tensor]:
        return self(inputs.branch, inputs.block_kwargs)

    # -- decoding ---------------------------------------------------------------------------------
    def new_draft_state(self, batch: int) -> list[RaggedCache]:
        device = self.parts.embed.weight.device
        return [RaggedCache(batch, device) for _ in range(self.depth)]

    def select_draft_rows(self, caches: list[RaggedCache], rows: torch.Tensor):
        for kv in caches:
            kv.select(rows)
        return caches

    def join_draft_rows(self, caches: list[RaggedCache], other: list[RaggedCache]):
        for kv, theirs in zip(caches, other):
            kv.extend(theirs)
        return caches

    def draft_logits(self, caches: list[RaggedCache], step: Committed, K: int) -> torch.Tensor:
        """Heads 1..K extend their KV caches over each row's newly committed positions of the
        branch stream (committed positions only, so the caches never need rolling back); the
        drafts are the heads' outputs at each row's newest position.
        Returns logits [B, K, V]."""
        stream = step.branch  # [B, n, d]; row r's first new[r] slots are its new positions
        B, n = stream.shape[:2]
        device = stream.device
        positions = torch.tensor(step.start, device=device)[:, None] + torch.arange(
            n, device=device
        )  # [B, n]
        # Every head's cache has committed the same slots of every row, so one mask and one
        # rotary cos/sin serve all K heads; only the cache each attends over differs.
        assert all(kv.slots == caches[0].slots for kv in caches[:K]), "head caches diverged"
        shared = self.parts.ragged_block_kwargs(stream, positions, caches[0], self.kind)
        newest = (torch.tensor(step.new, device=device) - 1).clamp(min=0)
        last = []
        for k in range(K):
            name = self.parts.cache_name
            kwargs = {**shared, name: caches[k].cache} if name in shared else shared
            h = run_layer(self.layers[k], stream, kwargs)  # [B, n, d]
            last.append(h[torch.arange(B, device=device), newest])
        for kv in caches[:K]:
            kv.commit(step.new)  # counts as a list: no device sync
        logits = self.unembed_draft(self.parts.final_norm(torch.stack(last, dim=1)))
        return self.full_logits(logits)  # [B, K, V]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters every head also uses (final norm, unembedding)."""
        seen: dict[int, nn.Parameter] = {}
        for module in (self.parts.final_norm, self.parts.unembed):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def headwise_loss(
        self,
        branch_hidden: torch.Tensor,
        layer_kwargs: dict,
        labels: list[torch.Tensor],
        weights: list[float],
    ) -> LossOutput:
        """Memory-efficient loss over the trunk's path (index 0) and every head (1..D)."""
        shared = self.shared_parameters()
        head_kwargs = self.parts.with_kind(layer_kwargs, branch_hidden, self.kind)
        trunk_path = [
            p for layer in self.parts.layers[self.branch_layer :] for p in layer.parameters()
        ]
        paths = [(lambda s: self.main_logits(s, layer_kwargs), trunk_path + shared)]
        for k in range(self.depth):
            paths.append(
                (
                    lambda s, k=k: self.head_logits(k, s, head_kwargs),
                    list(self.layers[k].parameters()) + shared,
                )
            )
        params = list({id(p): p for _, ps in paths for p in ps if p.requires_grad}.values())
        total, losses, accs = HeadwiseLoss.apply(branch_hidden, paths, labels, weights, *params)
        return LossOutput(total, losses[0], accs[0], losses[1:], accs[1:])


class HeadwiseLoss(torch.autograd.Function):
    """Meta's memory-efficient head-by-head backward (Gloeckle et al. 2024, §2 and Fig. 2).

    The trunk runs up to the branch layer once. Forward then takes each output path in turn — the
    trunk's own remaining layers first, then each head — on a detached copy of the branch stream,
    computes its loss and, at once, the gradients w.r.t. that stream and the path's parameters,
    and frees its activations and logits before the next path. Peak memory is the shared trunk
    plus the largest single path, instead of the trunk plus every path (logits: O(T·V) instead of
    O(D·T·V)). Backward hands the gathered gradients to autograd, so the shared trunk is
    backpropagated once, inside the ordinary ``loss.backward()`` — which keeps DDP's
    one-forward-one-backward contract. Gradients equal the naive path's (tests/heads/test_heads.py).
    """

    @staticmethod
    def forward(ctx, branch_hidden, paths, labels, weights, *params):
        stream = branch_hidden.detach().requires_grad_()
        index = {id(p): i for i, p in enumerate(params)}
        grad_stream = None
        grads: list[torch.Tensor | None] = [None] * len(params)  # no zero-filled accumulators
        total = branch_hidden.new_zeros((), dtype=torch.float32)
        losses, accs = [], []
        for (logits_fn, path_params), label, weight in zip(paths, labels, weights):
            mine = [p for p in path_params if id(p) in index]
            with torch.enable_grad():
                loss, acc = cross_entropy(logits_fn(stream), label)
                got = torch.autograd.grad(weight * loss, [stream, *mine], allow_unused=True)
            grad_stream = got[0] if grad_stream is None else grad_stream.add_(got[0])
            for p, g in zip(mine, got[1:]):
                i = index[id(p)]
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
            total += weight * loss.detach()
            losses.append(loss.detach())
            accs.append(acc)
        ctx.grad_stream, ctx.grads = grad_stream, grads
        losses, accs = torch.stack(losses), torch.stack(accs)
        ctx.mark_non_differentiable(losses, accs)
        return total, losses, accs

    @staticmethod
    def backward(ctx, grad_total, _grad_losses, _grad_accs):
        # Backward runs once per forward, so the stored gradients can be scaled in place.
        grads = [g.mul_(grad_total.to(g.dtype)) if g is not None else None for g in ctx.grads]
        grad_stream = ctx.grad_stream.mul_(grad_total.to(ctx.grad_stream.dtype))
        ctx.grad_stream = ctx.grads = None
        return (grad_stream, None, None, None, *grads)
