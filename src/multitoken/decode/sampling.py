"""Token choice and the speculative-sampling acceptance rule.

``probs`` turns logits into the distribution decoding samples from (temperature, top-k, top-p);
greedy decoding is temperature 0. ``accept_greedy_rows`` and ``accept_sampled_rows`` implement step 3 of
docs/design.md §Inference: the longest matching prefix plus a bonus token, and the rule of
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


def probs(logits: torch.Tensor, sampling: Sampling | RowSampling) -> torch.Tensor:
    """[B, ..., V] logits -> [B, ..., V] float32 probabilities after temperature, top-k and
    top-p (each row's own with :class:`RowSampling`, where a greedy row's are the point mass
    on its argmax)."""
    if isinstance(sampling, RowSampling):
        return sampling.probs(logits)
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


def log_chances(logits: torch.Tensor, sampling: Sampling | RowSampling) -> torch.Tensor:
    """[B, ..., V] log-probabilities that rank draft candidates: the draft's own softmax for
    greedy rows (a point mass would rank every candidate but one at -inf), the sampling law's
    for sampled ones."""
    if sampling.greedy:
        return logits.float().log_softmax(-1)
    if isinstance(sampling, RowSampling):
        return sampling.log_chances(logits)
    return probs(logits, sampling).log()


@dataclass(frozen=True)
class RowSampling:
    """Each batch row's own :class:`Sampling` (a server's requests, decoded together). Where
    rows differ, a greedy row's law is the point mass on its argmax: speculative sampling with
    point masses accepts exactly the drafts equal to the argmax and then emits the argmax, so
    such a row decodes exactly as greedy decoding would, in the same batch as sampled rows."""

    rows: tuple[Sampling, ...]

    @property
    def greedy(self) -> bool:
        return all(s.greedy for s in self.rows)

    def _groups(self) -> dict[Sampling, list[int]]:
        groups: dict[Sampling, list[int]] = {}
        for b, s in enumerate(self.rows):
            groups.setdefault(s, []).append(b)
        return groups

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, ..., V] -> [B, ..., V]: one computation per distinct setting."""
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for setting, rows in self._groups().items():
            index = torch.tensor(rows, device=logits.device)
            part = logits[index]
            if setting.greedy:
                p = torch.zeros(part.shape, dtype=torch.float32, device=part.device)
                p.scatter_(-1, part.argmax(-1, keepdim=True), 1.0)
            else:
                p = probs(part, setting)
            out[index] = p
        return out

    def log_chances(self, logits: torch.Tensor) -> torch.Tensor:
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for setting, rows in self._groups().items():
            index = torch.tensor(rows, device=logits.device)
            out[index] = log_chances(logits[index], setting)
        return out


@dataclass(frozen=True)
class RowGenerators:
    """One random generator per batch row: a row's draws do not depend on which other rows
    share its batch (a seeded server request repeats whatever else is in flight, given the
    same drafts). Every draw's first dimension is the batch row (:func:`uniform`,
    :func:`categorical`)."""

    rows: tuple[torch.Generator, ...]


Generators = torch.Generator | RowGenerators | None


def uniform(shape: tuple[int, ...], generator: Generators, device) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` (the first dimension: batch rows)."""
    if not isinstance(generator, RowGenerators):
        return torch.rand(shape, generator=generator, device=device)
    return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator.rows])


def categorical(p: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One token per distribution [B, V] -> [B] (``torch.multinomial``)."""
    if not isinstance(generator, RowGenerators):
        return torch.multinomial(p, 1, generator=generator).squeeze(1)
    return torch.cat(
        [
            torch.multinomial(p[b : b + 1], 1, generator=g)[:, 0]
            for b, g in enumerate(generator.rows)
        ]
    )


def draw_tokens(logits: torch.Tensor, sampling: Sampling | RowSampling, generator: Generators):
    """One token per distribution from [B, ..., V] logits: (tokens [B, ...], q [B, ..., V] or
    None when greedy)."""
    if sampling.greedy:
        return logits.argmax(-1), None
    q = probs(logits, sampling)
    B, V = q.size(0), q.size(-1)
    if isinstance(generator, RowGenerators):
        flat = q.reshape(B, -1, V)  # [B, n, V]: each row's draws from its own generator
        tokens = torch.stack(
            [torch.multinomial(flat[b], 1, generator=g)[:, 0] for b, g in enumerate(generator.rows)]
        )
        return tokens.view(q.shape[:-1]), q
    flat = q.reshape(-1, V)  # multinomial takes [N, V]
    tokens = torch.multinomial(flat, 1, generator=generator).view(q.shape[:-1])
    return tokens, q


def accept_greedy_rows(drafts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Greedy acceptance for a batch, on the device: drafts [B, K], target [B, K+1] -> m [B],
    each row's number of leading drafts equal to the trunk's choice (its bonus is target[r, m])."""
    K = drafts.size(1)
    return (drafts == target[:, :K]).long().cumprod(dim=1).sum(dim=1)


def accept_sampled_rows(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: Generators,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for a batch, on the device: drafts [B, K], q [B, K, V] the draft
    distributions, p [B, K+1, V] the trunk's -> (m [B], next [B]).

    Row r accepts d_j while u_j < p_j(d_j) / q_j(d_j); at the first rejection j = m it samples
    from norm(max(0, p_m − q_m)); when all K are accepted, from p_{K+1} (taken here as the
    residual against q_{K+1} = 0)."""
    B, K = drafts.shape
    rows = torch.arange(B, device=p.device)
    index = drafts[..., None]  # [B, K, 1]
    ratio = p[:, :K].gather(-1, index) / q.gather(-1, index).clamp_min(1e-30)  # q(d) > 0
    u = uniform((B, K), generator, p.device)
    m = (u < ratio.squeeze(-1).clamp(max=1.0)).long().cumprod(dim=1).sum(dim=1)  # [B]
    q_next = torch.cat([q, q.new_zeros(B, 1, q.size(-1))], dim=1)[rows, m]  # [B, V]
    p_next = p[rows, m]
    return m, categorical(residual(p_next, q_next), generator)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p − q, 0)) over the last dim [..., V]: the law of the token after a draft drawn
    from q is rejected. Where it is empty (p == q on q's support, so the rejection had probability
    zero) p is kept."""
    rest = (p - q).clamp_min(0.0)
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp_min(1e-30), p)


def accept_typical_rows(
    drafts: torch.Tensor, p: torch.Tensor, eps: float, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor]:
    """Medusa's typical acceptance (Cai et al. 2024, §2.3.1) — LOSSY, opt-in.

    Accept d_j while p_j(d_j) > min(ε, α·exp(−H(p_j))) with α = √ε (Medusa's defaults pair
    ε = 0.09 with α = 0.3), then sample the next token from p_{m+1}. Plausible continuations are
    kept even where the trunk would rarely have sampled them, so the output no longer follows the
    trunk's distribution exactly. drafts [B, K], p [B, K+1, V] -> (m [B], next [B])."""
    K = drafts.size(1)
    head = p[:, :K]  # [B, K, V]
    entropy = -(head * head.clamp_min(1e-30).log()).sum(-1)  # [B, K]
    threshold = torch.minimum(torch.full_like(entropy, eps), eps**0.5 * torch.exp(-entropy))
    likely = head.gather(-1, drafts[..., None]).squeeze(-1) > threshold
    m = likely.long().cumprod(dim=1).sum(dim=1)
    p_next = p[torch.arange(p.size(0), device=p.device), m]
    return m, categorical(p_next, generator)
