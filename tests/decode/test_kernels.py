"""oneDNN linear layers for decoding on a CPU (multitoken.decode.kernels): same numbers as torch's
kernel up to fp32 rounding, only inside the block and only without autograd, chosen by size and
placement, and speculative output exact against plain decoding under the same kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, micro_llama, model_of, perturb_heads

from multitoken.decode import costs
from multitoken.decode.api import generate
from multitoken.decode.kernels import (
    active_kernel,
    choose_linear_kernel,
    linear_kernels,
    onednn_available,
)
from multitoken.errors import MultitokenError

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def test_onednn_linear_matches_torch_inside_the_block_only():
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80)  # with a bias
    x3, x2 = torch.randn(2, 5, 96), torch.randn(7, 96)
    with torch.no_grad():
        want3, want2 = layer(x3), layer(x2)
        with linear_kernels(layer, "onednn"):
            assert active_kernel(layer) == "onednn"
            got3, got2 = layer(x3), layer(x2)
        assert active_kernel(layer) == "torch"
    assert got3.shape == want3.shape and got2.shape == want2.shape
    torch.testing.assert_close(got3, want3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(layer)


def test_autograd_keeps_torchs_kernel_inside_the_block():
    layer = torch.nn.Linear(16, 8)
    with linear_kernels(layer, "onednn"):
        out = layer(torch.randn(3, 16))
        out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_a_changed_weight_is_repacked():
    layer = torch.nn.Linear(32, 32, bias=False)
    x = torch.randn(4, 32)
    with torch.no_grad():
        with linear_kernels(layer, "onednn"):
            before = layer(x)
        layer.weight.mul_(2.0)
        with linear_kernels(layer, "onednn"):
            after = layer(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_auto_takes_onednn_for_big_fp32_cpu_layers_on_avx512_only(monkeypatch):
    from multitoken.decode import kernels

    monkeypatch.setattr(kernels, "cpu_kind", lambda: "AVX512")
    small = micro_llama()
    assert choose_linear_kernel("auto", small) == "torch"  # hidden 32: conversions dominate
    big = torch.nn.Sequential(torch.nn.Linear(512, 512))
    assert choose_linear_kernel("auto", big) == "onednn"
    monkeypatch.setattr(kernels, "cpu_kind", lambda: "AVX2")  # a one-token step costs more
    assert choose_linear_kernel("auto", big) == "torch"
    monkeypatch.setattr(kernels, "cpu_kind", lambda: "AVX512")
    assert choose_linear_kernel("torch", big) == "torch"
    assert choose_linear_kernel("auto", big.to(torch.bfloat16)) == "torch"
    with pytest.raises(MultitokenError, match="fp32 model on a CPU") as err:
        choose_linear_kernel("onednn", big)
    assert err.value.flag == "--linear-kernel"
    with pytest.raises(MultitokenError, match="unknown kernel 'mkl'"):
        choose_linear_kernel("mkl", small)


def test_auto_takes_torchs_kernel_off_the_main_thread_and_onednn_only_when_asked(monkeypatch):
    """The serving engine decodes on a worker thread, where oneDNN's OpenMP work costs more."""
    import threading

    from multitoken.decode import kernels

    monkeypatch.setattr(kernels, "cpu_kind", lambda: "AVX512")
    big = torch.nn.Sequential(torch.nn.Linear(512, 512))
    chosen = {}

    def choose() -> None:
        chosen["auto"] = choose_linear_kernel("auto", big)
        chosen["onednn"] = choose_linear_kernel("onednn", big)

    worker = threading.Thread(target=choose)
    worker.start()
    worker.join()
    assert chosen == {"auto": "torch", "onednn": "onednn"}
    assert choose_linear_kernel("auto", big) == "onednn"  # the main thread's choice


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_speculative_greedy_on_onednn_equals_plain_on_onednn(family):
    model = perturb_heads(model_of(family, depth=3), scale=0.3)
    plain = generate(model, PROMPTS, max_new_tokens=20, speculate=False, linear_kernel="onednn")
    for K in (1, 3):
        spec = generate(
            model, PROMPTS, max_new_tokens=20, tree="chain", draft_len=K, linear_kernel="onednn"
        )
        assert spec.tokens == plain.tokens
    assert all("forward" not in vars(m) for m in model.modules())  # undone after the call


def test_the_cost_curve_is_kept_per_kernel():
    model = model_of("bpd", depth=2)
    first = costs.cost_model(model.trunk, 3, [5, 6, 7])
    with torch.no_grad(), linear_kernels(model, "onednn"):
        other = costs.cost_model(model.trunk, 3, [5, 6, 7])
        assert costs.cost_model(model.trunk, 3, [5, 6, 7]) is other
    assert other is not first
    assert costs.cost_model(model.trunk, 3, [5, 6, 7]) is first
