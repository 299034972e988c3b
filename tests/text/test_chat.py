"""Chat templates (multitoken.text.chat) rendered directly: what a template sees (messages without
None keys, the special tokens, tools/documents as None), transformers' helpers (tojson without
HTML escaping, raise_exception, loop controls, trimmed blocks), the sandbox, and every failure
as a one-line ChatTemplateError naming the tokenizer flag."""

from __future__ import annotations

import pytest

from multitoken.errors import MultitokenError
from multitoken.text.chat import (
    ChatTemplateError,
    chat_messages,
    content_text,
    render_chat_template,
)

USER = [{"role": "user", "content": "hi"}]


def render(template: str, messages: list[dict] = USER, **options) -> str:
    return render_chat_template(
        template, messages, add_generation_prompt=options.pop("generation", False), **options
    )


def fails(template: str, messages: list[dict] = USER, **options) -> ChatTemplateError:
    with pytest.raises(ChatTemplateError) as err:
        render(template, messages, **options)
    assert err.value.flag == "--tokenizer" and "\n" not in err.value.message
    return err.value


# --- messages ---------------------------------------------------------------------------------


def test_a_chat_is_a_non_empty_list_of_objects_with_a_string_role():
    chat = [{"role": "system"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert chat_messages(chat) is chat  # contents are left to the template


@pytest.mark.parametrize(
    "value",
    [[], None, "hi", {"role": "user"}, [{"content": "x"}], [{"role": 1}], [USER[0], "x"]],
)
def test_anything_else_is_not_a_chat(value):
    with pytest.raises(ValueError, match='"messages" must be a non-empty list'):
        chat_messages(value)


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("plain", "plain"),
        ([{"type": "text", "text": "a"}, {"type": "image"}, {"text": "b"}, "c"], "ab"),
        (None, ""),
        (42, ""),
    ],
)
def test_content_text_is_the_string_or_the_text_of_each_part(content, text: str):
    assert content_text(content) == text


# --- what a template sees ---------------------------------------------------------------------


def test_the_generation_prompt_flag_and_special_tokens_reach_the_template():
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    template += "{% if add_generation_prompt %}[assistant]{% endif %}"
    specials = {"bos_token": "<s>"}
    assert render(template, special_tokens=specials) == "<s>[user]hi"
    assert render(template, special_tokens=specials, generation=True) == "<s>[user]hi[assistant]"


def test_keys_whose_value_is_none_are_absent_as_in_transformers():
    template = "{% for m in messages %}{{ 'name' in m }},{{ m | length }};{% endfor %}"
    messages = [{"role": "user", "content": "x", "name": None}, {"role": "user", "name": "bob"}]
    assert render(template, messages) == "False,2;True,2;"
    assert messages[0]["name"] is None  # the caller's messages are not modified


def test_tools_and_documents_are_none_and_undefined_names_render_empty():
    assert render("{{ tools is none }} {{ documents is none }}|{{ nothing }}|") == "True True||"


def test_tojson_does_not_escape_html():
    messages = [{"role": "user", "content": "<b>&'é"}]
    assert render("{{ messages[0].content | tojson }}", messages) == '"<b>&\'é"'
    assert render("{{ messages[0] | tojson(indent=1, sort_keys=True) }}", messages).startswith(
        '{\n "content": "<b>&'
    )


def test_blocks_are_trimmed_and_loops_can_break():
    template = "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.role }}\n{% endfor %}"
    two = [*USER, {"role": "assistant", "content": "yo"}]
    assert render(template, two) == "user\n"


def test_strftime_now_is_todays_date():
    from datetime import datetime

    year = render("{{ strftime_now('%Y') }}")
    assert year in {str(datetime.now().year), str(datetime.now().year + 1)}  # around midnight


# --- failures ---------------------------------------------------------------------------------


def test_raise_exception_is_a_chat_template_error_with_its_message():
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('need a\n system turn') }}{% endif %}"
    error = fails(template, source="model/tokenizer_config.json")
    assert error.message == (
        "the chat template of model/tokenizer_config.json failed: need a system turn"
    )
    assert isinstance(error, MultitokenError) and isinstance(error, ValueError)


def test_a_template_that_does_not_parse_names_its_line():
    error = fails("line one\n{% for m in messages %}{{ m.role }", source="T")
    assert error.message.startswith("the chat template of T does not parse (line 2:")


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.__class__.__mro__ }}",  # attribute access to dunders
        "{% set ns = namespace() %}{% set ns._x = 1 %}",  # storing underscore names
        "{{ messages.append(1) }}",  # the environment is immutable
    ],
)
def test_the_sandbox_refuses_escapes_and_mutation(template: str):
    assert fails(template).message.startswith("the chat template of tokenizer failed:")


def test_a_namespace_with_plain_names_still_works():
    template = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    assert render(template + "{% endfor %}{{ ns.n }}", [*USER, *USER]) == "2"


@pytest.mark.parametrize("messages", [[{"role": "user"}, "text"], "hi", None])
def test_messages_must_be_a_list_of_objects(messages):
    assert fails("{{ messages }}", messages).message == "chat messages must be a list of objects"


def test_content_the_template_cannot_handle_is_a_one_line_error():
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    error = fails("{{ messages[0].content + '!' }}", messages)
    assert "failed:" in error.message
