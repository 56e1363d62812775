"""The stack and the bundled server agree: every argument list the stack renders for the server
container is accepted by `python -m serving`'s own parser, and means the same thing there.

This is the seam between the two halves of the project: a flag the stack adds that the server
does not know would only show up as a crash-looping pod after a 15-minute deploy.
"""

from __future__ import annotations

import pathlib

import pytest

from components import manifests
from components.config import parse_stack_config
from components.planner import plan_deployment
from components.render import read_stack_file
from serving import cli
from serving.settings import ServingSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
STACKS = sorted(path.name[len("Pulumi.") : -len(".yaml")] for path in ROOT.glob("Pulumi.*.yaml"))
BUNDLED = {"serverRuntime": "bundled", "bundledServerImage": "registry.example/jetstream-jax:0.1.0"}


def bundled_server_container(stack: str) -> tuple[dict, str]:
    """The server container of the stack's LeaderWorkerSet, and the stack's mode."""
    raw, project = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    cfg = parse_stack_config({**raw, **BUNDLED}, project=project, stack=stack)
    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg))
    containers = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    (server,) = [c for c in containers if c["image"] == BUNDLED["bundledServerImage"]]
    return server, cfg.mode


def test_example_stacks_exist():
    assert {"llama3-405b-v6e16", "llama2-70b-disagg"} <= set(STACKS)


@pytest.mark.parametrize("stack", STACKS)
def test_rendered_server_arguments_parse_as_server_settings(stack):
    container, mode = bundled_server_container(stack)
    command = [*container.get("command", ()), *container.get("args", ())]
    assert command[:3] == ["python", "-m", "serving"]
    args = cli.build_parser().parse_intermixed_args(command[3:])
    settings = cli.settings_from_args(args)  # raises on any key the server does not know

    flags = dict(arg.split("=", 1) for arg in args.settings if "=" in arg)
    assert isinstance(settings, ServingSettings)
    assert settings.model_name == flags["model_name"]
    assert settings.max_target_length == int(flags["max_target_length"])
    assert settings.per_device_batch_size == int(flags["per_device_batch_size"])
    assert settings.ici_tensor_parallelism == int(flags["ici_tensor_parallelism"])
    assert settings.quantization == flags.get("quantization", "")
    assert (args.http_port, args.grpc_port) == (8000, 9000)
    assert settings.disaggregated == (mode == "disaggregated")
