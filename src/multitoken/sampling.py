"""Token choice and the speculative-sampling acceptance rule.

``probs`` turns logits into the distribution decoding samples from (temperature, top-k, top-p);
greedy decoding is temperature 0. ``accept_greedy`` and ``accept_sampled`` implement step 3 of
shared/DESIGN.md §Inference: the longest matching prefix plus a bonus token, and the rule of
Leviathan et al. 2023 / Chen et al. 2023 — accept draft d_j with probability
min(1, p_j(d_j) / q_j(d_j)), else sample from norm(max(0, p_j − q_j)) and stop; if every draft is
accepted, sample the bonus from p_{K+1}. The output is then distributed exactly as the trunk's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    # the values are checked once, by multitoken.config.GenerateConfig.validate

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k and top-p."""
    x = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < x.size(-1):
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, order, sorted_p)
        p = p / p.sum(-1, keepdim=True)
    return p


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None):
    """One token per distribution from [..., V] logits: (tokens [...], q [..., V] or None when
    greedy)."""
    if sampling.greedy:
        return logits.argmax(-1), None
    q = probs(logits, sampling)
    flat = q.reshape(-1, q.size(-1))  # multinomial takes [N, V]
    tokens = torch.multinomial(flat, 1, generator=generator).view(q.shape[:-1])
    return tokens, q


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """drafts [K], target [K+1] (the trunk's argmax at each verified position).

    Returns (m, bonus): the number of leading drafts equal to the trunk's choice, and the trunk's
    token after them."""
    K = drafts.numel()
    mismatch = (drafts != target[:K]).nonzero()
    m = int(mismatch[0]) if mismatch.numel() else K
    return m, int(target[m])


def accept_greedy_rows(drafts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`accept_greedy` for a batch, on the device: drafts [B, K], target [B, K+1] -> m [B],
    each row's number of leading drafts equal to the trunk's choice (its bonus is target[r, m])."""
    K = drafts.size(1)
    return (drafts == target[:, :K]).long().cumprod(dim=1).sum(dim=1)


def accept_sampled(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """drafts [K], q [K, V] draft distributions, p [K+1, V] trunk distributions -> (m, next)."""
    K = drafts.numel()
    idx = torch.arange(K)
    ratio = p[idx, drafts] / q[idx, drafts].clamp_min(1e-30)  # q(d) > 0: d was sampled from q
    u = torch.rand(K, generator=generator, device=p.device)
    rejected = (u >= ratio.clamp(max=1.0)).nonzero()
    if not rejected.numel():
        return K, int(torch.multinomial(p[K], 1, generator=generator))
    m = int(rejected[0])
    residual = (p[m] - q[m]).clamp_min(0.0)
    total = residual.sum()
    # p == q on the support: the residual is empty, and any rejection had probability zero
    dist = residual / total if total > 0 else p[m]
    return m, int(torch.multinomial(dist, 1, generator=generator))


def accept_typical(
    drafts: torch.Tensor, p: torch.Tensor, eps: float, generator: torch.Generator | None
) -> tuple[int, int]:
    """Medusa's typical acceptance (Cai et al. 2024, §2.3.1) — LOSSY, opt-in.

    Accept d_j while p_j(d_j) > min(ε, α·exp(−H(p_j))) with α = √ε (Medusa's defaults pair
    ε = 0.09 with α = 0.3), then sample the next token from p_{m+1}. Plausible continuations are
    kept even where the trunk would rarely have sampled them, so the output no longer follows the
    trunk's distribution exactly. drafts [K], p [K+1, V] -> (m, next)."""
    K = drafts.numel()
    idx = torch.arange(K)
    entropy = -(p[:K] * p[:K].clamp_min(1e-30).log()).sum(-1)  # [K]
    threshold = torch.minimum(torch.full_like(entropy, eps), eps**0.5 * torch.exp(-entropy))
    rejected = (p[idx, drafts] <= threshold).nonzero()
    m = int(rejected[0]) if rejected.numel() else K
    return m, int(torch.multinomial(p[m], 1, generator=generator))
