"""gRPC front end: JetStream's `Orchestrator` service (proto/jetstream.proto), port 9000 by default.

  Decode(DecodeRequest) -> stream DecodeResponse
      text_content.text (tokenized as given, no chat template) or token_content.token_ids;
      one StreamContent per generated token: samples[0] = {text: whole UTF-8 text so far
      unsent (may be empty while a character is incomplete), token_ids: [the token]}.
      The legacy fields session_cache and priority are accepted and ignored; metadata too.
  HealthCheck() -> {is_live}

Errors: INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED when the queue is full,
UNAVAILABLE before warm-up, INTERNAL if the engine fails mid-request. A client that cancels
(or disconnects) cancels the request, which frees its decode slot. With an API key, every method
but HealthCheck needs the metadata `authorization: Bearer <key>`, else UNAUTHENTICATED (auth.py).
"""

from __future__ import annotations

from concurrent import futures

import grpc

from serving.server import proto
from serving.server.auth import ApiKey, GrpcApiKey
from serving.server.orchestrator import Orchestrator
from serving.server.requests import GenerateRequest, NotReady, Overloaded, RequestError

pb2, pb2_grpc = proto.load()

# Every Decode RPC holds a worker thread for its whole stream, so the pool has one per running
# (slots) and waiting (queue) request, and a request beyond those reaches the orchestrator's
# admission and gets RESOURCE_EXHAUSTED instead of waiting unseen for a thread; the spare workers
# answer HealthCheck and those refusals while every other worker streams.
SPARE_WORKERS = 4

_FIELD_NAMES = {
    "text_content": {"prompt": "text_content.text"},
    "token_content": {"prompt": "token_content.token_ids"},
}


class OrchestratorServicer(pb2_grpc.OrchestratorServicer):
    def __init__(self, orchestrator: Orchestrator):
        self._orchestrator = orchestrator

    def Decode(self, request, context: grpc.ServicerContext):
        content = request.WhichOneof("content")
        if content is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text_content or token_content is required")
        if request.num_samples > 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_samples: only 1 sample is supported")
        if content == "text_content":
            prompt: str | tuple[int, ...] = request.text_content.text
        else:
            prompt = tuple(request.token_content.token_ids)
        try:
            stream = self._orchestrator.submit(GenerateRequest(prompt, request.max_tokens))
        except RequestError as exc:
            field = _FIELD_NAMES[content].get(exc.field, exc.field)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {exc.message}")
        except Overloaded as exc:
            context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except NotReady as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        context.add_callback(stream.cancel)  # runs when the RPC ends, including client cancel
        for delta in stream:
            sample = pb2.DecodeResponse.StreamContent.Sample(text=delta.text, token_ids=delta.token_ids)
            yield pb2.DecodeResponse(stream_content=pb2.DecodeResponse.StreamContent(samples=[sample]))
        if stream.finish.reason == "error":
            context.abort(grpc.StatusCode.INTERNAL, stream.finish.error or "generation failed")

    def HealthCheck(self, request, context):
        return pb2.HealthCheckResponse(is_live=self._orchestrator.is_live)


def start_grpc_server(
    orchestrator: Orchestrator, host: str, port: int, max_workers: int | None = None, api_key: ApiKey | None = None
) -> tuple[grpc.Server, int]:
    """Start serving in background threads; returns the grpc.Server (call .stop(grace)) and the
    port it bound, which is a free one when `port` is 0."""
    workers = max_workers or orchestrator.slots + orchestrator.max_queued_requests + SPARE_WORKERS
    interceptors = [GrpcApiKey(api_key)] if api_key is not None else []
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
    server = grpc.server(executor, interceptors=interceptors)
    pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(orchestrator), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:  # the pinned grpcio raises when the port is taken
        raise OSError(f"gRPC: cannot bind {address}: {error}") from None
    server.start()
    return server, bound
