"""The API key and CORS, the two things that decide who may call the server.

With a key (`--api-key KEY`, or `--api-key-env NAME`: the environment variable NAME holds it),
every HTTP route except the probes' (/healthcheck, /metrics) and every gRPC method except
HealthCheck needs `Authorization: Bearer <key>` (gRPC: the metadata `authorization`). A missing or
wrong key is HTTP 401 in OpenAI's error shape (code `invalid_api_key`), gRPC UNAUTHENTICATED.
The key is compared in constant time and never logged: `ApiKey`'s repr hides it, and error
messages never repeat what the client sent.

CORS (`--allowed-origins`, none by default) is Starlette's CORSMiddleware outside the key check,
so a browser's preflight (OPTIONS, which never carries the key) is answered, and the 401 of a
request without the key carries the CORS headers the browser needs to show it.
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Mapping, Sequence

import grpc
from starlette.middleware.cors import CORSMiddleware

from serving.server.openai_errors import INVALID_REQUEST, error_response

OPEN_HTTP_PATHS = frozenset({"/healthcheck", "/metrics"})  # probes and Prometheus scrape without a key
OPEN_GRPC_METHODS = frozenset({"HealthCheck"})
_MISSING = "missing API key: send the header Authorization: Bearer <key>"
_WRONG = "invalid API key"  # never says what was sent


class ApiKey:
    """The server's key; `accepts` compares a client's Authorization value in constant time."""

    def __init__(self, key: str):
        if not key.strip():
            raise ValueError("the API key must not be empty")
        self._key = key.strip().encode()

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"

    def refusal(self, authorization: str | None) -> str | None:
        """Why `authorization` (the header's value) is refused, or None when it carries the key."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _MISSING
        return None if hmac.compare_digest(token.strip().encode(), self._key) else _WRONG


def api_key_arg(value: str) -> ApiKey:
    """`--api-key KEY` (argparse type): the key is held at once, so the parsed flags never show it."""
    try:
        return ApiKey(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def api_key_from(key: ApiKey | None, env_name: str | None, environ: Mapping[str, str] = os.environ) -> ApiKey | None:
    """The key of `--api-key`, else of the variable `--api-key-env` names; None: no key."""
    if key is not None and env_name is not None:
        raise ValueError("--api-key and --api-key-env: give one of them")
    if env_name is None:
        return key
    if not environ.get(env_name, "").strip():
        raise ValueError(f"--api-key-env {env_name}: the environment variable is not set or empty")
    return ApiKey(environ[env_name])


def parse_origins(value: str) -> tuple[str, ...]:
    """`--allowed-origins`: a comma-separated list (`*` for any origin)."""
    return tuple(origin.strip() for origin in value.split(",") if origin.strip())


class RequireApiKey:
    """Pure ASGI (so streaming responses still see client disconnects): refuse before routing."""

    def __init__(self, app, key: ApiKey):
        self.app = app
        self._key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_HTTP_PATHS:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            refusal = self._key.refusal(authorization)
            if refusal:
                response = error_response(
                    401, refusal, None, INVALID_REQUEST, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def protect_app(app, key: ApiKey | None, allowed_origins: Sequence[str]) -> None:
    """The key check, then CORS around it (Starlette runs the middleware added last first)."""
    if key is not None:
        app.add_middleware(RequireApiKey, key=key)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],  # OpenAI's JavaScript client sends its own x-stainless-* headers
            expose_headers=["Retry-After"],
        )


class GrpcApiKey(grpc.ServerInterceptor):
    """The same check for gRPC: metadata `authorization: Bearer <key>` on every method but HealthCheck."""

    def __init__(self, key: ApiKey):
        self._key = key

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or method in OPEN_GRPC_METHODS:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        refusal = self._key.refusal(metadata.get("authorization"))
        return handler if refusal is None else _refused(handler, refusal)


def _refused(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    def abort(_request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
