"""The ports the serving containers listen on, in one home.

The Service's two ports, the probes, the bundled server's command line and the PodMonitoring that
scrapes the bundled server's /metrics all read them here: `manifests.py` and `autoscaling.py`
both import this module, and `manifests.py` imports `autoscaling.py`, so neither of those two can
hold them without an import cycle.
"""

HTTP_PORT = 8000  # the seed's jetstream-http front end; the bundled server's HTTP API and its /metrics
GRPC_PORT = 9000  # JetStream's gRPC Orchestrator service (both runtimes)
