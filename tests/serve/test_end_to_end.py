"""The server with the real engine on a tiny checkpoint, through the official ``openai`` client:
a greedy request's text is ``MTPModel.generate``'s for the same prompt, streamed or not, chat or
completion, alone or among concurrent requests with other settings; a client that leaves
mid-stream frees its row and the server goes on."""

from __future__ import annotations

import threading

import httpx

from .conftest import MODEL

LONG = 240  # new tokens: most of the context
PROMPTS = ["def area(width, height):", "the quick brown", "return width"]


def expected(model, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """``generate``'s greedy text for ``prompt`` (a user message, rendered, for ``chat``)."""
    if chat:
        rendered = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        (text,), _ = model.generate(
            rendered, add_special_tokens=False, max_new_tokens=max_tokens, temperature=0
        )
        return text
    (text,), _ = model.generate(prompt, max_new_tokens=max_tokens, temperature=0)
    return text


def test_greedy_completions_are_generates_text(real_server, reference_model):
    client = real_server.client()
    for prompt, max_tokens in zip(PROMPTS, (24, 9, 16)):
        reply = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        choice = reply.choices[0]
        assert choice.text == expected(reference_model, prompt, max_tokens), prompt
        ids = reference_model.tokenizer.encode(prompt, add_special_tokens=True)
        assert reply.usage.prompt_tokens == len(ids)
        assert 1 <= reply.usage.completion_tokens <= max_tokens
        assert choice.finish_reason == (
            "length" if reply.usage.completion_tokens == max_tokens else "stop"
        )


def test_greedy_chat_streamed_is_the_same_text_with_usage(real_server, reference_model):
    client = real_server.client()
    question = "what is the area"
    want = expected(reference_model, question, 20, chat=True)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=20, temperature=0
    )
    assert whole.choices[0].message.content == want
    assert whole.usage.completion_tokens == usage.completion_tokens


def test_concurrent_requests_keep_each_greedy_answer_exact(real_server, reference_model):
    client = real_server.client(timeout=120)
    jobs = [
        dict(prompt=PROMPTS[0], max_tokens=30, temperature=0),
        dict(prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=3),
        dict(prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True),
        dict(prompt=PROMPTS[1], max_tokens=25, temperature=0.7, top_k=20, top_p=0.9),
        dict(prompt=PROMPTS[1], max_tokens=7, temperature=0),
        dict(prompt=PROMPTS[0], max_tokens=18, temperature=0, stream=True),
    ]
    texts: dict[int, str] = {}

    def run(i: int, job: dict) -> None:
        job = dict(job)
        extra = {"top_k": job.pop("top_k")} if "top_k" in job else None
        reply = client.completions.create(model=MODEL, extra_body=extra, **job)
        if job.get("stream"):
            texts[i] = "".join(c.choices[0].text for c in reply)
        else:
            texts[i] = reply.choices[0].text

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(texts) == list(range(len(jobs)))  # every request answered
    for i, job in enumerate(jobs):
        if job["temperature"] == 0:
            assert texts[i] == expected(reference_model, job["prompt"], job["max_tokens"]), job
    stats = real_server.wait_idle()
    assert stats.finished >= len(jobs)


def test_a_client_leaving_mid_stream_frees_its_row_in_the_real_engine(real_server):
    """Greedy, "the quick" runs past 240 tokens without an end of text: a request that ends
    sooner was cancelled."""
    before = real_server.engine.stats()
    with httpx.Client(base_url=real_server.url, timeout=30) as http:
        body = {"prompt": "the quick", "stream": True, "max_tokens": LONG, "temperature": 0}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data: {"))
        # closed after one chunk: the client has gone
    stats = real_server.wait_idle()
    assert stats.finished == before.finished + 1
    assert stats.tokens_out - before.tokens_out < LONG
    reply = real_server.client().completions.create(model=MODEL, prompt="def", max_tokens=3)
    assert reply.usage.completion_tokens >= 1
