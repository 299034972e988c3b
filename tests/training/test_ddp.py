"""The trainer runs unchanged under torchrun with DDP (gloo on CPU): ranks end identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("family", ["meta", "deepseek"])  # meta: the head-by-head backward
def test_two_process_ddp_ranks_end_with_identical_parameters(tmp_path, family):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):  # ranks take disjoint files, so their gradients differ before all-reduce
        (data / f"{i}.txt").write_text(
            f"document {i}: " + "lorem ipsum dolor sit amet " * 40 * (i + 1)
        )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).parent / "ddp_worker.py"),
            str(out),
            str(data),
            family,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(out / "params-rank0.pt")
    b = torch.load(out / "params-rank1.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # rank 0 wrote the checkpoint; it holds the same (trained) weights
    import multitoken

    saved = multitoken.load(out).state_dict()
    for name in a:
        assert torch.equal(saved[name], a[name]), name
