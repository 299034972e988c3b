"""Which kernel runs the linear layers while decoding on a CPU.

torch runs an fp32 ``nn.Linear`` on a CPU through MKL's sgemm/sgemv. At the row counts decoding
meets (1 for a plain step, K+1 for a verify pass) that path is a poor fit: on a 2-core AMD EPYC,
SmolLM2-135M's trunk (30 layers, hidden 576) took 60 ms for one new token, 97 ms for two and 118
ms for three (MKL computes q < 4 rows as q matrix-vector products, each re-reading the weights).
oneDNN's matmul (``torch._C._nn.mkldnn_linear`` on weights held in oneDNN's own format) took
54 ms, 63 ms and 68 ms: a plain step 9% cheaper, and a 2- or 3-token verify pass 1.16 and 1.26
times one step instead of 1.62 and 1.97 — which is what makes drafting pay on a CPU
(``python benchmarks/trunk_pass.py MODEL`` prints both curves on the machine at hand).

:func:`linear_kernels` switches a model's ``nn.Linear`` layers to oneDNN for the duration of a
``with`` block, under ``torch.no_grad`` only (training keeps torch's kernels and autograd). The
oneDNN copy of each weight is made once and kept while its module lives (weakly keyed, refreshed
when the weight changes): decoding holds the weights twice in memory. Both kernels compute fp32
sums in different orders, so logits differ in the last bits; a decode is exact against plain
decoding under the same kernel, which :func:`multitoken.decode.api.generate` guarantees by using
one kernel for the whole call.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from multitoken.config import LINEAR_KERNELS
from multitoken.errors import MultitokenError
from multitoken.hardware import cpu_kind

# auto takes oneDNN for layers this large or larger: below it the conversion of the activations
# to and from oneDNN's format costs more than the kernel saves (tiny test models).
AUTO_MIN_WEIGHTS = 512 * 512

# nn.Linear -> (weight data pointer, weight version, oneDNN weight, oneDNN bias)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def choose_linear_kernel(requested: str, model: nn.Module) -> str:
    """``onednn`` or ``torch`` for ``model`` as it is placed now. ``auto``: oneDNN for an fp32
    model on an AVX-512 CPU whose largest linear layer has at least ``AUTO_MIN_WEIGHTS``
    weights. On an AVX2-only CPU (a 2-core AMD EPYC, SmolLM2-135M) oneDNN made a one-token
    step 24% slower (70.6 ms against 57.0) while saving 10–18% on verify passes of 3–8 tokens:
    plain decoding, and the auto modes that mostly rest where drafting does not pay, lose more
    than the verify passes gain (``python benchmarks/trunk_pass.py MODEL``). Off the main
    thread (the serving engine's) ``auto`` is ``torch``: oneDNN's calls from a second Python
    thread start OpenMP work that costs far more there (SmolLM2-135M on 2 AVX-512 cores: plain
    decoding at 9.4 tokens/s from a worker thread against 16.5 from the main thread; torch's
    kernel 14.7 and 15.0: ``python benchmarks/worker_thread.py MODEL``)."""
    if requested not in LINEAR_KERNELS:
        raise MultitokenError(
            f"unknown kernel {requested!r} (choose from {', '.join(LINEAR_KERNELS)})",
            "--linear-kernel",
        )
    weight = next(model.parameters())
    fits = weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available()
    if requested == "onednn" and not fits:
        raise MultitokenError(
            f"oneDNN linear layers need an fp32 model on a CPU with oneDNN; this one is "
            f"{weight.dtype} on {weight.device}",
            "--linear-kernel",
        )
    if requested == "auto":
        if threading.current_thread() is not threading.main_thread():
            return "torch"
        largest = max((m.weight.numel() for m in _linears(model)), default=0)
        big = fits and largest >= AUTO_MIN_WEIGHTS
        return "onednn" if big and cpu_kind().startswith("AVX512") else "torch"
    return requested


@contextlib.contextmanager
def linear_kernels(model: nn.Module, kernel: str) -> Iterator[None]:
    """Within the block, ``model``'s linear layers run on ``kernel`` (what
    :func:`choose_linear_kernel` returned) when autograd is off."""
    if kernel != "onednn":
        yield
        return
    patched = []
    try:
        for module in _linears(model):
            weight, bias = _packed(module)
            module.forward = _onednn_forward(
                module, weight, bias
            )  # instance attribute: undone below
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def active_kernel(model: nn.Module) -> str:
    """The kernel ``model``'s linear layers run on right now (inside :func:`linear_kernels`)."""
    first = next(_linears(model), None)
    return "onednn" if first is not None and "forward" in vars(first) else "torch"


def _linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (m for m in model.modules() if type(m) is nn.Linear)


def _packed(module: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    known = _PACKED.get(module)
    if known is not None and known[0] == w.data_ptr() and known[1] == w._version:
        return known[2], known[3]
    with torch.no_grad():
        bias = module.bias if module.bias is not None else w.new_zeros(w.size(0))
        packed = (w.data_ptr(), w._version, w.detach().to_mkldnn(), bias.detach().to_mkldnn())
    _PACKED[module] = packed
    return packed[2], packed[3]


def _onednn_forward(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32:
            return F.linear(x, module.weight, module.bias)
        # oneDNN takes [N, in] and [*, N, in] alike; its output comes back as a dense tensor
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight, bias).to_dense()

    return forward
