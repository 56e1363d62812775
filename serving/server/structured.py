"""Structured outputs: OpenAI's `response_format` (json_object, json_schema) as a token grammar.

The grammar engine is llguidance (docs/server/structured-outputs.md has the measurements behind the
choice). Host side only, no JAX: the orchestrator owns each request's matcher and, between decode
steps, fills one packed bitmask row per constrained slot; the engine applies the rows to the logits
on the device (serving/engine/constraints.py).

  parse_response_format(obj)   the validated format (None for plain text), or RequestError naming
                               the unsupported schema feature; shared by chat, completions and the
                               Responses API's text.format (flattened shape)
  GrammarCompiler(tokenizer)   the tokenizer's grammar vocabulary (built once), compiled grammars
                               cached by their text; `.matcher(fmt)` -> a fresh TokenMatcher
  TokenMatcher                 one request's position in its grammar: `.fill(row)`, `.advance(token)`

Bitmask layout (llguidance's and xgrammar's): int32 words [rows, ceil(vocab / 32)], bit j of word w
allows token 32 * w + j. A row of all ones (-1) allows every token: an unconstrained slot.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any, Literal

import llguidance
import numpy as np

from serving.engine_api import Tokenizer
from serving.server.requests import RequestError

FIELD = "response_format"
# JSON as OpenAI's models write it: no free whitespace (a small model can otherwise fill its token
# budget with newlines), ", " and ": " between items.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept for reuse: clients send the same few schemas again and again.
GRAMMAR_CACHE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class ResponseFormat:
    """A constrained output: any JSON object (json_object) or JSON matching `schema` (json_schema)."""

    type: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any]
    grammar: str  # llguidance's grammar text for `schema`, validated
    name: str = ""
    strict: bool = False


def parse_response_format(obj: Mapping[str, Any] | None) -> ResponseFormat | None:
    """The format OpenAI's `response_format` (chat and completions) or the Responses API's
    `text.format` asks for; None for plain text. Accepts both shapes of json_schema:
      {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}   chat completions
      {"type": "json_schema", "name", "schema", "strict"}                    Responses API
    Raises RequestError("response_format", ...) naming what is wrong, an unsupported schema
    keyword included."""
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise RequestError(FIELD, "must be an object with a 'type'")
    kind = obj.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiled("json_object", {"type": "object"})
    if kind != "json_schema":
        raise RequestError(FIELD, f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = obj.get("json_schema", obj)
    if not isinstance(spec, Mapping):
        raise RequestError(FIELD, "json_schema must be an object with 'name' and 'schema'")
    name, schema, strict = spec.get("name", ""), spec.get("schema"), spec.get("strict", False)
    where = "json_schema." if "json_schema" in obj else ""
    if not isinstance(name, str):
        raise RequestError(FIELD, f"{where}name must be a string")
    if not isinstance(strict, bool) and strict is not None:
        raise RequestError(FIELD, f"{where}strict must be a boolean")
    if not isinstance(schema, Mapping):
        raise RequestError(FIELD, f"{where}schema must be a JSON Schema object")
    return _compiled("json_schema", schema, name=name, strict=bool(strict), where=where)


def _compiled(
    kind: Literal["json_object", "json_schema"],
    schema: Mapping[str, Any],
    *,
    name: str = "",
    strict: bool = False,
    where: str = "",
) -> ResponseFormat:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=_JSON_STYLE)
    except ValueError as exc:
        raise RequestError(FIELD, f"{where}schema is not valid JSON: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, None)
    if error:  # e.g. 'Unimplemented keys: ["not"]'
        raise RequestError(FIELD, f"{where}schema is not supported: {error}")
    return ResponseFormat(kind, schema, grammar, name, strict)


class _Vocabulary:
    """What llguidance reads of a tokenizer (llguidance.TokenizerWrapper's duck type)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokens = tokenizer.token_bytes()
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.eos_token_id = min(tokenizer.eos_ids)
        self.bos_token_id = None
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class TokenMatcher:
    """One request's matcher: which tokens may come next, advanced with each generated token.
    The end-of-sequence tokens are allowed only where the grammar may end; once it has ended,
    only they are."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: frozenset[int]):
        self._matcher = matcher
        self._eos_ids = sorted(eos_ids)

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed tokens into `row` (int32 [words], C-contiguous)."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if self._matcher.is_error():  # end the text rather than sample from nothing
            row[:] = 0
            bits = row.view(np.uint32)
            for eos in self._eos_ids:
                bits[eos // 32] |= np.uint32(1 << (eos % 32))

    def advance(self, token: int) -> None:
        """Take a generated token; one outside the grammar (never sampled under the mask) leaves
        the matcher in error, which then allows only end-of-sequence."""
        self._matcher.consume_token(token)

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """A tokenizer's grammar vocabulary and a cache of compiled grammars. Safe to call from any
    thread. `prepare()` builds the vocabulary (about a second for 128k tokens) so that the first
    structured request does not wait for it; otherwise that request builds it."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = GRAMMAR_CACHE_SIZE):
        self._source = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def prepare(self) -> None:
        with self._lock:
            self._vocabulary()

    def matcher(self, fmt: ResponseFormat) -> TokenMatcher:
        with self._lock:
            prototype = self._compiled.pop(fmt.grammar, None) or self._compile(fmt)
            self._compiled[fmt.grammar] = prototype
            if len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return TokenMatcher(prototype.deep_copy(), self._source.eos_ids)

    def _vocabulary(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            vocab = _Vocabulary(self._source)
            self._tokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocab), n_vocab=len(vocab.tokens), eos_token=sorted(self._source.eos_ids)
            )
        return self._tokenizer

    def _compile(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._vocabulary(), fmt.grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(FIELD, f"schema is not supported: {matcher.get_error()}")
        return matcher
