"""Host reads of the device per decoding step (issue 20): a chain step and a static tree step
read once, to accept; a per-row tree step (``dynamic:N``, ``auto``, with prompt lookup or not)
once more, before the verify pass whose shape its kept nodes decide. Verify, accept and commit
read nothing else; prompt lookup searches the host's copy of each row."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import PROMPTS

from multitoken.decode import chain, phases
from multitoken.decode.api import generate
from multitoken.decode.trees import step

READS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class ReadCounter:
    """Counts ``read_host`` calls, and while a phase that must not read runs (verify, accept,
    commit), every tensor-to-Python read but of what ``read_host`` returned."""

    def __init__(self, monkeypatch) -> None:
        self.host_reads = 0
        self.stray: list[str] = []
        self.watching = 0
        self.from_host: dict[int, torch.Tensor] = {}  # id -> tensor, kept so ids stay unique
        real = phases.read_host

        def read_host(tensor):
            self.host_reads += 1
            self.watching, watching = 0, self.watching  # the read itself is the one allowed
            try:
                out = real(tensor)
            finally:
                self.watching = watching
            self.from_host[id(out)] = out
            return out

        for name, module in list(sys.modules.items()):
            if name.startswith("multitoken.decode") and hasattr(module, "read_host"):
                monkeypatch.setattr(module, "read_host", read_host)
        for method in READS:
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, self._counted(method, original))
        for owner, names in (
            (chain.ChainProposal, ("verify", "accept")),
            (step.TreeProposal, ("verify", "accept")),
            (chain.HeadsChain, ("propose",)),
            (step.StaticTree, ("propose",)),
        ):
            for name in names:
                monkeypatch.setattr(owner, name, self._watched(getattr(owner, name)))
        for module in (phases, sys.modules["multitoken.decode.api"]):
            monkeypatch.setattr(module, "commit", self._watched(phases.commit))

    def _counted(self, method, original):
        def read(tensor, *args, **kwargs):
            if self.watching and id(tensor) not in self.from_host:
                self.stray.append(method)
            return original(tensor, *args, **kwargs)

        return read

    def _watched(self, function):
        def watched(*args, **kwargs):
            self.watching += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.watching -= 1

        return watched


@pytest.mark.parametrize(
    "options, per_row",
    [
        ({"tree": "chain", "draft_len": 2}, False),
        ({"tree": "chain", "draft_len": 2, "temperature": 0.8, "seed": 1}, False),
        ({"tree": "2,1"}, False),
        ({"tree": "2,1", "temperature": 0.8, "seed": 1}, False),
        ({"tree": "dynamic:4+lookup"}, True),
        ({"tree": "dynamic:4"}, True),
    ],
)
@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_a_step_reads_the_device_once_to_accept(family, options, per_row, monkeypatch, trained):
    model = trained(family)
    counter = ReadCounter(monkeypatch)
    out = generate(model, PROMPTS, max_new_tokens=20, **options)
    steps = len(out.stats.nodes)
    first = 1  # the prefill's first tokens, read once for the whole batch
    assert counter.stray == []
    assert counter.host_reads == first + steps * (2 if per_row else 1)


def test_auto_reads_twice_only_on_the_steps_that_draft_a_tree(monkeypatch, trained):
    model = trained("deepseek")
    counter = ReadCounter(monkeypatch)
    out = generate(model, PROMPTS, max_new_tokens=24, tree="auto+lookup")
    drafting = sum(1 for n in out.stats.nodes if n > 1)
    assert counter.stray == []
    assert counter.host_reads == 1 + len(out.stats.nodes) + drafting


def test_prompt_lookup_searches_the_hosts_copy_of_each_row(monkeypatch, trained):
    """What lookup searches is exactly each row's committed tokens on the device."""
    model = trained("meta")
    propose, checked = step.RowTrees.propose, []

    def spy(self, model, state, plan, watch):
        end = max(state.length)
        device_rows = state.tokens[:, :end].tolist()
        assert state.history == [row[:n] for row, n in zip(device_rows, state.length)]
        checked.append(len(state.history))
        return propose(self, model, state, plan, watch)

    monkeypatch.setattr(step.RowTrees, "propose", spy)
    plain = generate(model, PROMPTS, max_new_tokens=24, speculate=False)
    out = generate(model, PROMPTS, max_new_tokens=24, tree="dynamic:4+lookup")
    assert out.tokens == plain.tokens
    assert len(checked) > 3 and set(checked) > {1}  # several steps, rows leaving on the way
