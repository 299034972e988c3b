"""``multitoken bench``: the JSON it promises, outputs really compared token for token, sane
figures (τ ≥ 1, c(1) = 1), a real PNG, and bad input refused with the flag at fault."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import micro_llama
from helpers import train_tiny, write_corpus

import multitoken
from multitoken.bench import run as bench
from multitoken.cli import bench as bench_command
from multitoken.errors import MultitokenError
from multitoken.text.prompts import window_prompts
from multitoken.text.tokenizer import ByteTokenizer

RUN_KEYS = {
    "method",
    "draft_len",
    "tau",
    "acceptance",
    "trunk_passes",
    "tokens",
    "wall_s",
    "tokens_per_s",
    "speedup_vs_plain",
    "speedup_vs_hf_greedy",
    "identical",
}
PROMPTS, PROMPT_TOKENS, NEW = 2, 16, 8


def parse(*argv: str) -> argparse.Namespace:
    """The CLI's own parser is wired elsewhere; this one holds just the bench subcommand."""
    parser = argparse.ArgumentParser()
    bench_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A bpd D = 2 checkpoint after two steps: untrained, but every code path is real."""
    root = tmp_path_factory.mktemp("bench")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [
        "\n".join(
            " ".join(words[(i + shift + j) % len(words)] for j in range(6)) for i in range(300)
        )
        + "\n"
        for shift in (0, 5)
    ]
    data = write_corpus(root / "text", texts)
    run = train_tiny(root / "run", data, depth=2, preset="tiny", seq_len=32, save_every=2)
    return run.out


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-out")
    args = parse(
        "--checkpoint",
        str(checkpoint),
        "--num-prompts",
        str(PROMPTS),
        "--prompt-tokens",
        str(PROMPT_TOKENS),
        "--max-new-tokens",
        str(NEW),
        "--prompt-lookup",
        "2",
        "--draft-model",
        str(checkpoint),  # the trunk as its own assistant: exercises assisted generation
        "--tree",
        "2,1",
        "--tree",
        "dynamic:3",
        "--json",
        str(out / "bench.json"),
        "--plot",
        str(out / "bench.png"),
    )
    assert bench_command.run(args) == 0
    return json.loads((out / "bench.json").read_text()), out


def test_json_has_the_documented_keys(report):
    result, _ = report
    for key in ("checkpoint", "family", "depth", "val_loss", "prompts", "max_new_tokens"):
        assert key in result
    assert result["family"] == "bpd" and result["depth"] == 2
    assert result["prompts"]["count"] == PROMPTS
    assert result["prompts"]["tokens"] == [PROMPT_TOKENS] * PROMPTS
    assert result["val_loss"] > 0
    methods = [(r["method"], r["draft_len"]) for r in result["runs"]]
    assert methods == [
        ("plain", None),
        ("speculative", 1),
        ("speculative", 2),
        ("auto", None),
        ("tree", 2),
        ("tree", 2),
        ("hf_greedy", None),
        ("prompt_lookup", 2),
        ("assisted", None),
    ]
    for run in result["runs"]:
        assert RUN_KEYS <= set(run), run["method"]
        assert run["tokens"] == PROMPTS * NEW  # EOS stopped no method early
    assert set(result["verify_cost"]) >= {"q", "c"}
    for key in ("device", "cpu", "threads", "precision"):
        assert key in result


def test_every_method_reproduces_plain_decoding(report):
    result, _ = report
    assert all(run["identical"] for run in result["runs"])


def test_a_different_output_is_flagged():
    reference = [[5, 6, 7], [8, 9]]
    assert bench.outputs_identical([[5, 6, 7], [8, 9]], reference)
    assert not bench.outputs_identical([[5, 6, 7], [8, 10]], reference)
    assert not bench.outputs_identical([[5, 6], [8, 9]], reference)  # stopped early
    assert not bench.outputs_identical([[5, 6, 7]], reference)

    # through the timing path too: a method whose second prompt's output is off by one token
    def wrong(prompt):
        return {1: [5, 6, 7], 2: [8, 10]}[prompt[0]], 3, None

    run, _ = bench.measure("hf_greedy", None, wrong, [[1], [2]], reference, torch.device("cpu"))
    assert not run["identical"] and run["tokens"] == 5
    run, _ = bench.measure("hf_greedy", None, wrong, [[1]], reference[:1], torch.device("cpu"))
    assert run["identical"]


def test_rows_whose_steps_choose_their_tree_report_no_fixed_node_count():
    """auto and auto+lookup steps verify as many nodes as pay (their mean is reported);
    static and dynamic trees verify the same count every step."""
    assert bench.fixed_nodes("auto", 3) is None and bench.fixed_nodes("auto+lookup:4", 3) is None
    assert bench.fixed_nodes("2,1", 2) == 5
    assert bench.fixed_nodes("dynamic:6+lookup", 3) == bench.fixed_nodes("dynamic:6", 3) == 7


def test_tau_acceptance_and_verify_cost(report):
    result, _ = report
    for run in result["runs"]:
        if run["method"] == "speculative":
            assert 1.0 <= run["tau"] <= run["draft_len"] + 1
            assert len(run["acceptance"]) == run["draft_len"]
            assert all(0.0 <= a <= 1.0 for a in run["acceptance"])
            assert run["trunk_passes"] <= PROMPTS * NEW
            assert run["draft_len_counts"] == {str(run["draft_len"]): run["trunk_passes"] - 2}
            assert run["draft_ms_per_step"] > 0 and run["draft_cost"] > 0
        if run["method"] == "auto":  # K in 0..D each step, one per step after the prefill
            assert 1.0 <= run["tau"] <= 3 and len(run["acceptance"]) == 2
            counts = {int(k): n for k, n in run["draft_len_counts"].items()}
            assert set(counts) <= {0, 1, 2} and sum(counts.values()) == run["trunk_passes"] - 2
            assert 0 <= run["mean_draft_len"] <= 2 and run["verify_bound"] > 0
        if run.get("tree") == "2,1":  # 2 candidates for the first draft, 1 child each
            assert run["nodes"] == 5 and run["mean_nodes"] == 5 and len(run["acceptance"]) == 2
            assert 1.0 <= run["tau"] <= 3 and run["verify_bound"] > 0
        if run.get("tree") == "dynamic:3":  # each row's 3 best drafts, 2 heads deep at most
            assert run["nodes"] == 4 and run["mean_nodes"] == 4 and len(run["acceptance"]) == 2
            assert 1.0 <= run["tau"] <= 3 and run["verify_bound"] > 0
        if run["method"] in ("plain", "hf_greedy"):
            assert run["tau"] == 1.0 and run["trunk_passes"] == PROMPTS * NEW
    cost = result["verify_cost"]
    assert cost["q"] == [1, 2, 3, 4, 5]  # up to max(K) + 1 and the trees' 5 and 4 nodes
    assert cost["t1_s"] > 0 and len(cost["c"]) == 5 and all(c > 0 for c in cost["c"])


def test_the_printed_report_names_the_machine_and_what_auto_chose(report):
    from multitoken.bench.plot import format_report

    result, _ = report
    text = format_report(result)
    assert text.splitlines()[0].startswith(f"machine: {result['device']}")
    assert result["precision"] in text.splitlines()[0]
    assert "verify cost: c(1)=1.00" in text and "auto chose, per step: K=" in text
    auto = next(line for line in text.splitlines() if line.startswith("auto "))
    assert "~" in auto  # the mean K its steps chose


def test_plot_is_a_png_and_no_temp_file_is_left(report):
    _, out = report
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # tree rows add a third panel, speedup against the tokens a step verifies: a wider figure
    assert int.from_bytes(png[16:20], "big") == 15 * 110
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.png"]


def test_bad_input_names_the_flag(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    micro = tmp_path / "micro"
    micro_llama().save_pretrained(micro)  # vocabulary 64, the byte trunk's is 259
    cases = [
        (["--draft-lens", "0"], "--draft-lens"),
        (["--draft-lens", "5"], "--draft-lens"),  # K > D = 2 for bpd
        (["--draft-lens", "1,x"], "--draft-lens"),
        (["--prompts", str(tmp_path / "missing.txt")], "--prompts"),
        (["--prompts", str(empty)], "--prompts"),
        (["--draft-model", str(micro)], "--draft-model"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--json", str(tmp_path / "no" / "such" / "dir.json")], "--json"),
    ]
    for extra, flag in cases:
        with pytest.raises(MultitokenError) as caught:
            bench_command.run(parse("--checkpoint", str(checkpoint), *extra))
        assert caught.value.flag == flag, extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "micro"]


def test_prompt_files_and_default_draft_lengths(tmp_path):
    tok = ByteTokenizer()
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\nsecond\n")
    assert bench.read_prompt_file(plain, tok) == [tok.encode("first prompt"), tok.encode("second")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a\\nb"}\n{"text": "c"}\n')
    assert bench.read_prompt_file(jsonl, tok) == [tok.encode("a\nb"), tok.encode("c")]
    assert bench.default_draft_lens("bpd", 3) == [1, 2, 3]
    assert bench.default_draft_lens("deepseek", 2) == [1, 2, 4]  # deepseek may draft past D
    assert bench.parse_draft_lens("4,1,2,2", "deepseek", 2) == [1, 2, 4]


def test_validation_prompts_start_at_lines_and_skip_whitespace():
    tok = ByteTokenizer()
    text = "   \n" * 50 + "".join(f"{i} is a line of the text\n" for i in range(40))
    text += "39 is a line of the text\n" * 100  # a repeated line gives one prompt, not many
    prompts = window_prompts(iter([text]), tok, 4, 12)
    assert len(prompts) == 4 and len(set(map(tuple, prompts))) == 4
    for ids in prompts:
        window = tok.decode(ids)
        assert window.split()[1:3] == ["is", "a"] and ("\n" + window) in ("\n" + text)


def test_python_api_on_a_random_trunk_whose_drafts_often_fail():
    """Random weights: varied output and rejected drafts, so `identical` is a real check here."""
    from multitoken.config import HeadConfig
    from multitoken.model import MTPModel

    model = MTPModel(micro_llama(seed=3), HeadConfig(family="deepseek", depth=2)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    result = bench.bench(model, prompts, [1, 2, 4], 12, prompt_lookup=2, progress=False)
    runs = {(r["method"], r["draft_len"]): r for r in result["runs"]}
    assert all(r["identical"] for r in runs.values())
    assert ("auto", None) in runs and result["cpu"] and result["dtype"] == "float32"
    assert runs[("speculative", 4)]["tau"] < 5  # not every draft was accepted
    assert len(runs[("speculative", 4)]["acceptance"]) == 4
    assert result["verify_cost"]["q"] == [1, 2, 3, 4, 5]


def test_repeated_ngram_share_tells_loops_from_fresh_text():
    from multitoken.bench.run import repeated_ngram_share

    prompt = list(range(10))
    loop = [1, 2, 3] * 10  # the output cycles: after the first 8-gram every token repeats
    fresh = list(range(100, 130))
    assert repeated_ngram_share([prompt], [fresh], n=4) == 0.0
    assert repeated_ngram_share([prompt], [loop], n=4) > 0.7
    copied = prompt[:]  # the output copies its prompt: prompt lookup's best case
    assert repeated_ngram_share([prompt], [copied], n=4) > 0.6


def test_several_heads_on_one_trunk_share_the_baselines(tmp_path):
    """Families side by side on one trunk: plain/transformers rows once, ours per heads, each
    labelled and checked against the one plain reference; heads for another trunk refused."""
    from multitoken.bench.plot import format_report, plot
    from multitoken.config import HeadConfig
    from multitoken.model import MTPModel

    trunk = micro_llama(seed=4)
    model = MTPModel(trunk, HeadConfig(family="bpd", depth=2)).eval()
    also = {
        "meta": MTPModel(trunk, HeadConfig(family="meta", depth=1)).eval(),
        "deepseek": MTPModel(trunk, HeadConfig(family="deepseek", depth=2)).eval(),
    }
    result = bench.bench(model, [[5, 6, 7, 8]], [1, 2], 10, prompt_lookup=0, also=also)
    rows = [(r["method"], r["draft_len"], r.get("heads")) for r in result["runs"]]
    assert rows == [
        ("plain", None, None),
        ("speculative", 1, "bpd"),
        ("speculative", 2, "bpd"),
        ("auto", None, "bpd"),
        ("speculative", 1, "meta"),  # meta D = 1 cannot draft 2
        ("auto", None, "meta"),
        ("speculative", 1, "deepseek"),
        ("speculative", 2, "deepseek"),
        ("auto", None, "deepseek"),
        ("hf_greedy", None, None),
    ]
    assert all(r["identical"] for r in result["runs"])
    assert {r.get("draft_vocab") for r in result["runs"]} == {None, 64}  # ours: full vocabulary
    text = format_report(result)
    assert "speculative (meta, N=64)" in text and "auto (deepseek) chose" in text
    result["prompts"] = {"count": 1}
    plot(result, tmp_path / "several.png")
    assert (tmp_path / "several.png").read_bytes()[:4] == b"\x89PNG"
    stranger = MTPModel(micro_llama(seed=4), HeadConfig(family="bpd", depth=1)).eval()
    with pytest.raises(MultitokenError, match="same trunk"):
        bench.bench(model, [[5, 6, 7, 8]], [1], 4, prompt_lookup=0, also={"x": stranger})


def test_the_trunk_validation_loss_is_the_reported_one_and_leaves_the_dtype(checkpoint, report):
    """``evaluate`` lives beside the model: the command's figure is trunk_validation's, scored
    in fp32 whatever the model decodes in; the trainer still finds it under its old name."""
    from multitoken.training import trainer
    from multitoken.training.data import Corpus
    from multitoken.training.evaluate import evaluate, trunk_validation

    assert trainer.evaluate is evaluate
    result, _ = report
    model = multitoken.load(checkpoint)
    corpus = Corpus.from_specs([str(checkpoint.parent / "text")], 0.05)
    scores = trunk_validation(model, corpus, seq_len=32, batch_size=2)
    assert scores == {"val_loss": result["val_loss"], "val_accuracy": result["val_accuracy"]}
    model.to(torch.bfloat16)
    rounded = trunk_validation(model, corpus, seq_len=32, batch_size=2)
    assert model.parts.embed.weight.dtype == torch.bfloat16
    assert rounded["val_loss"] == pytest.approx(scores["val_loss"], abs=0.05)


def test_methods_take_turns_on_each_prompt_after_a_warm_up_each(checkpoint):
    """A machine whose speed drifts slows every method alike only if they take turns."""
    model = multitoken.load(checkpoint)
    calls = []

    def method(name):
        def decode(prompt):
            calls.append((name, prompt[0]))
            return [prompt[0]] * 2, 2, None

        return bench.Method(name, None, decode, None)

    methods = [method("plain"), method("hf_greedy"), method("prompt_lookup")]
    runs, reference = bench._measure_all(model, {}, methods, [[1], [2], [3]], [0], 2, False)
    warm_up = [(name, 1) for name in ("plain", "hf_greedy", "prompt_lookup")]
    turns = [(name, p) for p in (1, 2, 3) for name in ("plain", "hf_greedy", "prompt_lookup")]
    assert calls == warm_up + turns + turns
    assert reference == [[1, 1], [2, 2], [3, 3]]
    assert [r["method"] for r in runs] == ["plain", "hf_greedy", "prompt_lookup"]
    assert all(r["identical"] and r["tokens"] == 6 for r in runs)
