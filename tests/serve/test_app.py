"""The HTTP side (multitoken.serve.app) over a fake engine whose tokens the test chooses: the
official ``openai`` client and raw HTTP against a server on a free port of this process.

Bad input of every kind is a 4xx with OpenAI's error body and the server goes on; stop strings
and stop tokens end the text where they should; a full queue is a 429; a client that leaves, mid-
stream or before its whole answer, has its request cancelled in the engine."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from multitoken.text.chat import ChatTemplateError

from .conftest import KEY, MODEL, FakeEngine

CHAT = [{"role": "user", "content": "hi"}]
ANSWER = "Hello world! The end."


@pytest.fixture
def tok(served_model):
    return served_model.tokenizer


@pytest.fixture
def answer(tok) -> list[int]:
    """The fake engine's script: ANSWER, then the end-of-turn token (the eos, id 2)."""
    return tok.encode(ANSWER) + [tok.eos_id]


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_chat_with_the_openai_client_streamed_and_not(serve, answer, tok, served_model):
    server = serve(FakeEngine(answer))
    client = server.client()
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=50)
    choice = reply.choices[0]
    assert choice.message.content == ANSWER  # the end-of-turn token is not text
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    prompt = tok.encode(rendered, add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(answer)  # the stop token counts
    assert reply.usage.total_tokens == len(prompt) + len(answer)
    assert reply.id.startswith("chatcmpl-") and reply.model == MODEL

    sent = server.engine.requests[-1]
    assert sent.prompt == prompt and sent.max_tokens == 50
    assert sent.stop_ids == frozenset(served_model.stop_ids())
    assert sent.temperature == 1.0 and sent.top_p == 1.0 and sent.top_k == 0  # OpenAI's defaults

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
            top_p=0.5,
            seed=7,
            extra_body={"top_k": 3},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(answer)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    sent = server.engine.requests[-1]
    assert (sent.temperature, sent.top_p, sent.top_k, sent.seed) == (0.0, 0.5, 3, 7)


def test_completions_streamed_end_with_done_and_a_text_prompt_gets_the_bos(serve, answer, tok):
    server = serve(FakeEngine(answer))
    with server.http() as http:
        with http.stream(
            "POST", "/v1/completions", json={"model": MODEL, "prompt": "abc", "stream": True}
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)  # not asked for
    assert server.engine.requests[-1].prompt == tok.encode("abc", add_special_tokens=True)
    assert server.engine.requests[-1].prompt[0] == tok.bos_id

    reply = server.client().completions.create(model=MODEL, prompt=[[5, 6, 7]], max_tokens=3)
    assert server.engine.requests[-1].prompt == [5, 6, 7]
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].text == tok.decode(answer[:3])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 3)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_text_and_frees_the_row(serve, answer, stream):
    engine = FakeEngine(answer, per_step=1, delay=0.01)
    server = serve(engine)
    options = dict(model=MODEL, prompt="x", stop=["wor", "zzz"], max_tokens=50)
    if stream:
        chunks = list(server.client().completions.create(stream=True, **options))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = server.client().completions.create(**options)
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == "Hello " and finish == "stop"
    assert engine.cancelled == {1}  # the engine was told to stop decoding it
    server.wait_idle()


def test_max_tokens_defaults_to_what_the_context_leaves(serve, answer):
    engine = FakeEngine(answer)
    server = serve(engine, default_max_tokens=100)
    client = server.client()
    client.completions.create(model=MODEL, prompt=[7] * 10)
    assert engine.requests[-1].max_tokens == 100
    client.completions.create(model=MODEL, prompt=[7] * 200)
    assert engine.requests[-1].max_tokens == 56  # the context is 256
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[7] * 256)
    assert caught.value.body["code"] == "context_length_exceeded"


def bad_requests() -> list[tuple[str, str, object, int, str | None]]:
    """(name, path, body, status, param): raw requests and what they must get."""
    chat, text = "/v1/chat/completions", "/v1/completions"
    ok_chat = {"model": MODEL, "messages": CHAT}
    return [
        ("malformed JSON", chat, b'{"model": "tiny", "messages": [', 400, None),
        ("not an object", text, b"[1, 2, 3]", 400, None),
        ("empty body", text, b"", 400, None),
        ("wrong type", chat, {**ok_chat, "max_tokens": "ten"}, 400, "max_tokens"),
        (
            "wrong nested type",
            chat,
            {**ok_chat, "messages": [{"role": 1}]},
            400,
            "messages[0].role",
        ),
        ("unknown model", chat, {**ok_chat, "model": "gpt-4"}, 404, "model"),
        ("empty prompt", text, {"model": MODEL, "prompt": ""}, 400, "prompt"),
        ("empty messages", chat, {**ok_chat, "messages": []}, 400, "messages"),
        ("max_tokens 0", chat, {**ok_chat, "max_tokens": 0}, 400, "max_tokens"),
        ("temperature 3", chat, {**ok_chat, "temperature": 3}, 400, "temperature"),
        ("negative temperature", chat, {**ok_chat, "temperature": -1}, 400, "temperature"),
        ("top_p 0", text, {"prompt": "a", "top_p": 0}, 400, "top_p"),
        ("n 2", chat, {**ok_chat, "n": 2}, 400, "n"),
        ("too long", text, {"prompt": [5] * 300, "max_tokens": 1}, 400, "max_tokens"),
        ("max_tokens past the context", text, {"prompt": "a", "max_tokens": 1000}, 400, None),
        ("no such route", "/v1/embeddings", {"input": "a"}, 404, None),
    ]


def test_bad_input_is_a_4xx_with_openais_error_body_and_the_server_goes_on(serve, answer):
    server = serve(FakeEngine(answer))
    with server.http() as http:
        for name, path, body, status, param in bad_requests():
            if isinstance(body, bytes):
                response = http.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
            else:
                response = http.post(path, json=body)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["message"] and error["type"] == "invalid_request_error", name
            if param is not None:
                assert error["param"] == param, (name, error)
        assert http.get("/health").json() == {"status": "ok"}
        model = http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": CHAT}).json()[
            "error"
        ]
        assert model["code"] == "model_not_found"
    assert server.engine.requests == []  # nothing bad reached the engine
    reply = server.client().chat.completions.create(model=MODEL, messages=CHAT)
    assert reply.choices[0].message.content == ANSWER


def test_unknown_fields_do_not_bother_the_server(serve, answer):
    server = serve(FakeEngine(answer))
    body = {
        "model": MODEL,
        "messages": CHAT,
        "presence_penalty": 0,
        "repetition_penalty": "high",
        "tools": [],
        "response_format": {"type": "text"},
        "user": "someone",
    }
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER


def test_an_unimplemented_option_is_a_400_through_the_client_and_nothing_is_queued(serve, answer):
    server = serve(FakeEngine(answer))
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, frequency_penalty=1.0)
    assert "frequency_penalty" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", logprobs=2)
    assert server.engine.requests == []


def test_messages_a_chat_template_refuses_are_a_400(serve, answer, served_model, monkeypatch):
    server = serve(FakeEngine(answer))
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": image}]},
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"

        def refuse(messages, add_generation_prompt):
            raise ChatTemplateError("Conversation roles must alternate user/assistant")

        monkeypatch.setattr(served_model.tokenizer, "apply_chat_template", refuse)
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
        assert response.status_code == 400
        assert "must alternate" in response.json()["error"]["message"]
    assert server.engine.requests == []


def test_an_unexpected_failure_is_a_500_with_a_json_body_and_the_server_goes_on(serve, answer):
    engine = FakeEngine(answer)
    server = serve(engine)
    real_check = engine.check

    def broken(request):
        raise RuntimeError("a bug")

    engine.check = broken
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": "a"})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "a bug" in response.json()["error"]["message"]
        engine.check = real_check
        assert http.post("/v1/completions", json={"prompt": "a"}).status_code == 200


def test_the_api_key_guards_every_route_but_health(serve, answer):
    server = serve(FakeEngine(answer), api_key=KEY)
    with server.http() as http:
        assert http.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in [
                ("GET", "/v1/models"),
                ("GET", "/metrics"),
                ("POST", "/v1/completions"),
                ("POST", "/v1/chat/completions"),
            ]:
                response = http.request(method, path, headers=headers, json={"prompt": "a"})
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": f"Bearer {KEY}"}
        assert http.get("/v1/models", headers=good).json()["data"][0]["id"] == MODEL
        assert http.get("/metrics", headers=good).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model=MODEL, prompt="a")
    reply = server.client(api_key=KEY).completions.create(model=MODEL, prompt="a")
    assert reply.choices[0].text == ANSWER
    assert len(server.engine.requests) == 1


def test_models_lists_the_served_model(serve, answer):
    server = serve(FakeEngine(answer))
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "multitoken"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_full_queue_is_a_429(serve, answer):
    engine = FakeEngine(answer, max_batch=1, max_queue=1)
    server = serve(engine)
    engine.pause()  # nothing leaves the queue
    replies = []
    waiting = threading.Thread(
        target=lambda: replies.append(server.client().completions.create(model=MODEL, prompt="a"))
    )
    waiting.start()
    deadline = time.monotonic() + 10
    while engine.stats().queue_length < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as caught:
        server.client().completions.create(model=MODEL, prompt="b")
    assert caught.value.status_code == 429 and caught.value.body["message"]
    engine.resume()
    waiting.join(timeout=10)
    assert replies[0].choices[0].text == ANSWER  # the queued one was served


def test_a_client_leaving_mid_stream_frees_its_row(serve, answer):
    engine = FakeEngine(answer, per_step=1, delay=0.02)
    server = serve(engine)
    with server.http() as http:
        body = {"prompt": "a", "stream": True, "max_tokens": 200}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            assert engine.stats().batch_size == 1
        # the response is closed: the client has gone
    deadline = time.monotonic() + 5
    while 1 not in engine.cancelled:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.01)
    assert server.wait_idle().batch_size == 0
    assert server.client().completions.create(model=MODEL, prompt="a").choices[0].text == ANSWER


def assert_cancelled_and_drained(engine, server) -> None:
    """Request 1 gets cancelled within 5 seconds; resumed, the engine drains."""
    deadline = time.monotonic() + 5
    while 1 not in engine.cancelled:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.01)
    engine.resume()
    assert server.wait_idle().queue_length == 0


def test_a_streaming_client_leaving_while_queued_is_cancelled(serve, answer):
    engine = FakeEngine(answer)
    server = serve(engine)
    engine.pause()
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True}) as r:
            assert r.status_code == 200 and engine.stats().queue_length == 1
    assert_cancelled_and_drained(engine, server)


def test_a_client_leaving_before_a_whole_answer_frees_its_row(serve, answer):
    engine = FakeEngine(answer)
    server = serve(engine)
    engine.pause()
    with server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": "a"}, timeout=0.3)
    assert_cancelled_and_drained(engine, server)


def test_a_request_the_engine_cancels_is_a_503(serve, answer):
    engine = FakeEngine(answer)
    server = serve(engine)
    engine.pause()
    result = {}

    def ask() -> None:
        with server.http() as http:
            result["response"] = http.post("/v1/completions", json={"prompt": "a"})

    asking = threading.Thread(target=ask)
    asking.start()
    while not engine.requests:
        time.sleep(0.01)
    engine.cancel(1)  # as shutting down does once the grace period is over
    engine.resume()
    asking.join(timeout=10)
    assert result["response"].status_code == 503
    assert result["response"].json()["error"]["type"] == "server_error"


def test_metrics_count_requests_and_latencies(serve, answer):
    server = serve(FakeEngine(answer))
    server.client().completions.create(model=MODEL, prompt="a")
    server.client().chat.completions.create(model=MODEL, messages=CHAT)
    with server.http() as http:
        http.post("/v1/completions", json={"prompt": ""})
        text = http.get("/metrics").text
    lines = set(text.splitlines())
    assert "multitoken_requests_total 2.0" in lines
    assert f"multitoken_generation_tokens_total {2.0 * len(answer)}" in lines
    assert 'multitoken_request_latency_seconds_count{endpoint="completions"} 1.0' in lines
    assert 'multitoken_time_to_first_token_seconds_count{endpoint="chat"} 1.0' in lines
    assert 'multitoken_http_errors_total{status="400"} 1.0' in lines
    assert "multitoken_batch_size 0.0" in lines
