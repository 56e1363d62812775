"""The stack and the bundled server agree: every argument list the stack renders for the server
containers is accepted by `python -m serving`'s own parser, and means the same thing there.

This is the seam between the two halves of the project: a flag the stack adds that the server
does not know, or a process group the server cannot assemble (LWS_GROUP_SIZE counting pods that
never run the server), would only show up as a crash-looping or hanging pod after a 15-minute
deploy; a planner that counts less memory than the server allocates, as an out-of-memory crash.
"""

from __future__ import annotations

import ast
import itertools
import pathlib

import jax
import pytest

from components.core import manifests, models, planner
from components.core.config import parse_stack_config
from components.core.errors import ConfigError
from components.core.planner import plan_deployment
from components.core.runtimes import bundled
from components.render import read_stack_file
from serving import protocol
from serving.engine.config import ModelConfig
from serving.engine.jax_engine import JaxEngine
from serving.engine.loaders import runtime_config
from serving.server import cli, multihost
from serving.server import settings as server_settings
from serving.server.settings import ServingSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
def serves_a_model(stack: str) -> bool:
    """Every example stack but a platform stack (role=platform), which has no workload."""
    raw, _ = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    return raw.get("role", "all") != "platform"


STACKS = sorted(stack for path in ROOT.glob("Pulumi.*.yaml") if serves_a_model(stack := path.name[len("Pulumi.") : -len(".yaml")]))
IMAGE = "registry.example/jetstream-jax:0.1.0"
CHECKPOINT_FILE = "model-int8.npz"


# The bundled server keeps a whole weight copy per autoregressive shard: the 405B seed recipe
# (tensor 8 x autoregressive 2) does not fit it, fsdp 2 x tensor 8 does.
BUNDLED_PARALLELISM = {"llama3-405b-v6e16": {"tensorParallelism": "8", "autoregressiveParallelism": "1", "fsdpParallelism": "2"}}


def bundled_config(stack: str):
    """The example stack with serverRuntime=bundled and a .npz checkpoint object in its bucket."""
    raw, project = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    bucket = raw["checkpointPath"].removeprefix("gs://").split("/", 1)[0]
    overrides = {"serverRuntime": "bundled", "bundledServerImage": IMAGE, "checkpointPath": f"gs://{bucket}/{stack}/{CHECKPOINT_FILE}",
                 **BUNDLED_PARALLELISM.get(stack, {})}
    return parse_stack_config({**raw, **overrides}, project=project, stack=stack)


def is_disaggregated(stack: str) -> bool:
    raw, _ = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    return raw.get("mode") == "disaggregated"


def runs_vllm(stack: str) -> bool:
    """A vLLM example: its keys (hfTokenSecret) belong to vLLM, so it has no bundled variant."""
    raw, _ = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    return raw.get("serverRuntime") == "vllm"


BUNDLED_STACKS = [stack for stack in STACKS if not is_disaggregated(stack) and not runs_vllm(stack)]
REFUSED_STACKS = [stack for stack in STACKS if is_disaggregated(stack)]


def server_pods(cfg) -> tuple[dict, list[tuple[str, dict]]]:
    """The LWS and every (role, container) running the bundled server, leader first."""
    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg))
    template = lws["spec"]["leaderWorkerTemplate"]
    servers = [(role, container) for role in ("leaderTemplate", "workerTemplate")
               for container in template[role]["spec"]["containers"] if container["image"] == IMAGE]
    return lws, servers


def parse_server_command(container: dict):
    command = [*container.get("command", ()), *container.get("args", ())]
    assert command[:3] == ["python", "-m", "serving"]
    args = cli.build_parser().parse_intermixed_args(command[3:])
    return args, cli.settings_from_args(args)  # raises on any key the server does not know


def test_example_stacks_exist():
    assert {"llama3-405b-v6e16", "llama2-70b-disagg"} <= set(STACKS)
    assert BUNDLED_STACKS and REFUSED_STACKS


# The values both halves share, which serving/protocol.py alone may write down.
SHARED_VALUES = {protocol.HTTP_PORT, protocol.GRPC_PORT, protocol.COORDINATOR_PORT, protocol.CONTROL_PORT,
                 protocol.INTERLEAVED_SERVER, protocol.DISAGGREGATED_SERVER, protocol.COORDINATOR_PORT_ENV}


def assigned_constants(path: pathlib.Path) -> list[tuple[int, object]]:
    """(line, value) of every name, field or keyword set to a literal in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign, ast.keyword)) else None
        if isinstance(value, ast.Constant):
            found.append((value.lineno, value.value))
    return found


def test_shared_constants_are_written_only_in_the_protocol_module():
    """Ports, the coordinator port and the server names have one home both halves import."""
    sources = [path for pattern in ("components/**/*.py", "serving/**/*.py") for path in ROOT.glob(pattern)
               if path != ROOT / "serving" / "protocol.py"]
    copies = [f"{path.relative_to(ROOT)}:{line} sets {value!r}"
              for path in sources for line, value in assigned_constants(path)
              if isinstance(value, (int, str)) and not isinstance(value, bool) and value in SHARED_VALUES]
    assert copies == []


def test_the_copy_check_sees_a_copy(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(f"PORT = {protocol.COORDINATOR_PORT}\ndef f():\n    g(server={protocol.DISAGGREGATED_SERVER!r})\n")
    found = {value for _, value in assigned_constants(source)}
    assert found >= {protocol.COORDINATOR_PORT, protocol.DISAGGREGATED_SERVER}


def test_the_servers_own_names_are_the_shared_ones():
    assert protocol.DISAGGREGATED_SERVER in server_settings.INFERENCE_SERVERS
    group = multihost.ProcessGroup(coordinator_host="leader", num_processes=2, process_id=0)
    assert (group.coordinator_port, group.control_port) == (protocol.COORDINATOR_PORT, protocol.CONTROL_PORT)


@pytest.mark.parametrize("stack", BUNDLED_STACKS)
def test_rendered_server_arguments_parse_as_server_settings(stack):
    cfg = bundled_config(stack)
    _, servers = server_pods(cfg)
    roles = [role for role, _ in servers]
    assert roles == ["leaderTemplate", "workerTemplate"]  # both templates run the server, once each
    for _, container in servers:
        args, settings = parse_server_command(container)
        flags = dict(arg.split("=", 1) for arg in args.settings if "=" in arg)
        assert isinstance(settings, ServingSettings)
        assert settings.model_name == flags["model_name"]
        assert settings.max_target_length == int(flags["max_target_length"])
        assert settings.per_device_batch_size == int(flags["per_device_batch_size"])
        assert settings.ici_tensor_parallelism == int(flags["ici_tensor_parallelism"])
        assert settings.quantization == flags.get("quantization", "")
        assert (args.http_port, args.grpc_port) == (8000, 9000)
        assert settings.disaggregated is False
        # Multi-controller: no Pathways, every process joins jax.distributed.
        assert settings.enable_single_controller is False
        # The file the init container copied, in the pod's /models volume.
        assert settings.load_parameters_path == f"{bundled.MODELS_DIR}/{CHECKPOINT_FILE}"
        (mount,) = [m for m in container["volumeMounts"] if settings.load_parameters_path.startswith(m["mountPath"] + "/")]
        assert mount["name"] == bundled.MODELS_VOLUME
        # Literal values only: POD_NAME comes from the downward API (valueFrom), not a value.
        env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
        assert int(env["JAX_COORDINATOR_PORT"]) == multihost.DEFAULT_COORDINATOR_PORT


@pytest.mark.parametrize("stack", BUNDLED_STACKS)
def test_group_size_is_the_number_of_server_processes(stack):
    """LWS_GROUP_SIZE (= LWS size) is the process count the server waits for: it must equal the
    pods that run the server, and the hosts of the slice (one process per TPU host)."""
    cfg = bundled_config(stack)
    lws, servers = server_pods(cfg)
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    leader_runs_server = any(role == "leaderTemplate" for role, _ in servers)
    worker_runs_server = any(role == "workerTemplate" for role, _ in servers)
    pods_running_server = int(leader_runs_server) + (size - 1) * int(worker_runs_server)
    assert size == cfg.tpu_slice.hosts == pods_running_server
    # What every pod of the group computes from the LWS environment.
    for index in range(size):
        env = {"LWS_LEADER_ADDRESS": "leader.svc", "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(index),
               "JAX_COORDINATOR_PORT": str(protocol.COORDINATOR_PORT)}
        group = multihost.group_from_env(env)
        if size == 1:
            assert group is None  # single host: one process, no jax.distributed
        else:
            assert group.num_processes == pods_running_server and group.is_leader == (index == 0)
    # Each process drives its own host's chips: the devices add up to the slice.
    for _, container in servers:
        assert int(container["resources"]["limits"]["google.com/tpu"]) * size == cfg.tpu_slice.chips


@pytest.mark.parametrize("stack", REFUSED_STACKS)
def test_disaggregated_stacks_refuse_the_bundled_runtime(stack):
    with pytest.raises(ConfigError) as refused:
        bundled_config(stack)
    assert {"mode", "serverRuntime"} <= set(refused.value.keys)


# ---------------------------------------------------------------------------------------------
# Memory: the planner's per-chip figures are what the bundled server allocates (issue 8.11).

DEVICES = 8  # tests/conftest.py gives JAX 8 virtual CPU devices: one 2x4 slice
MESHES = ({"tensorParallelism": "8"}, {"tensorParallelism": "4", "autoregressiveParallelism": "2"},
          {"fsdpParallelism": "2", "tensorParallelism": "4"}, {"tensorParallelism": "2", "autoregressiveParallelism": "4"})
PRECISIONS = ({"quantization": "int8", "quantizeKvCache": "true"}, {"quantization": "bf16", "quantizeKvCache": "false"})
WEIGHTS_TOLERANCE = 0.01  # the planner leaves out norms and int8 scales (planner.py)


def _memory_cases():
    served = [name for name, preset in models.PRESETS.items() if preset.family in bundled.SERVED_FAMILIES]
    for model, mesh, precision in itertools.product(served, MESHES, PRECISIONS):
        axes = {"fsdpParallelism": "1", "autoregressiveParallelism": "1", **mesh}
        yield pytest.param(model, {**axes, **precision}, id=f"{model}-{'x'.join(f'{k[:1]}{v}' for k, v in mesh.items())}-{precision['quantization']}")


def _architecture(preset: models.ModelPreset) -> ModelConfig:
    """The preset's shapes as the bundled server's ModelConfig (its checkpoint would carry them)."""
    return ModelConfig(vocab_size=preset.vocab, d_model=preset.d_model, n_layers=preset.layers, n_heads=preset.heads,
                       n_kv_heads=preset.kv_heads, head_dim=preset.head_dim, ffn_dim=preset.ffn_dim, tie_embeddings=preset.tie_embeddings)


@pytest.mark.parametrize("model, raw", list(_memory_cases()))
def test_planner_memory_is_the_bundled_servers_own_report(model, raw):
    cfg = parse_stack_config({"model": model, "topology": "2x4", "tpuMachineType": "ct6e-standard-8t", "serverRuntime": "bundled",
                              "bundledServerImage": IMAGE, "checkpointPath": f"gs://test-checkpoints/{CHECKPOINT_FILE}", **raw},
                             project="test-project", stack="test")
    axes = planner.server_axes(cfg)
    planned = cfg.runtime.memory_per_chip(cfg, planner.resolve_parallelism(cfg, axes))  # before the fit check: 405B may not fit 8 chips
    # The server as the stack starts it: settings from the rendered arguments, no weights loaded.
    settings = server_settings.parse_settings(bundled.server_args(cfg, axes))
    engine = JaxEngine(settings, runtime_config(_architecture(cfg.model), settings), host_params=None, devices=jax.devices()[:DEVICES])
    report = engine.memory()
    assert report.kv_cache_bytes_per_device == planned.kv_cache_bytes
    assert report.params_bytes_per_device == pytest.approx(planned.weights_bytes, rel=WEIGHTS_TOLERANCE)
