"""The OpenAI wire format (multitoken.serve.protocol): what request bodies are accepted, what is
refused with a 400 naming the field, and the exact shapes of responses and chunks."""

from __future__ import annotations

import json

import pytest

from multitoken.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    parse_body,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(model, body: dict | bytes):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_body(model, raw)


def refused(model, body: dict | bytes) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(model, body)
    assert caught.value.status == 400
    return caught.value


def test_unknown_fields_of_any_type_are_tolerated():
    extra = {
        "repetition_penalty": "not even a number",  # another server's field
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "parallel_tool_calls": None,
        "metadata": [1, [2, {"x": None}]],
    }
    body = parse(ChatCompletionRequest, {**CHAT, **extra})
    assert body.messages[0].as_template_input() == {"role": "user", "content": "hi"}
    assert body.temperature is None and body.stream is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", "5"),
        ("max_tokens", 5.5),
        ("temperature", "hot"),
        ("top_p", [1]),
        ("top_k", True),
        ("n", "1"),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("seed", "42"),
        ("stream", "yes"),
        ("stream_options", 1),
        ("messages", "hi"),
        ("model", 3),
        ("frequency_penalty", "high"),
        ("presence_penalty", [0]),
        ("logit_bias", {"50256": "-100"}),
        ("logprobs", "yes"),
        ("response_format", "json"),
    ],
)
def test_a_known_field_of_the_wrong_type_is_a_400_naming_it(field, value):
    error = refused(ChatCompletionRequest, {**CHAT, field: value})
    assert error.param.split(".")[0] == field, error.message  # logit_bias.50256: where inside
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "model, field, value",
    [
        (ChatCompletionRequest, "frequency_penalty", 0.5),
        (ChatCompletionRequest, "presence_penalty", -1),
        (ChatCompletionRequest, "logit_bias", {"50256": -100}),
        (ChatCompletionRequest, "logprobs", True),
        (ChatCompletionRequest, "top_logprobs", 2),
        (ChatCompletionRequest, "response_format", {"type": "json_object"}),
        (CompletionRequest, "logprobs", 1),
        (CompletionRequest, "echo", True),
        (CompletionRequest, "best_of", 2),
        (CompletionRequest, "suffix", "}"),
    ],
)
def test_a_field_that_would_change_the_answer_and_is_not_implemented_is_refused(
    model, field, value
):
    base = CHAT if model is ChatCompletionRequest else {"model": "m", "prompt": "hi"}
    error = refused(model, {**base, field: value})
    assert error.param == field and "not supported" in error.message


def test_those_fields_at_their_neutral_values_are_accepted():
    chat = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False}
    chat |= {"top_logprobs": 0, "response_format": {"type": "text"}}
    assert parse(ChatCompletionRequest, {**CHAT, **chat}).logprobs is False
    text = {"model": "m", "prompt": "hi", "logprobs": 0, "echo": False, "best_of": 1}
    assert parse(CompletionRequest, {**text, "suffix": ""}).best_of == 1


def test_a_penalty_out_of_range_is_a_400():
    error = refused(ChatCompletionRequest, {**CHAT, "presence_penalty": 2.5})
    assert error.param == "presence_penalty" and "[-2, 2]" in error.message


def test_a_wrong_type_inside_a_message_names_its_place():
    error = refused(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": 4}]})
    assert error.param == "messages[0].content"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"model": "m",}', b"null"])
def test_malformed_json_is_a_400(raw):
    error = refused(ChatCompletionRequest, raw)
    assert error.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_completion_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("n", 2),
        ("n", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", ""),
        ("seed", 2**64),
    ],
)
def test_a_value_out_of_range_is_a_400(field, value):
    error = refused(ChatCompletionRequest, {**CHAT, field: value})
    assert error.param == ("max_tokens" if field == "max_completion_tokens" else field)


def test_values_at_the_edges_of_their_ranges_are_accepted():
    body = parse(
        ChatCompletionRequest,
        {**CHAT, "temperature": 0, "top_p": 1, "top_k": -1, "n": 1, "stop": ["a"] * 4},
    )
    assert body.temperature == 0.0 and body.top_p == 1.0 and body.stop_strings() == ["a"] * 4
    assert parse(ChatCompletionRequest, {**CHAT, "temperature": 2}).temperature == 2.0


def test_max_completion_tokens_wins_over_max_tokens():
    body = parse(ChatCompletionRequest, {**CHAT, "max_tokens": 9, "max_completion_tokens": 4})
    assert body.requested_max_tokens() == 4
    assert parse(ChatCompletionRequest, {**CHAT, "max_tokens": 9}).requested_max_tokens() == 9


def test_empty_messages_are_refused_and_text_parts_are_joined():
    assert refused(ChatCompletionRequest, {**CHAT, "messages": []}).param == "messages"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = parse(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": parts}]})
    assert body.messages[0].as_template_input() == {"role": "user", "content": "ab"}
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    body = parse(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": image}]})
    with pytest.raises(ApiError):
        body.messages[0].as_template_input()


@pytest.mark.parametrize(
    "prompt, value",
    [("abc", "abc"), (["abc"], "abc"), ([5, 6, 7], [5, 6, 7]), ([[5, 6]], [5, 6])],
)
def test_a_prompt_is_a_text_or_token_ids(prompt, value):
    assert parse(CompletionRequest, {"prompt": prompt}).prompt_value() == value


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], ["a", "b"], [[1], [2]], [1, "a"], None])
def test_empty_several_or_mixed_prompts_are_refused(prompt):
    assert refused(CompletionRequest, {"prompt": prompt}).param == "prompt"


def test_a_completion_needs_a_prompt():
    assert refused(CompletionRequest, {"model": "m"}).param == "prompt"


def test_a_chat_response_has_openais_shape():
    reply = Reply("tiny", chat=True)
    out = reply.response("hello", "stop", prompt_tokens=7, completion_tokens=3)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "tiny" and isinstance(out["created"], int)
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_chat_chunks_name_the_role_first_and_end_with_an_empty_delta():
    reply = Reply("tiny", chat=True)
    first, middle = reply.chunk("", first=True), reply.chunk("lo", with_usage=True)
    last = reply.chunk("", finish="length")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert middle["choices"][0]["delta"] == {"content": "lo"} and middle["usage"] is None
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last
    assert {c["id"] for c in (first, middle, last)} == {reply.id}
    assert {c["object"] for c in (first, middle, last)} == {"chat.completion.chunk"}
    usage = reply.usage_chunk(2, 5)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7


def test_a_text_completion_and_its_chunks_have_openais_shape():
    reply = Reply("tiny", chat=False)
    out = reply.response("abc", "length", 1, 2)
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "abc" and out["choices"][0]["finish_reason"] == "length"
    chunk = reply.chunk("x")
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "x"
    assert chunk["choices"][0]["finish_reason"] is None
