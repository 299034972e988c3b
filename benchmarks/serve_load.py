"""``multitoken serve`` under load: the speculative server against the plain one, in one run.

Both servers (self-speculative, the default; plain, ``--no-speculate``) are started here on
127.0.0.1 on free ports (no traffic goes anywhere else). At each concurrency N (default 1, 4,
16, 64), N clients send chat prompts from a file through the official ``openai`` client,
streamed, greedy, ``--max-tokens`` each, to one server and then the other, ``--rounds`` times
with the order swapped each round, so that the machine's drift (the same decoding runs 10%
apart from one minute to the next on a shared 2-core machine) slows both alike. The table shows
per concurrency: aggregate tokens/s, time to first token and per-token latency (p50/p95),
errors, and for the speculative server the share of its steps that drafted (read from its
``/metrics``). Greedy answers must be the same from both
servers (checked: speculation is lossless under load). ``multitoken generate``'s tokens/s on
the same prompts, one at a time, is the concurrency-1 reference. ``--soak S`` adds a run of S
seconds at concurrency 16 where 5% of the clients disconnect mid-stream: errors, lost requests
and the server's memory (RSS) over the run. Bounded: requests per level, a time limit per
level, a timeout per request; the servers are stopped with SIGTERM and must exit 0.

Usage (the demo checkpoint; ``make demo`` builds it):

    python benchmarks/serve_load.py --checkpoint runs/demo/model --heads runs/demo/heads \\
        [--prompts benchmarks/data/chat_prompts.jsonl] [--concurrency 1 4 16 64] \\
        [--max-tokens 64] [--soak 600] [--out runs/serve_load]

Prints the table and the targets; writes OUT/serve_load.json and OUT/serve_load.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the only address this benchmark sends traffic to
READY = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)")


@dataclass
class Outcome:
    """One request: when it started, got its first token, ended; tokens; an error."""

    prompt: int
    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None
    disconnected: bool = False


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    wall_s: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    tpot_p50: float
    tpot_p95: float
    errors: int
    lost: int
    extra: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Server:
    """``multitoken serve`` in a subprocess on 127.0.0.1, port chosen by the OS."""

    def __init__(self, args: argparse.Namespace, speculate: bool) -> None:
        command = [sys.executable, "-m", "multitoken", "serve", "--checkpoint", args.checkpoint]
        command += ["--heads", args.heads] if args.heads else []
        command += ["--host", HOST, "--port", "0", "--max-batch", str(args.max_batch)]
        command += ["--max-queue", str(max(256, 4 * max(args.concurrency)))]
        command += [] if speculate else ["--no-speculate"]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT
        )
        self.log: list[str] = []
        deadline = time.monotonic() + 600
        port = None
        while port is None:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise SystemExit(f"the server exited: {''.join(self.log[-5:])}")
            self.log.append(line)
            match = READY.search(line)
            port = int(match.group(1)) if match else None
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 10 minutes")
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://{HOST}:{port}/v1"

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def counters(self) -> dict[str, float]:
        """The engine's counters from ``/metrics`` (Prometheus text), by name."""
        import httpx

        text = httpx.get(self.url.removesuffix("/v1") + "/metrics", timeout=30).text
        found = re.findall(r"^(multitoken_\w+_total) ([0-9.e+]+)$", text, flags=re.M)
        return {name: float(value) for name, value in found}

    def rss_mib(self) -> float:
        """The server's resident memory (Linux /proc)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        return kib / 1024

    def stop(self, grace: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


def client(url: str, timeout: float):
    import openai

    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)


def one_request(api, model: str, messages: list[dict], i: int, args, disconnect: bool) -> Outcome:
    """One streamed chat request; with ``disconnect`` the client goes away after 3 chunks."""
    out = Outcome(i, time.perf_counter())
    parts: list[str] = []
    try:
        stream = api.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if out.first is None:
                    out.first = time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
                chunks += 1
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
            if disconnect and chunks >= 3:
                stream.close()
                out.disconnected = True
                break
        out.end = time.perf_counter()
    except Exception as exc:  # any failure of a request is counted and reported, not raised
        out.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    out.text = "".join(parts)
    return out


def run_level(url, model, prompts, concurrency, requests, args, disconnect_share=0.0, until=None):
    """``concurrency`` clients share ``requests`` requests (or run until ``until``)."""
    import random

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    rng = random.Random(0)
    deadline = time.monotonic() + (until or args.level_limit)

    def worker() -> None:
        api = client(url, args.request_timeout)
        while time.monotonic() < deadline:
            with lock:
                i = next(counter)
                if until is None and i >= requests:
                    return
                leave = rng.random() < disconnect_share
            got = one_request(api, model, prompts[i % len(prompts)], i, args, leave)
            with lock:
                outcomes.append(got)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - t0


def summarize(mode, concurrency, outcomes, wall) -> Level:
    ok = [o for o in outcomes if o.error is None and not o.disconnected]
    errors = sum(o.error is not None for o in outcomes)
    lost = sum(1 for o in ok if o.tokens == 0)  # finished without a token or usage
    tokens = sum(o.tokens for o in ok)
    ttft = [o.first - o.start for o in ok if o.first is not None]
    tpot = [(o.end - o.first) / (o.tokens - 1) for o in ok if o.first and o.tokens > 1]
    return Level(
        mode,
        concurrency,
        len(outcomes),
        wall,
        tokens / wall,
        percentile(ttft, 0.5),
        percentile(ttft, 0.95),
        percentile(tpot, 0.5),
        percentile(tpot, 0.95),
        errors,
        lost,
    )


def drafting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the speculative server's steps did between two reads of its counters."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("multitoken_steps_total")
    if steps <= 0:
        return {}
    return {
        "drafting_share": delta("multitoken_draft_steps_total") / steps,
        "drafts_accepted_per_step": delta("multitoken_drafts_accepted_total") / steps,
        "steps": steps,
    }


def generate_reference(args, prompts) -> float:
    """``multitoken generate``'s tokens/s on the prompts, one at a time, greedy, in process."""
    import multitoken
    from multitoken.decode.api import generate
    from multitoken.hardware import place_for_decoding

    model = multitoken.load(args.checkpoint, heads=args.heads)
    place_for_decoding(model, "auto", "auto")
    stop = model.stop_ids()
    ids = [
        model.tokenizer.encode(
            model.tokenizer.apply_chat_template(m, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for m in prompts
    ]
    generate(model, [ids[0]], max_new_tokens=8, eos_id=stop)  # the cost model, measured once
    tokens, seconds = 0, 0.0
    for prompt in ids[: args.reference_prompts]:
        out = generate(model, [prompt], max_new_tokens=args.max_tokens, eos_id=stop)
        tokens += out.stats.tokens
        seconds += out.stats.wall_s
    return tokens / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--heads")
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks/data/chat_prompts.jsonl"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="turns of each server per level")
    parser.add_argument("--level-limit", type=float, default=300, help="seconds per level")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--reference-prompts", type=int, default=8)
    parser.add_argument("--soak", type=float, default=0, help="seconds of the soak run (0: none)")
    parser.add_argument("--out", default=str(ROOT / "runs/serve_load"))
    args = parser.parse_args()

    from multitoken.text.prompts import read_prompt_records

    records = [r for r in read_prompt_records(args.prompts) if r.is_chat]
    prompts = [r.messages for r in records]
    if not prompts:
        raise SystemExit(f"no chat prompts in {args.prompts}")
    cpu = platform.processor() or platform.machine()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 (bf16 emulated)"
    print(f"CPU: {os.cpu_count()} cores, {kind}, {cpu}", flush=True)

    reference = generate_reference(args, prompts)
    print(f"multitoken generate, one prompt at a time: {reference:.1f} tokens/s", flush=True)

    import openai

    servers = {"speculative": Server(args, True), "plain": Server(args, False)}
    model = openai.OpenAI(base_url=servers["plain"].url, api_key="none").models.list().data[0].id
    for server in servers.values():
        run_level(server.url, model, prompts, 1, 1, args)  # warm-up
    levels: list[Level] = []
    answers: dict[str, dict[int, str]] = {mode: {} for mode in servers}
    for c in args.concurrency:
        n = max(args.min_requests, c * args.requests_per_client)
        got: dict[str, tuple[list[Outcome], float]] = {mode: ([], 0.0) for mode in servers}
        before = servers["speculative"].counters()
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
            for mode in order:
                outcomes, wall = run_level(servers[mode].url, model, prompts, c, n, args)
                got[mode] = (got[mode][0] + outcomes, got[mode][1] + wall)
        after = servers["speculative"].counters()
        for mode, (outcomes, wall) in got.items():
            level = summarize(mode, c, outcomes, wall)
            if mode == "speculative":
                level.extra = drafting(before, after)
            levels.append(level)
            for o in outcomes:
                if o.error is None and not o.disconnected:
                    answers[mode].setdefault(o.prompt % len(prompts), o.text)
            share = level.extra.get("drafting_share")
            print(
                f"  {mode:>11} c={c:<3} {level.tokens_per_s:7.1f} tok/s  ttft p50 "
                f"{level.ttft_p50:.2f}s  errors {level.errors}"
                + (f"  drafting steps {100 * share:.0f}%" if share is not None else ""),
                flush=True,
            )
    exits = {mode: server.stop() for mode, server in servers.items()}
    same = [k for k in answers["speculative"] if k in answers["plain"]]
    differ = [k for k in same if answers["speculative"][k] != answers["plain"][k]]

    soak = None
    if args.soak > 0:
        server = Server(args, True)
        run_level(server.url, model, prompts, 1, 1, args)
        rss = [server.rss_mib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(10):
                rss.append(server.rss_mib())

        threading.Thread(target=sample, daemon=True).start()
        outcomes, wall = run_level(server.url, model, prompts, 16, 0, args, 0.05, until=args.soak)
        done.set()
        rss.append(server.rss_mib())
        level = summarize("soak", 16, outcomes, wall)
        half = len(outcomes) // 2
        soak = {
            **asdict(level),
            "disconnected": sum(o.disconnected for o in outcomes),
            "rss_mib_start": rss[0],
            "rss_mib_end": rss[-1],
            "rss_mib_mid": rss[len(rss) // 2],
            "requests_second_half": len(outcomes) - half,
        }
        exits["soak"] = server.stop()

    print_table(levels, reference, differ, same, exits, soak)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "cpu": kind,
        "generate_tokens_per_s": reference,
        "levels": [asdict(level) for level in levels],
        "answers_compared": len(same),
        "answers_differ": len(differ),
        "exit_codes": exits,
        "soak": soak,
        "args": vars(args),
    }
    (out / "serve_load.json").write_text(json.dumps(result, indent=1))
    plot(levels, reference, out / "serve_load.png")
    print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.png'}")
    return 0


def print_table(levels, reference, differ, same, exits, soak) -> None:
    print()
    print(
        "| server | clients | requests | tokens/s | TTFT p50 / p95 (s) | per token p50 / p95 (ms) "
        "| errors | drafting steps |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|")
    for v in levels:
        share = v.extra.get("drafting_share")
        print(
            f"| {v.mode} | {v.concurrency} | {v.requests} | {v.tokens_per_s:.1f} | "
            f"{v.ttft_p50:.2f} / {v.ttft_p95:.2f} | {1e3 * v.tpot_p50:.0f} / {1e3 * v.tpot_p95:.0f} "
            f"| {v.errors} | {'-' if share is None else f'{100 * share:.0f}%'} |"
        )
    print()
    by = {(v.mode, v.concurrency): v for v in levels}
    one = by.get(("speculative", 1))
    if one is not None:
        share = one.tokens_per_s / reference
        verdict = "met" if share >= 0.9 else "MISSED"
        print(
            f"target: concurrency 1 keeps >= 90% of generate's {reference:.1f} tokens/s: "
            f"{100 * share:.0f}% ({verdict})"
        )
    for (mode, c), v in sorted(by.items(), key=lambda kv: kv[0][1]):
        if mode != "speculative" or ("plain", c) not in by:
            continue
        ratio = v.tokens_per_s / by["plain", c].tokens_per_s
        verdict = "met" if ratio >= 1.0 else "MISSED"
        print(f"target: concurrency {c}: speculative / plain tokens/s = {ratio:.2f}x ({verdict})")
    errors = sum(v.errors + v.lost for v in levels)
    print(
        f"errors + lost requests: {errors}; greedy answers differing between the servers: "
        f"{len(differ)} of {len(same)}; exit codes on SIGTERM: {exits}"
    )
    if soak is not None:
        growth = soak["rss_mib_end"] - soak["rss_mib_mid"]
        print(
            f"soak: {soak['requests']} requests in {soak['wall_s']:.0f} s at concurrency 16, "
            f"{soak['disconnected']} disconnected mid-stream, {soak['errors']} errors, "
            f"{soak['lost']} lost; RSS {soak['rss_mib_start']:.0f} -> {soak['rss_mib_mid']:.0f} "
            f"-> {soak['rss_mib_end']:.0f} MiB (second half: {growth:+.0f} MiB)"
        )


def plot(levels, reference, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("speculative", "o-"), ("plain", "s--")):
        rows = [v for v in levels if v.mode == mode]
        xs = [v.concurrency for v in rows]
        left.plot(xs, [v.tokens_per_s for v in rows], style, label=f"{mode} server")
        right.plot(xs, [v.ttft_p50 for v in rows], style, label=f"{mode} server")
    left.axhline(reference, color="grey", lw=0.8, label="generate, one at a time")
    for ax, title in ((left, "aggregate tokens/s"), (right, "time to first token p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
