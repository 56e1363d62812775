"""vLLM's /tokenize and /detokenize, so a client can count and trim a prompt before it sends it.

  POST /tokenize    {"prompt": text} or {"messages": [...]} (the chat template applied), optional
                    "add_special_tokens" -> {"tokens": [...], "count", "max_model_len", "token_strs": null}
  POST /detokenize  {"tokens": [...]} -> {"prompt": text}

The tokens are exactly the ones the server would prefill for the same prompt or messages: a prompt
gets BOS as the tokenizer's configuration says (`add_special_tokens` false: none), messages get
the chat template, which writes its own special tokens. `max_model_len` is the context: prompt plus
completion tokens.
"""

from __future__ import annotations

import fastapi

from serving.engine_api import ChatTemplateError
from serving.server.http_api import ChatMessage, _error, _OpenAIModel, _warn_ignored
from serving.server.openai_errors import INVALID_REQUEST
from serving.server.orchestrator import Orchestrator


class TokenizeBody(_OpenAIModel):
    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # the chat template here always ends with the assistant's turn


class DetokenizeBody(_OpenAIModel):
    model: str = ""
    tokens: list[int]


def add_routes(app: fastapi.FastAPI, orchestrator: Orchestrator) -> None:
    tokenizer = orchestrator.tokenizer

    @app.post("/tokenize")
    def tokenize(body: TokenizeBody):
        _warn_ignored(body, "/tokenize")
        if (body.prompt is None) == (body.messages is None):
            return _error(400, "give exactly one of prompt and messages", "prompt", INVALID_REQUEST, "invalid_value")
        if body.messages is None:
            tokens = tokenizer.encode_prompt(body.prompt) if body.add_special_tokens else tokenizer.encode(body.prompt)
        elif not body.add_generation_prompt:
            message = "add_generation_prompt: only true (the chat template ends with the assistant's turn)"
            return _error(400, message, "add_generation_prompt", INVALID_REQUEST, "invalid_value")
        else:
            try:
                tokens = tokenizer.encode_chat([m.for_template() for m in body.messages])
            except ChatTemplateError as exc:
                return _error(400, str(exc), "messages", INVALID_REQUEST, "invalid_value")
        tokens = list(tokens)
        count, context = len(tokens), orchestrator.context_length
        return {"tokens": tokens, "count": count, "max_model_len": context, "token_strs": None}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeBody):
        _warn_ignored(body, "/detokenize")
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            message = f"tokens: ids must be in [0, {vocab}); got {bad[:5]}"
            return _error(400, message, "tokens", INVALID_REQUEST, "invalid_value")
        return {"prompt": tokenizer.decode(body.tokens)}
