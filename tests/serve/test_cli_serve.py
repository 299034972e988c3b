"""``multitoken serve`` (multitoken.cli.serve): the real command in a subprocess — ready line
with the port it bound, the API key from the environment, SIGTERM letting the request in flight
finish before exit 0 — and its bad flags, one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import one_line_error

from multitoken.cli import build_parser, main
from multitoken.config import API_KEY_VARIABLE

from .conftest import KEY

READY = re.compile(r"^multitoken: serving (\S+) on (http://127\.0\.0\.1:(\d+))$")
GRACE = 20
NEW_TOKENS = 200  # greedy, none of the prompts below ends sooner


class Command:
    """``multitoken serve`` in a subprocess; its stderr read line by line on a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "multitoken", "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def ready(self, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if match := READY.match(line):
                    return match
            assert self.process.poll() is None, "\n".join(self.lines)
            time.sleep(0.05)
        raise AssertionError("no ready line: " + "\n".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Stream:
    """One streamed completion read on a thread: its status, then its ``data:`` payloads."""

    def __init__(self, url: str, headers: dict[str, str], prompt: str) -> None:
        self.url, self.headers, self.prompt = url, headers, prompt
        self.status: int | None = None
        self.data: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
        with httpx.Client(base_url=self.url, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json=body, headers=self.headers) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.data.append(line[6:])


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_serve_answers_then_drains_on_sigterm_and_exits_0(tiny_run: Path):
    """One row (--max-batch 1) and three requests of NEW_TOKENS tokens: at SIGTERM the first
    has barely begun and the others wait in the queue. The server stops listening, yet all
    three finish in full; then it exits 0. (--no-speculate: the engine starts without timing
    the trunk, which the tests of the engine and of the app cover.)"""
    args = ["--checkpoint", str(tiny_run), "--port", "0", "--grace", str(GRACE), "--no-speculate"]
    command = Command(
        *args, "--max-batch", "1", "--model-name", "tiny-cli", env={API_KEY_VARIABLE: KEY}
    )
    try:
        ready = command.ready()
        assert ready.group(1) == "tiny-cli" and int(ready.group(3)) > 0
        url, port = ready.group(2), int(ready.group(3))
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok"}
            assert http.get("/v1/models").status_code == 401  # the key came from the env
        good = {"Authorization": f"Bearer {KEY}"}
        prompts = ["the quick", "the quick brown", "return width"]
        streams = [Stream(url, good, p) for p in prompts]
        wait_for(lambda: all(s.status == 200 for s in streams) and streams[0].data)
        command.process.send_signal(signal.SIGTERM)

        # it stops taking connections while the three requests are still being answered
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_for(refused, timeout=10)
        for stream in streams:
            stream.thread.join(timeout=GRACE)
            assert stream.data[-1] == "[DONE]", stream.data[-3:]
            chunks = [json.loads(d) for d in stream.data[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
        assert command.process.wait(timeout=GRACE) == 0, "\n".join(command.lines)
        command.reader.join(timeout=5)
        assert command.lines[-1] == "multitoken: stopped"
        assert not any("Traceback" in line for line in command.lines), command.lines
    finally:
        command.stop()


def test_serve_imports_no_web_stack_until_it_runs():
    code = (
        "import sys, multitoken.cli\n"
        "multitoken.cli.build_parser()\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_serve_takes_no_per_request_sampling_flags():
    parser = build_parser()
    args = parser.parse_args(["serve", "--checkpoint", "x", "--tree", "chain", "--port", "0"])
    assert args.tree == "chain" and args.port == 0
    for flag in ("--temperature", "--max-new-tokens", "--seed", "--top-p", "--top-k"):
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(["serve", "--checkpoint", "x", flag, "1"])
        assert caught.value.code == 2


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "0"], "--max-queue"),
        (["--grace", "-1"], "--grace"),
        (["--api-key", " "], "--api-key"),
        (["--draft-len", "0"], "--draft-len"),
        (["--precision", "fp8"], None),  # argparse's choices
    ],
)
def test_bad_serve_flags_are_one_line_and_exit_2(tiny_run, capsys, flags, flag):
    try:
        status = main(["serve", "--checkpoint", str(tiny_run), *flags])
    except SystemExit as exc:  # argparse refuses it before main's handler
        status = exc.code
        assert capsys.readouterr().err.count("\n") <= 2  # usage line + error line
    else:
        one_line_error(capsys, flag)
    assert status == 2


def test_a_port_in_use_is_one_line_and_exit_2(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--checkpoint", str(tiny_run), "--port", str(port), "--no-speculate"]
        assert main(args) == 2
    assert "cannot listen" in one_line_error(capsys, "--port")
