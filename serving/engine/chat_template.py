"""A model's own Jinja chat template, rendered the way Hugging Face transformers renders it.

transformers (`utils/chat_template_utils.py`) compiles the template in an `ImmutableSandboxedEnvironment`
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` block tag,
and gives it `raise_exception`, `strftime_now` and a `tojson` filter that does not escape HTML. It renders
with `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's named special
tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...), after dropping message keys whose value
is None. One renderer serves every template; nothing here knows a template by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from serving.engine_api import ChatTemplateError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENVIRONMENT = _environment()


class ChatTemplate:
    """One compiled template plus the special-token strings it may reference."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]):
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template does not compile: {exc.message} (line {exc.lineno})") from None
        self.source = source
        self._special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content", ...}]); raises ChatTemplateError."""
        plain = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:
            return self._template.render(
                messages=plain,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:  # raise_exception, undefined names, sandbox violations
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None
