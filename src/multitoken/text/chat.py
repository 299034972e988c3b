"""Chat templates: Jinja programs shipped with a model's tokenizer, rendered as transformers does.

A model folder keeps its template as ``chat_template`` in ``tokenizer_config.json`` or in a
``chat_template.jinja`` file (:mod:`multitoken.text.tokenizer` reads both). Rendering here follows
``transformers`` (a sandboxed environment with ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``tojson`` without HTML escaping, ``strftime_now``, the special tokens as
variables), so text rendered for training and for prompting is what the model sees elsewhere.
Rendered text spells its special tokens (a ``{{ bos_token }}``) itself, so it is encoded with
none added (``Tokenizer.encode(text)``), as ``apply_chat_template(tokenize=True)`` encodes it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from multitoken.errors import MultitokenError


class ChatTemplateError(MultitokenError):
    """A chat template is missing or failed to render. Callers that know more (a file and
    line) restate its ``message`` with their own flag."""

    def __init__(self, message: str, flag: str = "--tokenizer") -> None:
        super().__init__(message, flag)


def chat_messages(value: object) -> list[dict]:
    """``value`` checked to be a chat: a non-empty list of objects with a string ``role``.

    Contents are left to the template (a string, or a list of parts for some models)."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)
    ):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    return value


# ShareGPT speakers (``"from"``) as chat roles. Assistant names vary with where the chat was
# shared from; anything else (a tool, an unnamed speaker) has no safe mapping.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}
_SHAREGPT_SHAPE = '"conversations" must be a non-empty list of {"from", "value"} objects'


def sharegpt_messages(turns: object) -> list[dict]:
    """ShareGPT ``conversations`` turns as chat messages a template accepts.

    Speakers map by :data:`SHAREGPT_ROLES`. Consecutive turns of one role are merged (joined by a
    blank line): shared chats hold such runs where a reply was continued or regenerated, and
    many templates refuse roles that do not alternate. Assistant turns before the first user
    turn are dropped: the split dataset cuts long chats into parts that start mid-reply, and a
    reply to nothing teaches nothing. Raises ``ValueError`` (a short, fixed reason) for an unknown
    speaker, an empty turn, or no assistant turn left: such a record is not a usable chat.
    """
    if not isinstance(turns, list):
        raise ValueError(_SHAREGPT_SHAPE)
    if not turns:
        raise ValueError("an empty conversation")
    messages: list[dict] = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise ValueError(_SHAREGPT_SHAPE)
        role = SHAREGPT_ROLES.get(turn["from"].strip().lower())
        if role is None:
            raise ValueError(f"unknown ShareGPT speaker {turn['from']!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise ValueError("a turn has an empty value")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + value
        elif role != "assistant" or any(m["role"] == "user" for m in messages):
            messages.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    return messages


def content_text(content: object) -> str:
    """Text of a message's content: a string, or the ``text`` of each part of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, str] | None = None,
    source: str = "tokenizer",
) -> str:
    """Render a Jinja chat ``template`` over ``messages`` as transformers does.

    The template sees ``messages``, ``add_generation_prompt``, ``tools`` and ``documents``
    (None, as when transformers is given none) and the special-token spellings (``bos_token``
    etc.). Keys whose value is None are dropped from messages, as transformers does, because
    templates test for a key's presence. Any failure is a one-line :class:`ChatTemplateError`.
    """
    try:
        import jinja2
    except ImportError:  # a dependency of torch and transformers' chat support, but say so
        raise ChatTemplateError(
            "rendering a chat template needs jinja2: pip install jinja2"
        ) from None

    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("chat messages must be a list of objects")
    chat = [{key: value for key, value in m.items() if value is not None} for m in messages]
    try:
        compiled = _compile_chat_template(template)
        return compiled.render(
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **(special_tokens or {}),
        )
    except jinja2.TemplateSyntaxError as exc:
        reason = f"the chat template of {source} does not parse (line {exc.lineno}: {exc.message})"
    # A template is an arbitrary program: whatever it raises (its raise_exception, a sandbox
    # refusal, a TypeError on odd content) means these messages do not fit it.
    except Exception as exc:
        reason = (
            f"the chat template of {source} failed: {_one_line(str(exc)) or type(exc).__name__}"
        )
    raise ChatTemplateError(reason)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):  # -> jinja2.Template; jinja2 is imported lazily
    """Compile once per template: data loading renders thousands of records with the same one."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change what the model sees.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class GuardedNamespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore names: storing dunders is a sandbox escape."""

        def __setitem__(self, name, value) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r} is not allowed"
                )
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, namespace=GuardedNamespace
    )
    return env.from_string(template)


def record_messages(record: object) -> list[dict] | None:
    """The chat of a record as ``{"role", "content"}`` messages, or None if it holds no chat.

    ``messages`` are taken as written (the template judges them); ShareGPT ``conversations`` are
    mapped by :func:`sharegpt_messages`. Raises ``ValueError`` for a malformed
    or unusable chat. :mod:`multitoken.training.conversations` maps records with this too, so a chat
    reads the same from a prepared file and from a JSONL line."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return chat_messages(record["messages"])
    if "conversations" in record:
        return sharegpt_messages(record["conversations"])
    return None
