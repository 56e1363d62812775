"""What the stack and the server agree on, in one home: ports, paths, names and the KV block.

Plain constants, no imports: `components/` (the Pulumi stack, which must not load JAX or the
server) and `serving/` both import them from here, so the two halves cannot drift apart.
"""

HTTP_PORT = 8000  # the server's HTTP API and /metrics; the Service's HTTP port in every runtime
GRPC_PORT = 9000  # JetStream's gRPC Orchestrator service (JetStream's server and the bundled one)
# Multi-controller JAX: the coordinator listens on the leader at COORDINATOR_PORT, the leader's
# control channel on the port after it.
COORDINATOR_PORT = 8476
CONTROL_PORT = COORDINATOR_PORT + 1
COORDINATOR_PORT_ENV = "JAX_COORDINATOR_PORT"  # how a pod tells the server another coordinator port
HEALTH_PATH = "/healthcheck"  # JetStream's readiness path, which the bundled server also serves
METRICS_PATH = "/metrics"  # the bundled server's Prometheus metrics, on HTTP_PORT
# The `inference_server` values of MaxText's recipes.
INTERLEAVED_SERVER = "MaxtextInterleavedServer"
DISAGGREGATED_SERVER = "ExperimentalMaxtextDisaggregatedServer_8"
KV_BLOCK = 128  # the bundled server's KV cache length is a multiple of this many positions
# The environment variable the server reads its API key from when --api-key is not given; the stack
# fills it from a Kubernetes Secret.
API_KEY_ENV = "API_KEY"
