"""Typed configuration (multitoken.config): every bad value is a MultitokenError naming the flag
to change, resolved values follow their documented rules, and configs round-trip through dicts
and JSON/TOML files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from multitoken.config import (
    PRESETS,
    PRETRAINED_LR,
    GenerateConfig,
    HeadConfig,
    LambdaSchedule,
    RuntimeConfig,
    TrainConfig,
    draft_len_value,
    read_config_file,
)
from multitoken.errors import MultitokenError


def refused(check, flag: str) -> MultitokenError:
    """``check()`` raises a one-line MultitokenError naming ``flag``; returns it."""
    with pytest.raises(MultitokenError) as err:
        check()
    assert err.value.flag == flag, (err.value.flag, err.value.message)
    assert err.value.message and "\n" not in err.value.message
    return err.value


# --- λ schedule -------------------------------------------------------------------------------


def test_a_number_is_a_constant_lambda():
    schedule = LambdaSchedule.parse(0.25)
    assert schedule == LambdaSchedule((0.25,), ())
    assert {schedule(s, 10) for s in range(20)} == {0.25}


def test_a_fractional_boundary_scales_with_the_run_and_an_integer_one_does_not():
    schedule = LambdaSchedule.parse(" 0.5 -> 0.3@40 -> 0.1@0.8 ")  # spaces are ignored
    assert schedule.values == (0.5, 0.3, 0.1) and schedule.boundaries == (40, 0.8)
    assert [schedule(s, 100) for s in (39, 40, 79, 80)] == [0.5, 0.3, 0.3, 0.1]
    assert [schedule(s, 1000) for s in (39, 40, 799, 800)] == [0.5, 0.3, 0.3, 0.1]


@pytest.mark.parametrize(
    "spec", ["x", "0.3->0.1", "0.3->x@0.5", "0.3->0.1@0.5@2", "-0.1", "0.3->0.1@0"]
)
def test_a_bad_lambda_names_the_flag(spec: str):
    refused(lambda: LambdaSchedule.parse(spec), "--mtp-lambda")
    refused(TrainConfig(mtp_lambda=spec).validate, "--mtp-lambda")  # before anything is written


def test_each_family_has_its_own_default_lambda():
    def default(family: str) -> LambdaSchedule:
        return TrainConfig(heads=HeadConfig(family=family)).lambda_schedule()

    assert default("deepseek").values == (0.3,)
    assert default("bpd").values == default("meta").values == (1.0,)
    given = TrainConfig(mtp_lambda="0.7", heads=HeadConfig(family="deepseek"))
    assert given.lambda_schedule().values == (0.7,)


# --- heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"family": "medusa"}, "--family"),
        ({"depth": 0}, "--depth"),
        ({"depth": 1.5}, "--depth"),
        ({"bpd_unembed": "own"}, "--bpd-unembed"),
        ({"bpd_hidden": 0}, "--bpd-hidden"),
        ({"draft_vocab": True}, "--draft-vocab"),  # a bool is not a count
        ({"draft_vocab": 65}, "--draft-vocab"),  # larger than the trunk's vocabulary
        ({"family": "bpd", "init_from_trunk": True}, "--init-from-trunk"),
        ({"family": "deepseek", "branch_layer": 0}, "--branch-layer"),
        ({"family": "meta", "branch_layer": 4}, "--branch-layer"),
        ({"family": "meta", "branch_layer": -1}, "--branch-layer"),
    ],
)
def test_bad_head_options_name_their_flag(fields: dict, flag: str):
    refused(lambda: HeadConfig(**fields).validate(num_layers=4, vocab_size=64), flag)


def test_good_head_options_pass_at_their_boundaries():
    HeadConfig(family="meta", branch_layer=3).validate(num_layers=4)
    HeadConfig(family="meta", branch_layer=0, init_from_trunk=True).validate(num_layers=4)
    HeadConfig(draft_vocab=64).validate(vocab_size=64)
    HeadConfig(family="bpd", init_from_trunk=False, bpd_hidden=1).validate()
    # without the trunk's shape the range checks wait until it is known
    HeadConfig(family="meta", branch_layer=40, draft_vocab=10**6).validate()


def test_the_branch_layer_defaults_to_the_trunks_last():
    assert HeadConfig(family="meta").resolved_branch_layer(6) == 5
    assert HeadConfig(family="meta", branch_layer=2).resolved_branch_layer(6) == 2


# --- runtime ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_pass(device: str):
    RuntimeConfig(device=device).validate()


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:", "cuda:x", "cpu "])
def test_unknown_devices_name_the_flag(device: str):
    refused(RuntimeConfig(device=device).validate, "--device")


def test_runtime_options_come_from_any_object_with_some_of_the_fields():
    class Parsed:  # what argparse hands over: unset options are absent or None
        device = "cpu"
        precision = None

    assert RuntimeConfig.from_options(Parsed()) == RuntimeConfig(device="cpu", precision="auto")
    refused(RuntimeConfig(precision="fp16").validate, "--precision")


# --- training ---------------------------------------------------------------------------------

# the counts that must be integers >= 1, by field name
POSITIVE = (
    "seq_len batch_size grad_accum max_steps eval_every eval_batches log_every save_every "
    "keep_checkpoints soft_top_k"
).split()


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -3, 2.0])
def test_counts_must_be_positive_integers_and_the_error_names_the_flag(name: str, value):
    refused(TrainConfig(**{name: value}).validate, "--" + name.replace("_", "-"))
    TrainConfig(**{name: 1}).validate()  # 1 is allowed


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"val_fraction": 0.0}, "--val-fraction"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"lr": 0.0}, "--lr"),
        ({"warmup_steps": -1}, "--warmup-steps"),
        ({"grad_clip": -0.5}, "--grad-clip"),
        ({"min_lr_ratio": 1.5}, "--min-lr-ratio"),
        ({"feature_cache_gb": -1}, "--feature-cache-gb"),
        ({"feature_cache_gb": "4"}, "--feature-cache-gb"),
        ({"feature_cache_dtype": "fp16"}, "--feature-cache-dtype"),
        ({"labels": "teacher", "freeze_trunk": True}, "--labels"),
        ({"labels": "trunk"}, "--labels"),  # fixed labels need a frozen trunk
        ({"labels": "soft"}, "--labels"),  # ...and so do fixed soft targets
        ({"preset": "huge"}, "--preset"),
        ({"device": "tpu"}, "--device"),
        ({"precision": "fp8"}, "--precision"),
        ({"heads": HeadConfig(depth=0)}, "--depth"),
    ],
)
def test_bad_training_options_name_their_flag(fields: dict, flag: str):
    refused(TrainConfig(**fields).validate, flag)


def test_range_ends_that_are_allowed_pass():
    TrainConfig(min_lr_ratio=0.0, grad_clip=0.0, warmup_steps=0, feature_cache_gb=0).validate()
    TrainConfig(min_lr_ratio=1.0, labels="trunk", freeze_trunk=True).validate()
    TrainConfig(labels="soft", freeze_trunk=True, soft_top_k=1).validate()
    TrainConfig(preset="huge", trunk="some/folder").validate()  # a --trunk overrides --preset


def test_labels_default_to_the_trunks_greedy_path_when_it_is_frozen():
    frozen, trained = TrainConfig(freeze_trunk=True), TrainConfig()
    frozen.validate()
    trained.validate()
    assert (frozen.labels, trained.labels) == ("trunk", "text")
    given = TrainConfig(freeze_trunk=True, labels="soft")
    given.validate()
    assert given.labels == "soft"


def test_the_peak_learning_rate_is_given_else_pretrained_else_the_presets():
    assert TrainConfig(lr=0.5, trunk="x").peak_lr() == 0.5
    assert TrainConfig(trunk="x").peak_lr() == PRETRAINED_LR
    for name, preset in PRESETS.items():
        assert TrainConfig(preset=name).peak_lr() == preset.lr


@pytest.mark.parametrize(
    ("max_steps", "warmup_steps", "want"),
    [
        (1000, None, 50),  # 5% of the run
        (100_000, None, 200),  # at most 200
        (10, None, 1),  # at least 1
        (100, 30, 30),
        (10, 30, 10),  # never past the end of the run
    ],
)
def test_warmup_is_five_percent_capped_at_200_unless_given(max_steps, warmup_steps, want):
    config = TrainConfig(max_steps=max_steps, warmup_steps=warmup_steps)
    assert config.resolved_warmup() == want


def test_a_config_round_trips_through_a_dict_and_json():
    config = TrainConfig(
        max_steps=7,
        data=["a", "b"],
        mtp_lambda="0.3->0.1@0.7",
        heads=HeadConfig(family="meta", depth=3, branch_layer=1),
    )
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.heads, HeadConfig)


def test_flat_hyphenated_and_nested_keys_build_the_same_config():
    flat = TrainConfig.from_dict({"family": "bpd", "max-steps": 3, "bpd_hidden": 8})
    nested = TrainConfig.from_dict({"heads": {"family": "bpd", "bpd_hidden": 8}, "max_steps": 3})
    assert flat == nested
    assert flat.heads.family == "bpd" and flat.max_steps == 3 and flat.heads.bpd_hidden == 8
    # a flat key wins over the same key nested
    assert TrainConfig.from_dict({"heads": {"depth": 2}, "depth": 4}).heads.depth == 4


@pytest.mark.parametrize("values", [{"max_stepz": 3}, {"heads": {"famly": "bpd"}}])
def test_unknown_keys_are_refused_naming_the_config_file(values: dict):
    error = refused(lambda: TrainConfig.from_dict(values), "--config")
    assert "max_stepz" in error.message or "famly" in error.message


# --- config files -----------------------------------------------------------------------------


def test_json_and_toml_files_read_the_same(tmp_path: Path):
    (tmp_path / "run.json").write_text('{"family": "meta", "depth": 2, "data": ["x"]}')
    (tmp_path / "run.toml").write_text('family = "meta"\ndepth = 2\ndata = ["x"]\n')
    want = {"family": "meta", "depth": 2, "data": ["x"]}
    assert read_config_file(tmp_path / "run.json") == want
    assert read_config_file(str(tmp_path / "run.toml")) == want


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("missing.json", None, "no such config file"),
        ("bad.json", "{family: meta", "cannot parse"),
        ("bad.toml", "family = = 'meta'", "cannot parse"),
        ("binary.json", b"\xff\xfe\x00", "cannot parse"),
    ],
)
def test_a_missing_or_unparsable_config_file_names_the_flag(tmp_path, name, content, says):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert says in refused(lambda: read_config_file(path), "--config").message


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [(None, None), (3, 3), ("auto", "auto"), (" AUTO ", "auto"), ("4", 4), ("-2", -2)],
)
def test_draft_len_is_auto_a_whole_number_or_none(value, want):
    assert draft_len_value(value) == want


@pytest.mark.parametrize("value", [True, 2.0, "2.5", "two", ""])
def test_anything_else_is_not_a_draft_len(value):
    with pytest.raises(ValueError, match="auto or a whole number"):
        draft_len_value(value)


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"max_new_tokens": 2.0}, "--max-new-tokens"),
        ({"draft_len": 0}, "--draft-len"),
        ({"draft_len": "-1"}, "--draft-len"),
        ({"draft_len": "many"}, "--draft-len"),
        ({"temperature": -0.1}, "--temperature"),
        ({"top_k": -1}, "--top-k"),
        ({"top_k": 2.5}, "--top-k"),
        ({"max_new_tokens": True}, "--max-new-tokens"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.01}, "--top-p"),
        ({"typical": 1.0}, "--typical"),
        ({"typical": 0.09}, "--typical"),  # typical acceptance samples: greedy cannot use it
        ({"linear_kernel": "mkl"}, "--linear-kernel"),
    ],
)
def test_bad_generate_options_name_their_flag(fields: dict, flag: str):
    refused(GenerateConfig(**fields).validate, flag)


def test_generate_options_pass_at_their_boundaries():
    GenerateConfig(max_new_tokens=1, draft_len=1, top_p=1.0, top_k=0).validate()
    GenerateConfig(typical=0.09, temperature=0.7).validate()
    GenerateConfig(typical=0.09, speculate=False).validate()  # no drafts, nothing to accept
    GenerateConfig(draft_len=None).validate()


def test_every_option_has_help_for_the_cli():
    for cls in (HeadConfig, TrainConfig, GenerateConfig):
        for f in dataclasses.fields(cls):
            if f.name != "heads":
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


# --- bugs found by these tests (issue 9) -------------------------------------------------------


def test_a_config_file_that_is_not_an_object_is_refused(tmp_path: Path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    refused(lambda: read_config_file(path), "--config")  # `train` died on list.update


def test_a_heads_entry_that_is_not_a_table_is_refused():
    refused(lambda: TrainConfig.from_dict({"heads": [1]}), "--config")


@pytest.mark.parametrize("spec", ["nan", "0.3->nan@0.5", "inf"])
def test_a_lambda_that_is_not_a_finite_number_is_refused(spec: str):
    refused(lambda: LambdaSchedule.parse(spec), "--mtp-lambda")


@pytest.mark.parametrize(
    "family,steps,says",
    [("bpd", 1, "nothing past D"), ("meta", 2, "nothing past D"), ("deepseek", -1, ">= 0")],
)
def test_ttt_steps_are_refused_where_nothing_reuses_a_module_or_below_zero(family, steps, says):
    with pytest.raises(MultitokenError, match=says) as e:
        HeadConfig(family=family, depth=2, ttt_steps=steps).validate()
    assert e.value.flag == "--ttt-steps"
