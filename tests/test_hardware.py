"""Precision from the hardware: bf16 only where the device computes it natively and faster."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import train_tiny, write_corpus

from multitoken import hardware
from multitoken.errors import MultitokenError
from multitoken.hardware import choose_precision, place_for_decoding, resolve_device

CPU = torch.device("cpu")


@pytest.fixture
def cpu_probe(monkeypatch):
    """Force what the CPU probe sees: (oneDNN claims bf16, bf16 matmul seconds / fp32's)."""

    def force(claims: bool, bf16_over_fp32: float = 0.5) -> None:
        hardware.cpu_bf16_native.cache_clear()
        monkeypatch.setattr(hardware, "_oneDNN_claims_bf16", lambda: claims)
        seconds = {torch.float32: 1e-3, torch.bfloat16: 1e-3 * bf16_over_fp32}
        monkeypatch.setattr(hardware, "_matmul_seconds", lambda dtype: seconds[dtype])

    yield force
    hardware.cpu_bf16_native.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_probe):
    cpu_probe(claims=False)
    chosen = choose_precision("auto", CPU)
    assert chosen.name == "fp32" and chosen.dtype == torch.float32
    assert "without native bf16" in chosen.describe()


def test_auto_is_bf16_where_the_cpu_has_it_and_it_is_faster(cpu_probe):
    cpu_probe(claims=True, bf16_over_fp32=0.4)
    chosen = choose_precision("auto", CPU)
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16
    assert "2.5x faster" in chosen.reason


def test_a_cpu_that_claims_bf16_but_emulates_it_gets_fp32(cpu_probe):
    cpu_probe(claims=True, bf16_over_fp32=19.0)
    chosen = choose_precision("auto", CPU)
    assert chosen.name == "fp32" and "emulated" in chosen.reason


def test_explicit_choices_are_honoured_and_emulated_bf16_warns(cpu_probe, caplog):
    cpu_probe(claims=False)
    assert choose_precision("fp32", CPU).name == "fp32"
    with caplog.at_level(logging.WARNING, logger="multitoken"):
        assert choose_precision("bf16", CPU).name == "bf16"
    assert "emulated" in caplog.text
    with pytest.raises(MultitokenError, match="^unknown precision 'fp16'") as err:
        choose_precision("fp16", CPU)
    assert err.value.flag == "--precision"


def test_the_real_probe_agrees_with_onednn_and_is_cached():
    hardware.cpu_bf16_native.cache_clear()
    native, why = hardware.cpu_bf16_native()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not native and "without native bf16" in why
    assert hardware.cpu_bf16_native() == (native, why)  # one timing per process


def test_autocast_runs_matmuls_in_the_chosen_precision(cpu_probe):
    a = torch.randn(4, 4)
    for claims, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        cpu_probe(claims=claims)
        with choose_precision("auto", CPU).autocast(CPU)():
            assert (a @ a).dtype == dtype


@pytest.mark.parametrize("claims", [True, False])
def test_decoding_on_a_cpu_is_fp32_unless_asked(cpu_probe, claims, caplog):
    """bf16 verify passes can flip near-ties that one-token passes resolve the other way, so
    auto decodes in fp32 on a CPU with or without native bf16; bf16 on request, with a warning."""
    cpu_probe(claims=claims)
    model = torch.nn.Linear(4, 4).to(torch.float16)  # a half-precision folder, loaded as saved
    chosen = place_for_decoding(model, "cpu", "auto")
    assert model.weight.dtype == torch.float32 == chosen.dtype
    with caplog.at_level(logging.WARNING, logger="multitoken"):
        chosen = place_for_decoding(model, "cpu", "bf16")
    assert model.weight.dtype == torch.bfloat16 == chosen.dtype
    assert "near-tie" in caplog.text


def test_decoding_on_a_gpu_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "bf16_native", lambda device: (True, "a GPU with bf16"))
    chosen = hardware.decode_precision("auto", torch.device("cuda"))
    assert chosen.name == "bf16"
    monkeypatch.setattr(hardware, "bf16_native", lambda device: (False, "a GPU without bf16"))
    assert hardware.decode_precision("auto", torch.device("cuda")).name == "fp32"


def test_training_says_which_precision_and_computes_in_it(cpu_probe, tmp_path, capsys, monkeypatch):
    from multitoken import model as model_module

    corpus = write_corpus(tmp_path / "corpus", ["def f(x):\n    return x + 1\n" * 200])
    logits_dtypes = []

    def recording(logits, labels):
        logits_dtypes.append(logits.dtype)
        return cross_entropy(logits, labels)

    cross_entropy = model_module.cross_entropy
    monkeypatch.setattr(model_module, "cross_entropy", recording)
    for claims, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        cpu_probe(claims=claims)
        logits_dtypes.clear()
        # precision auto is the point; the device is the (probed) CPU wherever this runs
        train_tiny(tmp_path / f"run-{claims}", corpus, max_steps=1, precision="auto")
        expected = f"precision: {'bf16' if claims else 'fp32'} (auto: CPU"
        assert expected in capsys.readouterr().err
        assert logits_dtypes and set(logits_dtypes) == {dtype}


def test_bad_devices_are_one_line_errors():
    with pytest.raises(MultitokenError) as err:
        resolve_device("tpu")
    assert err.value.flag == "--device" and "\n" not in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(MultitokenError, match="^CUDA is not available") as err:
            resolve_device("cuda")
        assert err.value.flag == "--device"
