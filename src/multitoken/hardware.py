"""Device and precision, chosen from the hardware — one place for train, distill, generate, bench.

bf16 pays only where the device computes it natively: CUDA with bf16 support, or a CPU whose
oneDNN has bf16 kernels (AVX512-BF16 / AMX). Elsewhere bf16 is emulated and many times slower
than fp32 (on an AVX2-only AMD EPYC, a 512×512 matmul took 230 ms in bf16 and 12 ms in fp32).
oneDNN's flag alone can mislead (some AVX512 CPUs report bf16 support and emulate it), so a CPU
that claims it also has to win a one-off timing of a small matmul.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from multitoken.config import PRECISIONS
from multitoken.errors import MultitokenError

log = logging.getLogger("multitoken")


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in, and why it was chosen."""

    name: str  # "bf16" or "fp32"
    reason: str
    explicit: bool = False  # the user named it rather than leaving it to "auto"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
        """A factory of autocast contexts for training (fp32 master weights, bf16 matmuls)."""
        if self.name == "fp32":
            return contextlib.nullcontext
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)

    def describe(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def resolve_device(spec: str = "auto", flag: str = "--device") -> torch.device:
    """``auto`` is the local CUDA device where there is one (``LOCAL_RANK`` under torchrun)."""
    auto = spec == "auto"
    try:
        device = torch.device("cuda" if auto else spec)
    except RuntimeError as exc:
        raise MultitokenError(str(exc), flag) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if auto:
            return torch.device("cpu")
        raise MultitokenError("CUDA is not available on this machine", flag)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if auto else device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures the work rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_kind() -> str:
    """What the CPU's kernels can use, e.g. ``AVX2`` or ``AVX512``."""
    return str(torch.backends.cpu.get_cpu_capability())


def _oneDNN_claims_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def _matmul_seconds(dtype: torch.dtype, n: int = 384, repeats: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # first call pays for kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_bf16_native() -> tuple[bool, str]:
    """(whether bf16 is native and faster on this CPU, a few words saying how we know)."""
    kind = cpu_kind()
    if not _oneDNN_claims_bf16():
        return False, f"CPU {kind} without native bf16"
    fp32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    if bf16 >= fp32:
        return False, f"CPU {kind}: bf16 matmul {bf16 / fp32:.1f}x the time of fp32, emulated"
    return True, f"CPU {kind} with native bf16, matmul {fp32 / bf16:.1f}x faster than fp32"


def bf16_native(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'with' if ok else 'without'} bf16"
    if device.type == "cpu":
        return cpu_bf16_native()
    return False, f"{device.type}: bf16 not probed"


def choose_precision(requested: str, device: torch.device, flag: str = "--precision") -> Precision:
    """``auto``: bf16 where the device computes it natively and faster, else fp32. An explicit
    ``bf16`` on a device that only emulates it is honoured with a warning (it is slow, not wrong).
    """
    if requested not in PRECISIONS:
        raise MultitokenError(
            f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})", flag
        )
    if requested == "fp32":
        return Precision("fp32", "asked for", explicit=True)
    native, why = bf16_native(device)
    if requested == "bf16":
        if not native:
            if device.type == "cuda":
                raise MultitokenError(f"bf16 is not supported on {why}", flag)
            log.warning("bf16 is emulated here (%s): expect it to be much slower than fp32", why)
        return Precision("bf16", f"asked for; {why}", explicit=True)
    return Precision("bf16" if native else "fp32", f"auto: {why}")


def decode_dtype(precision: Precision, model_dtype: torch.dtype, device: torch.device):
    """The weight dtype to decode in: the chosen precision's, except that a half-precision
    model on a GPU keeps its fp16 (GPUs compute fp16 natively; a CPU does not)."""
    if device.type == "cuda" and model_dtype == torch.float16 and not precision.explicit:
        return torch.float16
    return precision.dtype


def decode_precision(requested: str, device: torch.device) -> Precision:
    """The precision decoding runs in. Self-speculative decoding is exact only if a verify pass
    over q tokens picks what q one-token passes pick. In bf16 each layer's output is rounded to
    8 mantissa bits in a way that depends on the kernel the batch shape selects, so near-ties
    flip: on SmolLM2-135M, 2% of 4-token verify positions disagreed with one-token greedy
    (``benchmarks/precision.py``). So on a CPU ``auto`` decodes in fp32 even where bf16 is
    native; on a GPU it takes bf16 as every serving stack does (exact up to that rounding)."""
    if requested == "auto" and device.type == "cpu":
        return Precision("fp32", "auto: fp32 decoding keeps verify passes bit-stable on a CPU")
    chosen = choose_precision(requested, device)
    if chosen.name == "bf16" and device.type == "cpu":
        log.warning(
            "bf16 decoding: a verify pass can round a near-tie differently from a one-token "
            "pass, so output may differ from plain decoding where the top two logits tie"
        )
    return chosen


def place_for_decoding(model: torch.nn.Module, device: str, precision: str) -> Precision:
    """Move ``model`` to the device and weight dtype it decodes in; returns the choice made."""
    where = resolve_device(device)
    chosen = decode_precision(precision, where)
    current = next(model.parameters()).dtype
    model.to(device=where, dtype=decode_dtype(chosen, current, where))
    return chosen
