"""Pulumi unit-test harness for the stack: recording mocks, set before any component import.

`run_stack(config, stack)` runs the real `__main__.py` under `pulumi.runtime.set_mocks` with the
given stack config and returns a `Recording`: every registered resource with its type, name,
parent URN, dependencies, provider reference, inputs and resource options that change how the
engine updates it (replace_on_changes, delete_before_replace, custom timeouts, ignore_changes,
aliases, retain_on_delete, how many transforms it passes to its children),
plus the exported stack outputs and the invokes.

The mocks fill in what the cloud would compute: a cluster's endpoint, a service account's email,
a built image's digest, derived from the image's inputs (an unchanged build gives the same
digest, as with a real build of an unchanged context), a project's number, an internal load
balancer's IP, the outputs of a referenced platform stack (`platform_outputs`, or what the
test passes in `stack_outputs`), and an existing cluster as `gcp.container.getCluster` reads it
(at the location asked for, in the release channel the test passes, by default none).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import pathlib
import runpy
from typing import Any

import pulumi
import pulumi.runtime.settings
import yaml
from pulumi.runtime.mocks import MockMonitor

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAIN = ROOT / "__main__.py"
PROJECT = "jetstream-tpu"  # must equal components.core.config_table.PROJECT (checked in test_stack_config.py)
GCP_PROJECT = "test-project"
# Every example stack file: the two reference deployments', the small and the autoscaled one (role=all),
# vLLM's, and the environments: the platform stack and the dev and prod serving stacks on its cluster.
EXAMPLE_STACKS = (
    "llama3-405b-v6e16",
    "llama2-70b-disagg",
    "llama3-8b-v6e8",
    "llama3-8b-autoscale",
    "llama3-8b-vllm",
    "platform",
    "dev",
    "prod",
)
PROJECT_NUMBER = "123456789012"  # what gcp.organizations.get_project answers for GCP projects
LOAD_BALANCER_IP = "10.128.0.42"  # what GKE assigns an internal load balancer (a VPC address)
STACK_REFERENCE = "pulumi:pulumi:StackReference"
PLATFORM_KUBECONFIG = "apiVersion: v1\nkind: Config\n# the platform stack's kubeconfig\n"


@dataclasses.dataclass
class Registered:
    type: str
    name: str
    urn: str
    parent: str
    dependencies: list[str]
    provider: str
    custom: bool
    inputs: dict[str, Any]
    replace_on_changes: list[str] = dataclasses.field(default_factory=list)
    delete_before_replace: bool = False
    custom_timeouts: dict[str, str] = dataclasses.field(default_factory=dict)
    ignore_changes: list[str] = dataclasses.field(default_factory=list)
    aliases: list[str] = dataclasses.field(default_factory=list)  # the names of name-only aliases
    retain_on_delete: bool = False
    transforms: int = 0  # how many resource transforms apply to its children

    @property
    def parent_type(self) -> str:
        """Type token of the parent resource ("pulumi:pulumi:Stack" for top-level ones)."""
        qualified = self.parent.split("::")[2]
        return qualified.split("$")[-1]


def platform_outputs(cluster_stack: str, project: str = GCP_PROJECT) -> dict[str, str]:
    """What a platform stack named by `cluster_stack` (<organization>/<project>/<stack>) exports."""
    return {
        "clusterName": f"jetstream-{cluster_stack.rsplit('/', 1)[-1]}",
        "clusterLocation": "us-east5",
        "project": project,
        "kubeconfig": PLATFORM_KUBECONFIG,
    }


class RecordingMocks(pulumi.runtime.Mocks):
    """Echoes inputs and fills in the few outputs GCP, GKE and the Pulumi service would compute."""

    def __init__(
        self,
        project: str = GCP_PROJECT,
        stack_outputs: dict[str, dict] | None = None,
        release_channel: str = "UNSPECIFIED",
    ):
        self.inputs: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.stack_references: list[str] = []
        self.project = project
        self.stack_outputs = stack_outputs or {}
        self.release_channel = release_channel  # of every cluster getCluster reads

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.inputs[(args.typ, args.name)] = dict(args.inputs)
        outputs = dict(args.inputs)
        if args.typ == STACK_REFERENCE:  # read, not registered: recorded here
            name = args.inputs["name"]
            self.stack_references.append(name)
            referenced = self.stack_outputs.get(name, platform_outputs(name, self.project))
            return [name, {"name": name, "outputs": referenced, "secretOutputNames": ["kubeconfig"]}]
        if args.typ == "kubernetes:core/v1:Service" and args.inputs.get("spec", {}).get("type") == "LoadBalancer":
            outputs["status"] = {"loadBalancer": {"ingress": [{"ip": LOAD_BALANCER_IP, "ipMode": "VIP"}]}}
        if args.typ == "gcp:container/cluster:Cluster":
            outputs |= {
                "endpoint": "203.0.113.10",
                "masterAuth": {"clusterCaCertificate": "Q0EtREFUQQ=="},
                "network": f"projects/{GCP_PROJECT}/global/networks/default",
            }
        if args.typ == GATEWAY:  # GKE gives the Gateway the address of its load balancer's forwarding rule
            outputs["status"] = {"addresses": [{"type": "IPAddress", "value": GATEWAY_IP}]}
        if args.typ == "gcp:serviceaccount/account:Account":
            email = f"{args.inputs['accountId']}@{GCP_PROJECT}.iam.gserviceaccount.com"
            outputs |= {"email": email, "name": f"projects/{GCP_PROJECT}/serviceAccounts/{email}"}
        if args.typ == IMAGE:
            outputs["digest"] = image_digest(args.inputs)
        return [f"{args.name}-id", outputs]

    def call(self, args: pulumi.runtime.MockCallArgs):
        self.calls.append((args.token, dict(args.args)))
        if args.token == "gcp:container/getCluster:getCluster":
            return {
                "name": args.args["name"],
                "location": args.args["location"],
                "endpoint": "198.51.100.7",
                "masterAuths": [{"clusterCaCertificate": "RVhJU1RJTkc="}],
                "releaseChannels": [{"channel": self.release_channel}],
            }
        if args.token == "gcp:organizations/getClientConfig:getClientConfig":
            return {"accessToken": ACCESS_TOKEN, "project": GCP_PROJECT}
        if args.token == "gcp:secretmanager/getSecretVersion:getSecretVersion":
            return {"secret": args.args["secret"], "project": args.args["project"], "secretData": HF_TOKEN}
        if args.token == "gcp:organizations/getProject:getProject":
            return {"projectId": args.args["projectId"], "number": PROJECT_NUMBER}
        return {}


IMAGE = "docker-build:index:Image"
GATEWAY = "kubernetes:gateway.networking.k8s.io/v1:Gateway"
GATEWAY_IP = "10.0.8.9"
ACCESS_TOKEN = "ya29.test-access-token"
HF_TOKEN = "hf_test-token"  # the value of every Secret Manager secret under the mocks


def image_digest(inputs: dict) -> str:
    """What the mocked build of an image with these inputs pushes (a function of the inputs)."""
    return "sha256:" + hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class RecordingMonitor(MockMonitor):
    """Also records what the mocks' new_resource does not see: parent, dependencies, provider."""

    def __init__(self, mocks: RecordingMocks):
        super().__init__(mocks)
        self.registered: list[Registered] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            timeouts = request.customTimeouts
            self.registered.append(
                Registered(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent,
                    dependencies=list(request.dependencies),
                    provider=request.provider,
                    custom=request.custom,
                    inputs=self.mocks.inputs[(request.type, request.name)],
                    replace_on_changes=list(request.replaceOnChanges),
                    delete_before_replace=request.deleteBeforeReplace,
                    custom_timeouts={
                        kind: getattr(timeouts, kind)
                        for kind in ("create", "update", "delete")
                        if getattr(timeouts, kind)
                    },
                    ignore_changes=list(request.ignoreChanges),
                    aliases=[alias.spec.name for alias in request.aliases if alias.HasField("spec")],
                    retain_on_delete=request.retainOnDelete,
                    transforms=len(request.transforms),
                )
            )
        return response


@dataclasses.dataclass
class Recording:
    resources: list[Registered]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    calls: list[tuple[str, dict]]
    error: Exception | None = None
    stack_references: list[str] = dataclasses.field(default_factory=list)  # the stacks read through StackReference

    def of_type(self, type_: str) -> list[Registered]:
        return [resource for resource in self.resources if resource.type == type_]

    def one(self, type_: str) -> Registered:
        found = self.of_type(type_)
        assert len(found) == 1, f"expected one {type_}, got {[r.name for r in found]}"
        return found[0]

    def by_urn(self, urn: str) -> Registered:
        return next(resource for resource in self.resources if resource.urn == urn)


def stack_file_config(stack: str) -> dict[str, str]:
    """The raw config of an example stack file, as Pulumi passes it (all strings)."""
    values = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in values.items()}


def stack_role(stack: str) -> str:
    """The example stack's role (all, platform or serving)."""
    return stack_file_config(stack).get(f"{PROJECT}:role", "all")


PLATFORM_STACKS = tuple(stack for stack in EXAMPLE_STACKS if stack_role(stack) == "platform")
WORKLOAD_STACKS = tuple(
    stack for stack in EXAMPLE_STACKS if stack not in PLATFORM_STACKS
)  # the ones that serve a model


def schema_defaults() -> dict[str, str]:
    """Pulumi.yaml's declared defaults, fully qualified and as strings: the CLI hands the program
    every declared key, with its default where the stack sets none."""
    declared = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]
    return {
        f"{PROJECT}:{key}": str(entry["default"]).lower()
        if isinstance(entry["default"], bool)
        else str(entry["default"])
        for key, entry in declared.items()
        if "default" in entry
    }


def run_stack(
    config: dict[str, str],
    stack: str = "test",
    expect_error: bool = False,
    stack_outputs: dict[str, dict] | None = None,
    release_channel: str = "UNSPECIFIED",
) -> Recording:
    """Run __main__.py under recording mocks; config keys are fully qualified (`ns:key`), and
    declared keys the config leaves out get Pulumi.yaml's defaults, as under the CLI.

    A StackReference reads `stack_outputs[<fully qualified name>]`, by default `platform_outputs`
    in the config's gcp:project; an existing or platform cluster is in `release_channel`. With
    expect_error, a failing program returns its Recording with `error` set instead of raising.
    """
    mocks = RecordingMocks(
        project=config.get("gcp:project", GCP_PROJECT), stack_outputs=stack_outputs, release_channel=release_channel
    )
    monitor = RecordingMonitor(mocks)
    # Pulumi schedules on the thread's current event loop; an earlier test's asyncio.run() leaves
    # none behind, so each program run gets its own.
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.settings.ROOT.set(None)  # a fresh root Stack per program run
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config({**schema_defaults(), **config})
    outputs: dict[str, Any] = {}
    secret_outputs: set[str] = set()

    async def find_secrets(exported: dict[str, Any]) -> None:
        for name, value in exported.items():
            if isinstance(value, pulumi.Output) and await value.is_secret():
                secret_outputs.add(name)

    @pulumi.runtime.test
    def program():
        runpy.run_path(str(MAIN), run_name="__main__")
        exported = dict(pulumi.runtime.settings.get_root_resource().outputs)
        return pulumi.Output.all(
            pulumi.Output.from_input(find_secrets(exported)), pulumi.Output.all(**exported).apply(outputs.update)
        )

    error = None
    try:
        program()
    except Exception as raised:  # noqa: BLE001 - handed to the caller with what was registered
        if not expect_error:
            raise
        # An error raised inside an apply reaches every output that waits on it, and Python chains
        # those re-raises into a cycle (__context__ pointing back at itself): cut it, the message is what counts.
        raised.__cause__ = raised.__context__ = None
        error = raised.with_traceback(None)
    return Recording(
        resources=monitor.registered,
        outputs=outputs,
        secret_outputs=secret_outputs,
        calls=mocks.calls,
        error=error,
        stack_references=mocks.stack_references,
    )


def qualified(values: dict[str, str]) -> dict[str, str]:
    return {f"{PROJECT}:{key}": value for key, value in values.items()}
