"""The rungs of a decoding step on hand-made inputs: accept keeps each row's longest correct
prefix and the bonus, emit cuts at budgets and stop tokens in the caller's row order, retire
takes finished rows out of every buffer."""

from __future__ import annotations

import torch

from multitoken.config import GenerateConfig
from multitoken.decode.chain import ChainProposal
from multitoken.decode.kvcache import RaggedCache
from multitoken.decode.phases import Decoding, Plan, Verified, emit, retire
from multitoken.decode.sampling import Sampling

V = 8


def plan(max_new: int = 10, stop: frozenset = frozenset(), temperature: float = 0.0) -> Plan:
    cfg = GenerateConfig(max_new_tokens=max_new, temperature=temperature)
    gen = torch.Generator().manual_seed(0) if temperature else None
    return Plan(
        cfg=cfg, k_max=3, auto=False, sampling=Sampling(temperature=temperature), stop=stop, gen=gen
    )


def one_hot_logits(choices: list[list[int]]) -> torch.Tensor:
    """[B, K+1, V] logits whose argmax at each position is ``choices[b][j]``."""
    logits = torch.zeros(len(choices), len(choices[0]), V)
    for b, row in enumerate(choices):
        for j, t in enumerate(row):
            logits[b, j, t] = 5.0
    return logits


def test_greedy_accept_keeps_each_rows_longest_correct_prefix_and_the_bonus():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 2, 3]])
    trunk = [[1, 2, 3, 7], [1, 5, 3, 7], [1, 2, 3, 7]]  # row 0 all, row 1 one, row 2 none
    verified = Verified(one_hot_logits(trunk), None, None)
    result = ChainProposal(drafts, None, 3).accept(verified, plan())
    assert result.tokens == [[1, 2, 3, 7], [1, 5], [1]]
    for row, got in zip(result.new.tolist(), result.tokens):
        assert row[: len(got)] == got


def test_a_plain_sampled_step_draws_one_token_per_row_from_the_trunk():
    logits = torch.full((2, 1, V), -1e9)
    logits[0, 0, 3] = logits[1, 0, 6] = 0.0  # each row's distribution is a point mass
    plain = ChainProposal(torch.zeros(2, 0, dtype=torch.long), None, 0)
    assert plain.accept(Verified(logits, None, None), plan(temperature=1)).tokens == [[3], [6]]


def decoding(rows: list[int], out: list[list[int]]) -> Decoding:
    B = len(rows)
    kv = RaggedCache(batch=B, device=torch.device("cpu"))
    kv.commit([4] * B)
    tokens = torch.arange(B * 6).view(B, 6)
    return Decoding(
        kv=kv,
        tokens=tokens,
        length=[4] * B,
        pending=tokens[:, 3],
        undrafted=[],
        heads=None,
        rows=rows,
        out=out,
        history=tokens[:, :4].tolist(),
    )


def test_emit_cuts_at_the_budget_and_through_a_stop_token_in_the_callers_rows():
    out = [[9], [], [9, 9]]
    state = decoding(rows=[2, 0], out=out)  # batch row 0 is the caller's prompt 2
    streamed = []
    on_tokens = lambda row, tokens: streamed.append((row, tokens))  # noqa: E731
    done = emit(state, [[1, 2, 3], [4, 5, 6]], plan(max_new=4, stop=frozenset({5})), on_tokens)
    assert out == [[9, 4, 5], [], [9, 9, 1, 2]]
    assert streamed == [(2, [1, 2]), (0, [4, 5])]
    assert done == [0, 1]  # prompt 2 spent its budget, prompt 0 wrote the stop token


def test_retire_takes_finished_rows_out_of_every_buffer():
    state = decoding(rows=[0, 1, 2], out=[[], [], []])
    kept_tokens = state.tokens[[0, 2]].clone()
    kept_history = [state.history[0], state.history[2]]
    retire(None, state, done=[1])
    assert state.history == kept_history
    assert state.rows == [0, 2] and state.kv.batch == 2
    assert torch.equal(state.tokens, kept_tokens) and state.pending.tolist() == [3, 15]
    retire(None, state, done=[0, 1])
    assert state.rows == []
