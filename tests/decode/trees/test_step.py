"""Tree steps (``--tree``) in the decoder: greedy output is the trunk's own, sampled output
follows the trunk's law over the first three tokens, a tree accepts what a chain cannot, and the
tree is checked against the heads before decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, far_heads, hf_greedy, model_of, sample_the_trunks_law

from multitoken.decode.api import generate
from multitoken.errors import MultitokenError
from multitoken.heads import MTPHeads
from multitoken.model import MTPModel


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_greedy_trees_decode_exactly_the_trunks_output(family, trained):
    model = trained(family)
    plain = generate(model, PROMPTS, max_new_tokens=24, speculate=False)
    chain = generate(model, PROMPTS, max_new_tokens=24, tree="chain", draft_len=3)
    for tree in ("2,2,1", "3,2,2"):
        out = generate(model, PROMPTS, max_new_tokens=24, tree=tree)  # one batch of 3
        assert out.tokens == plain.tokens, tree
        assert out.stats.tau >= chain.stats.tau  # the chain is one of the tree's paths
        for prompt, tokens in zip(PROMPTS, out.tokens):  # each row equals that row alone
            assert generate(model, [prompt], max_new_tokens=24, tree=tree).tokens == [tokens]
    as_chain = generate(model, PROMPTS, max_new_tokens=24, tree="chain:3")
    assert as_chain.tokens == plain.tokens
    assert as_chain.stats.trunk_passes == chain.stats.trunk_passes


class RunnerUpHeads(MTPHeads):
    """Parent-free stub heads whose second-ranked candidate at every depth is the trunk's own
    greedy continuation and whose first is always wrong."""

    def __init__(self, model: MTPModel) -> None:
        super().__init__()
        self.model, self.depth = model, model.depth

    def new_draft_state(self, batch):
        return None

    def draft_logits(self, _state, step, K):
        vocab = self.model.trunk.config.vocab_size
        logits = torch.zeros(len(step.tokens), K, vocab)
        for r, ids in enumerate(step.tokens):
            with torch.no_grad():
                out = self.model.trunk.generate(
                    ids[None], max_new_tokens=K, do_sample=False, pad_token_id=0
                )
            for k, token in enumerate(out[0, ids.numel() :].tolist()):
                logits[r, k, token] = 1.0
                logits[r, k, (token + 1) % vocab] = 2.0
        return logits


def test_a_tree_accepts_the_runner_up_a_chain_never_sees():
    model = model_of("bpd", depth=2)
    model.heads = RunnerUpHeads(model)
    chain = generate(model, PROMPTS, max_new_tokens=12, tree="chain", draft_len=2)
    tree = generate(model, PROMPTS, max_new_tokens=12, tree="2,2")
    assert chain.stats.acceptance == [0.0, 0.0]
    assert tree.stats.acceptance == [1.0, 1.0]
    for prompt, tokens in zip(PROMPTS, tree.tokens):
        assert tokens == hf_greedy(model, prompt, 12) == chain.tokens[PROMPTS.index(prompt)]


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_sampling_through_a_tree_follows_the_trunks_law(family):
    """Width 2 at both depths (candidates drawn from the heads' distribution without
    replacement, multi-candidate rejection): the first three tokens keep the trunk's law."""
    out = sample_the_trunks_law(far_heads(family), tree="2,2", seed=5)
    assert 0 < out.stats.acceptance[0] < 1


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_dynamic_trees_are_each_rows_own_and_decode_the_trunks_output(family, monkeypatch, trained):
    """``--tree dynamic:N``: every step each row verifies its own N best nodes by the product of
    draft probabilities (EAGLE-2); rows of one batch get different shapes."""
    from multitoken.decode.trees.step import RowTrees

    model = trained(family)
    shapes = []
    propose = RowTrees.propose

    def spy(*args, **kwargs):
        out = propose(*args, **kwargs)
        shapes.append({tree.parent for tree in out.trees})
        assert len(out.trees) == out.tokens.size(0)  # one tree per row
        assert all(tree.size == 7 for tree in out.trees)  # the pending token and 6 drafts
        return out

    monkeypatch.setattr(RowTrees, "propose", spy)
    plain = generate(model, PROMPTS, max_new_tokens=24, speculate=False)
    out = generate(model, PROMPTS, max_new_tokens=24, tree="dynamic:6")
    assert out.tokens == plain.tokens
    assert any(len(s) > 1 for s in shapes)  # some step had rows of different shapes
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert generate(model, [prompt], max_new_tokens=24, tree="dynamic:6").tokens == [tokens]


@pytest.mark.parametrize("family", ["bpd", "deepseek"])
def test_sampling_through_dynamic_trees_follows_the_trunks_law(family):
    out = sample_the_trunks_law(far_heads(family), tree="dynamic:4", seed=3)
    assert 0 < out.stats.acceptance[0] < 1


@pytest.mark.parametrize("family", ["meta", "deepseek"])
def test_trees_on_a_sliding_window_trunk_decode_past_its_window(family, trained):
    """Mistral-style attention over the last 6 tokens: the trunk's tree masks and DeepSeek's
    module masks slide by position, per row, static and per-row dynamic trees alike."""
    model = trained(family, window=6)
    plain = generate(model, PROMPTS, max_new_tokens=20, speculate=False)
    for tree in ("2,2", "dynamic:5"):
        out = generate(model, PROMPTS, max_new_tokens=20, tree=tree)
        assert out.tokens == plain.tokens and out.stats.tau > 1.3, tree


def test_deepseek_trees_run_past_the_last_module_and_over_one_token_prompts(trained):
    """K > D reuses the last module (as the chain does); a one-token prompt puts module k's
    first nodes at negative positions, which exist for no one."""
    model = trained("deepseek")  # D = 3
    prompts = [[7], *PROMPTS]
    plain = generate(model, prompts, max_new_tokens=16, speculate=False)
    out = generate(model, prompts, max_new_tokens=16, tree="2,1,1,1")
    assert out.tokens == plain.tokens and max(out.stats.draft_lens) == 4


def test_a_tree_is_checked_against_the_heads_before_decoding():
    with pytest.raises(MultitokenError, match="3 deep") as err:
        generate(model_of("bpd", depth=2), PROMPTS, max_new_tokens=4, tree="2,2,2")
    for bad in ("2,x", "dynamic:0", "dynamic:", "dynamic:999"):
        with pytest.raises(MultitokenError) as err:
            generate(model_of("bpd", depth=2), PROMPTS, max_new_tokens=4, tree=bad)
        assert err.value.flag == "--tree"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("family", ["bpd", "meta"])
def test_a_budget_of_no_drafts_verifies_the_root_alone(family, temperature, monkeypatch, trained):
    """A per-row step whose budget keeps no draft (auto does so where none pays) verifies each
    row's pending token alone, and decodes what plain decoding does."""
    from multitoken.decode.trees.spec import Dynamic

    model = trained(family)
    monkeypatch.setattr(Dynamic, "budget", lambda self, values: 0)
    options = {"max_new_tokens": 12, "temperature": temperature, "seed": 3}
    plain = generate(model, PROMPTS, speculate=False, **options)
    for tree in ("dynamic:4", "dynamic:4+lookup"):
        out = generate(model, PROMPTS, tree=tree, **options)
        assert out.tokens == plain.tokens and set(out.stats.nodes) == {1}
