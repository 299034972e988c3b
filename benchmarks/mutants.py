"""Mutation check of the exactness tests: apply one bug at a time to a copy of the sources and
report which tests catch it. Every mutant must be caught by at least one test.

    python benchmarks/mutants.py                 # all mutants, the sampling-exactness tests
    python benchmarks/mutants.py --only chain-accept-5%

Each mutant is a one-line change a plausible bug would make: acceptance 5% too generous, a
draft law q that ignores the temperature (drafts drawn at T, acceptance computed with q at
T = 1), a verification whose p ignores top-k / top-p, a rejection that samples p instead of the
residual norm(max(p - q, 0)). The tests run against the mutated copy (PYTHONPATH puts it ahead
of the installed package); the working tree is never touched.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tests whose job is exactness of sampled and greedy decoding (the rest of the suite does
# not look at output distributions).
TESTS = [
    "tests/decode/test_sampling.py",
    "tests/decode/trees/test_shape.py",
    "tests/decode/trees/test_step.py",
    "tests/decode/test_api.py",
    "tests/heads/test_draft_vocab.py",
    "tests/decode/trees/test_lookup.py",
    "tests/decode/trees/test_budget.py",
    "tests/decode/trees/test_dynamic.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/multitoken
    old: str  # must occur exactly once
    new: str
    what: str


MUTANTS = [
    Mutant(
        "chain-accept-5%",
        "decode/sampling.py",
        "m = (u < ratio.squeeze(-1).clamp(max=1.0))",
        "m = (u < (1.05 * ratio.squeeze(-1)).clamp(max=1.0))",
        "a chain accepts d_j with min(1, 1.05 p/q)",
    ),
    Mutant(
        "tree-accept-5%",
        "decode/trees/accept.py",
        "accept = tried & (u * qt < pt)",
        "accept = tried & (u * qt < 1.05 * pt)",
        "a tree accepts child c with min(1, 1.05 p'(c)/q'(c))",
    ),
    Mutant(
        "chain-q-ignores-temperature",
        "decode/sampling.py",
        "    return tokens, q\n",
        "    return tokens, probs(logits, Sampling(1.0, sampling.top_k, sampling.top_p))\n",
        "chain drafts drawn at T, accepted against q at T = 1",
    ),
    Mutant(
        "tree-q-ignores-temperature",
        "decode/trees/step.py",
        "q = None if plan.sampling.greedy else probs(logits, plan.sampling)",
        "q = None if plan.sampling.greedy else probs(logits, "
        "type(plan.sampling)(1.0, plan.sampling.top_k, plan.sampling.top_p))",
        "tree candidates drawn at T, accepted against q at T = 1",
    ),
    Mutant(
        "chain-verify-ignores-top-k-p",
        "decode/chain.py",
        "p = probs(logits, plan.sampling)  # [B, K+1, V]",
        "p = probs(logits, type(plan.sampling)(plan.sampling.temperature, 0, 1.0))",
        "a chain verifies against p without top-k / top-p",
    ),
    Mutant(
        "tree-verify-ignores-top-k-p",
        "decode/trees/step.py",
        "p = probs(logits, plan.sampling)  # [B, N, V]",
        "p = probs(logits, type(plan.sampling)(plan.sampling.temperature, 0, 1.0))",
        "a tree verifies against p without top-k / top-p",
    ),
    Mutant(
        "chain-residual-is-p",
        "decode/sampling.py",
        "residual(p_next, q_next), 1, generator=generator)",
        "p_next, 1, generator=generator)",
        "after a chain rejection the next token is drawn from p, not norm(max(p - q, 0))",
    ),
    Mutant(
        "tree-residual-is-p",
        "decode/trees/accept.py",
        "torch.where(reject, residual(target, offer), target)",
        "torch.where(reject, target, target)",
        "after a tree rejection the next candidate is judged against p, not the residual",
    ),
    Mutant(
        "greedy-accepts-one-more",
        "decode/sampling.py",
        "return (drafts == target[:, :K]).long().cumprod(dim=1).sum(dim=1)",
        "return ((drafts == target[:, :K]).long().cumprod(dim=1).sum(dim=1) + 1).clamp(max=K)",
        "greedy chains keep one draft past the first mismatch",
    ),
]


def run(mutant: Mutant, tests: list[str], workers_env: dict) -> tuple[list[str], float]:
    """The tests that fail with ``mutant`` applied to a copy of src/, and the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        target = src / "multitoken" / mutant.file
        text = target.read_text()
        if text.count(mutant.old) != 1:
            sys.exit(f"mutant {mutant.name}: the line to change is not once in {mutant.file}")
        target.write_text(text.replace(mutant.old, mutant.new))
        # one worker per core on one thread each, as `make test` runs the suite
        env = {**workers_env, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rf", "-n", "auto", "-p", "no:cacheprovider"]
            + tests,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - start
        if "multitoken" not in proc.stdout + proc.stderr and proc.returncode not in (0, 1):
            sys.exit(f"mutant {mutant.name}: pytest could not run:\n{proc.stderr[-2000:]}")
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return [f.split(" - ")[0] for f in failed], took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutant names (default: all)")
    parser.add_argument("--tests", nargs="*", default=TESTS, help="test files to run")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = ", ".join(m.name for m in MUTANTS)
        sys.exit(f"unknown mutant in {args.only}; known: {known}")
    env = dict(os.environ)
    rows = []
    for m in chosen:
        failed, took = run(m, args.tests, env)
        rows.append((m, failed))
        caught = f"{len(failed)} tests" if failed else "NOT CAUGHT"
        print(f"{m.name:30} {caught:12} {took:6.0f}s", file=sys.stderr, flush=True)
    print("| mutant | the bug | caught by |")
    print("|---|---|---|")
    for m, failed in rows:
        names = ", ".join(f"`{f.split('::')[-1]}`" for f in failed[:4])
        more = f" and {len(failed) - 4} more" if len(failed) > 4 else ""
        print(f"| `{m.name}` | {m.what} | {names + more if failed else '**nothing**'} |")
    sys.exit(1 if any(not failed for _, failed in rows) else 0)


if __name__ == "__main__":
    main()
