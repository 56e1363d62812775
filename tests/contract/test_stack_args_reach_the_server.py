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
import re

import httpx
import jax
import pytest

from components.core import manifests, models, planner, scheduling
from components.core.config import parse_stack_config
from components.core.errors import ConfigError
from components.core.planner import plan_deployment
from components.core.runtimes import bundled
from components.render import read_stack_file
from serving import protocol
from serving.engine.config import ModelConfig
from serving.engine.jax_engine import JaxEngine
from serving.engine.loaders import load_checkpoint, runtime_config
from serving.server import cli, multihost
from serving.server import settings as server_settings
from serving.server.settings import ServingSettings
from tests.model.tokenizer_cases import (
    gguf_tokenizer,
    template,
    transformers_chat_ids,
    transformers_tokenizer,
    write_hf_dir,
)
from tests.server import server_process

ROOT = pathlib.Path(__file__).resolve().parents[2]


def serves_a_model(stack: str) -> bool:
    """Every example stack but a platform stack (role=platform), which has no workload."""
    raw, _ = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    return raw.get("role", "all") != "platform"


STACKS = sorted(
    stack for path in ROOT.glob("Pulumi.*.yaml") if serves_a_model(stack := path.name[len("Pulumi.") : -len(".yaml")])
)
IMAGE = "registry.example/jetstream-jax:0.1.0"
CHECKPOINT_FILE = "model-int8.npz"


# The bundled server keeps a whole weight copy per autoregressive shard: the 405B reference recipe
# (tensor 8 x autoregressive 2) does not fit it, fsdp 2 x tensor 8 does.
BUNDLED_PARALLELISM = {
    "llama3-405b-v6e16": {"tensorParallelism": "8", "autoregressiveParallelism": "1", "fsdpParallelism": "2"}
}


def bundled_config(stack: str):
    """The example stack with serverRuntime=bundled and a .npz checkpoint object in its bucket."""
    raw, project = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    bucket = raw["checkpointPath"].removeprefix("gs://").split("/", 1)[0]
    overrides = {
        "serverRuntime": "bundled",
        "bundledServerImage": IMAGE,
        "checkpointPath": f"gs://{bucket}/{stack}/{CHECKPOINT_FILE}",
        **BUNDLED_PARALLELISM.get(stack, {}),
    }
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
    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg)).to_dict()
    template = lws["spec"]["leaderWorkerTemplate"]
    servers = [
        (role, container)
        for role in ("leaderTemplate", "workerTemplate")
        for container in template[role]["spec"]["containers"]
        if container["image"] == IMAGE
    ]
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
SHARED_VALUES = {
    protocol.HTTP_PORT,
    protocol.GRPC_PORT,
    protocol.COORDINATOR_PORT,
    protocol.CONTROL_PORT,
    protocol.INTERLEAVED_SERVER,
    protocol.DISAGGREGATED_SERVER,
    protocol.COORDINATOR_PORT_ENV,
}


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
    sources = [
        path
        for pattern in ("components/**/*.py", "serving/**/*.py")
        for path in ROOT.glob(pattern)
        if path != ROOT / "serving" / "protocol.py"
    ]
    copies = [
        f"{path.relative_to(ROOT)}:{line} sets {value!r}"
        for path in sources
        for line, value in assigned_constants(path)
        if isinstance(value, (int, str)) and not isinstance(value, bool) and value in SHARED_VALUES
    ]
    assert copies == []


def test_the_copy_check_sees_a_copy(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        f"PORT = {protocol.COORDINATOR_PORT}\ndef f():\n    g(server={protocol.DISAGGREGATED_SERVER!r})\n"
    )
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
        # The checkpoint, in the pod's read-only /models mount of its bucket.
        assert settings.load_parameters_path == f"{bundled.MODELS_DIR}/{CHECKPOINT_FILE}"
        (mount,) = [
            m for m in container["volumeMounts"] if settings.load_parameters_path.startswith(m["mountPath"] + "/")
        ]
        assert mount["name"] == bundled.MODELS_VOLUME
        env = pod_environment(container, pod_name="leader")
        assert int(env["JAX_COORDINATOR_PORT"]) == multihost.DEFAULT_COORDINATOR_PORT
        # The compilation cache: the pod's own directory (Kubernetes expands $(POD_NAME)) on its bucket mount.
        assert settings.jax_cache_dir == f"{bundled.JAX_CACHE_DIR}/$(POD_NAME)" and "POD_NAME" in env


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
        env = {
            "LWS_LEADER_ADDRESS": "leader.svc",
            "LWS_GROUP_SIZE": str(size),
            "LWS_WORKER_INDEX": str(index),
            "JAX_COORDINATOR_PORT": str(protocol.COORDINATOR_PORT),
        }
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
# Memory: the planner's per-chip figures are what the bundled server allocates.

DEVICES = 8  # tests/conftest.py gives JAX 8 virtual CPU devices: one 2x4 slice
MESHES = (
    {"tensorParallelism": "8"},
    {"tensorParallelism": "4", "autoregressiveParallelism": "2"},
    {"fsdpParallelism": "2", "tensorParallelism": "4"},
    {"tensorParallelism": "2", "autoregressiveParallelism": "4"},
)
PRECISIONS = ({"quantization": "int8", "quantizeKvCache": "true"}, {"quantization": "bf16", "quantizeKvCache": "false"})
WEIGHTS_TOLERANCE = 0.01  # the planner leaves out norms and int8 scales (planner.py)


def _memory_cases():
    served = [name for name, preset in models.PRESETS.items() if preset.family in bundled.SERVED_FAMILIES]
    for model, mesh, precision in itertools.product(served, MESHES, PRECISIONS):
        axes = {"fsdpParallelism": "1", "autoregressiveParallelism": "1", **mesh}
        yield pytest.param(
            model,
            {**axes, **precision},
            id=f"{model}-{'x'.join(f'{k[:1]}{v}' for k, v in mesh.items())}-{precision['quantization']}",
        )


def _architecture(preset: models.ModelPreset) -> ModelConfig:
    """The preset's shapes as the bundled server's ModelConfig (its checkpoint would carry them)."""
    return ModelConfig(
        vocab_size=preset.vocab,
        d_model=preset.d_model,
        n_layers=preset.layers,
        n_heads=preset.heads,
        n_kv_heads=preset.kv_heads,
        head_dim=preset.head_dim,
        ffn_dim=preset.ffn_dim,
        tie_embeddings=preset.tie_embeddings,
    )


@pytest.mark.parametrize("model, raw", list(_memory_cases()))
def test_planner_memory_is_the_bundled_servers_own_report(model, raw):
    cfg = parse_stack_config(
        {
            "model": model,
            "topology": "2x4",
            "tpuMachineType": "ct6e-standard-8t",
            "serverRuntime": "bundled",
            "bundledServerImage": IMAGE,
            "checkpointPath": f"gs://test-checkpoints/{CHECKPOINT_FILE}",
            **raw,
        },
        project="test-project",
        stack="test",
    )
    axes = planner.server_axes(cfg)
    planned = cfg.runtime.memory_per_chip(
        cfg, planner.resolve_parallelism(cfg, axes)
    )  # before the fit check: 405B may not fit 8 chips
    # The server as the stack starts it: settings from the rendered arguments, no weights loaded.
    settings = server_settings.parse_settings(bundled.server_args(cfg, axes))
    engine_settings = settings.engine_settings()
    engine = JaxEngine(
        engine_settings,
        runtime_config(_architecture(cfg.model), engine_settings),
        host_params=None,
        devices=jax.devices()[:DEVICES],
    )
    report = engine.memory()
    assert report.kv_cache_bytes_per_device == planned.kv_cache_bytes
    assert report.params_bytes_per_device == pytest.approx(planned.weights_bytes, rel=WEIGHTS_TOLERANCE)


# ---------------------------------------------------------------------------------------------
# The rendered pods run: a Llama 3.1 8B bundled stack reading a Hugging Face directory from its
# bucket, its leader's command line run here as `python -m serving` on a tiny Llama 3.1-family
# checkpoint (the real Llama 3 tokenizer and chat template, llama3 RoPE scaling, random weights).

LLAMA31_STACK = "llama3-8b-v6e8"
HF_CHECKPOINT = "gs://my-gcp-project-checkpoints/meta-llama/Llama-3.1-8B"
# The tiny checkpoint's name, passed as model_name in place of the rendered llama3.1-8b: the server
# refuses a checkpoint whose shapes are not the preset's (tested below), and these are not.
TINY_MODEL_NAME = "tiny-llama3.1"
# Llama 3.1's own RoPE scaling; GQA as in the 8B (4 query heads per KV head); every dimension
# divides the rendered tensor axis (all 8 chips).
TINY_LLAMA31 = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
}  # fmt: skip
K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def llama31_hf_stack():
    raw, project = read_stack_file(ROOT / f"Pulumi.{LLAMA31_STACK}.yaml")
    overrides = {"serverRuntime": "bundled", "bundledServerImage": IMAGE, "checkpointPath": HF_CHECKPOINT}
    return parse_stack_config({**raw, **overrides}, project=project, stack=LLAMA31_STACK)


@pytest.fixture(scope="module")
def tiny_llama31(tmp_path_factory) -> pathlib.Path:
    """A Hugging Face directory as the bucket would hold one: config.json, safetensors, tokenizer."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("Llama-3.1-8B")
    tokenizer = gguf_tokenizer("llama-bpe")
    write_hf_dir(path, tokenizer, {"chat_template": template("meta-llama-Llama-3.1-8B-Instruct")})
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, **TINY_LLAMA31)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


def pod_environment(container: dict, pod_name: str) -> dict[str, str]:
    """The container's env as the kubelet sets it: literal values, and the pod's name by fieldRef."""
    fields = {"metadata.name": pod_name}
    return {
        item["name"]: item["value"] if "value" in item else fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        for item in container["env"]
    }


def local_command(container: dict, env: dict[str, str], mounts: dict[str, pathlib.Path]) -> list[str]:
    """The container's command line as the kubelet runs it ($(VAR) expanded from its env), with every
    volume's mount path replaced by the local directory standing in for the volume."""
    paths = {mount["mountPath"]: str(mounts[mount["name"]]) for mount in container["volumeMounts"]}

    def local(arg: str) -> str:
        arg = K8S_VAR.sub(lambda var: env[var.group(1)], arg)
        key, sep, value = arg.rpartition("=")
        for mount_path, directory in paths.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                return f"{key}{sep}{directory}{value[len(mount_path) :]}"
        return arg

    return [local(arg) for arg in (*container["command"], *container["args"])]


def on_loopback(args: list[str], http_port: int, grpc_port: int) -> list[str]:
    """The server's arguments with its address and ports on free loopback ports instead of the pod's."""
    local = {"--host": server_process.HOST, "--http-port": str(http_port), "--grpc-port": str(grpc_port)}
    args = list(args)
    for index, flag in enumerate(args[:-1]):
        if flag in local:
            args[index + 1] = local[flag]
    return args


def test_a_llama31_hf_stack_renders_and_schedules():
    cfg = llama31_hf_stack()
    plan = plan_deployment(cfg)
    assert scheduling.check_deployment(cfg, plan)  # raises SchedulingError when a pod fits no node
    _, servers = server_pods(cfg)
    _, settings = parse_server_command(servers[0][1])
    assert (settings.model_name, settings.load_parameters_path) == ("llama3.1-8b", bundled.MODELS_DIR)
    leader = manifests.leader_worker_set(cfg, plan).to_dict()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    (volume,) = [v for v in leader["spec"]["volumes"] if v["name"] == bundled.MODELS_VOLUME]
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "my-gcp-project-checkpoints"


@pytest.mark.slow
def test_the_tiny_checkpoint_is_refused_as_a_llama31_8b(tiny_llama31):
    """Why the local run names its checkpoint: under the rendered model_name the shapes must be the 8B's."""
    settings = server_settings.parse_settings(["model_name=llama3.1-8b", f"load_parameters_path={tiny_llama31}"])
    with pytest.raises(ValueError, match=r"not a llama3\.1-8b.*n_layers: checkpoint 2 vs preset 32"):
        load_checkpoint(settings.engine_settings())


@pytest.mark.slow
def test_the_rendered_llama31_leader_serves_the_tiny_checkpoint(tiny_llama31, tmp_path):
    cfg = llama31_hf_stack()
    lws, servers = server_pods(cfg)
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 1  # one v6e-8 host: the leader alone runs
    (role, container), *_ = servers
    assert role == "leaderTemplate"
    pod_name = f"{lws['metadata']['name']}-0"
    env = pod_environment(container, pod_name)
    jax_cache = tmp_path / "jax-cache"
    command = local_command(container, env, {bundled.MODELS_VOLUME: tiny_llama31, bundled.JAX_CACHE_VOLUME: jax_cache})
    assert command[:3] == ["python", "-m", "serving"] and "model_name=llama3.1-8b" in command
    http_port, grpc_port = server_process.free_port(), server_process.free_port()
    args = on_loopback(command[3:], http_port, grpc_port)
    args = [f"model_name={TINY_MODEL_NAME}" if arg == "model_name=llama3.1-8b" else arg for arg in args]
    lws_env = {"LWS_LEADER_ADDRESS": server_process.HOST, "LWS_GROUP_SIZE": "1", "LWS_WORKER_INDEX": "0"}
    chips = int(container["resources"]["limits"]["google.com/tpu"])
    proc_env = server_process.server_env(chips, **env, **lws_env)
    with server_process.running(args, proc_env, http_port, "rendered-llama31-leader.log"):
        url = f"http://{server_process.HOST}:{http_port}"
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"model": TINY_MODEL_NAME, "messages": messages, "max_tokens": 8, "temperature": 0}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        expected_prompt = transformers_chat_ids(transformers_tokenizer(tiny_llama31), messages)
        assert response.json()["usage"]["prompt_tokens"] == len(expected_prompt)
        assert response.json()["usage"]["completion_tokens"] >= 1
    # The compilation cache went to the pod's own directory under the jax-cache volume.
    assert any((jax_cache / pod_name).iterdir())
