"""`kubectl apply --dry-run=client` accepts what the offline render prints, for every example stack.

kubectl maps each document's apiVersion and kind to a REST resource through the API server's
discovery, even on a client dry run, so a small in-process server answers discovery for the kinds
a cluster with the LWS controller and Managed Prometheus serves (and 404 for every object: each
one is created). Field schemas are checked elsewhere: kubernetes-validate for core objects, the
CRDs' own schemas for the LeaderWorkerSet and the PodMonitoring (test_stack_render.py), so kubectl's
own OpenAPI validation is off here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components import render
from tests.stack.pulumi_harness import WORKLOAD_STACKS

KUBECTL = shutil.which("kubectl")
# groupVersion -> (kind, plural, namespaced) of what the stack applies.
SERVED = {
    "v1": (
        ("Namespace", "namespaces", False),
        ("ServiceAccount", "serviceaccounts", True),
        ("Service", "services", True),
        ("Secret", "secrets", True),
    ),
    "autoscaling/v2": (("HorizontalPodAutoscaler", "horizontalpodautoscalers", True),),
    "leaderworkerset.x-k8s.io/v1": (("LeaderWorkerSet", "leaderworkersets", True),),
    "monitoring.googleapis.com/v1": (("PodMonitoring", "podmonitorings", True),),
}


def version(group_version: str) -> dict:
    return {"groupVersion": group_version, "version": group_version.split("/")[1]}


def discovery(path: str) -> dict | None:
    """The API server's discovery answer for `path`, or None (404)."""
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = [
            {"name": gv.split("/")[0], "versions": [version(gv)], "preferredVersion": version(gv)}
            for gv in SERVED
            if "/" in gv
        ]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    for gv, kinds in SERVED.items():
        if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
            return {
                "kind": "APIResourceList",
                "groupVersion": gv,
                "resources": [
                    {
                        "name": plural,
                        "singularName": kind.lower(),
                        "namespaced": namespaced,
                        "kind": kind,
                        "verbs": ["create", "get", "patch"],
                    }
                    for kind, plural, namespaced in kinds
                ],
            }
    return None


class Discovery(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = discovery(self.path.split("?")[0])
        data = json.dumps(
            body or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        ).encode()
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def api_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def dry_run(server: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KUBECTL, f"--server={server}", "apply", "--dry-run=client", "--validate=false", "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_kubectl_accepts_the_rendered_stack(api_server, stack):
    text = render.render(stack)
    result = dry_run(api_server, text)
    assert result.returncode == 0, result.stderr
    documents = [line for line in text.splitlines() if line == "---"]
    assert result.stdout.count("created (dry run)") == len(documents)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_refuses_a_kind_the_cluster_does_not_serve(api_server):
    result = dry_run(
        api_server, "apiVersion: leaderworkerset.x-k8s.io/v2\nkind: LeaderWorkerSet\nmetadata:\n  name: x\n"
    )
    assert result.returncode != 0 and "LeaderWorkerSet" in result.stderr
