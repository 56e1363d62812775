"""apiKeySecret and hfTokenSecret: Secret Manager secrets reach the server's environment through a
Kubernetes Secret the program makes at deploy time, never through the stack's config."""

from __future__ import annotations

import json

import pytest

from components.core import manifests, server_secrets
from components.core.errors import ConfigError
from components.core.planner import plan_deployment
from serving import protocol
from serving.server import cli
from tests.stack.pulumi_harness import HF_TOKEN, qualified, run_stack
from tests.stack.stack_helpers import BUNDLED_IMAGE, config

BUNDLED = {
    "serverRuntime": "bundled",
    "bundledServerImage": BUNDLED_IMAGE,
    "checkpointPath": "gs://test-checkpoints/m/model.npz",
}
VLLM = {
    "serverRuntime": "vllm",
    "topology": "2x4",
    "tpuMachineType": "ct6e-standard-8t",
    "quantization": "bf16",
    "quantizeKvCache": "false",
    "checkpointPath": "hf://meta-llama/Llama-3.1-8B",
}


def _server_env(cfg) -> list[dict]:
    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg)).to_dict()
    (server,) = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    return server["env"]


@pytest.mark.parametrize("runtime, env", [(BUNDLED, protocol.API_KEY_ENV), (VLLM, "VLLM_API_KEY")])
def test_the_api_key_reaches_the_servers_environment_from_a_kubernetes_secret(runtime, env):
    cfg = config(**runtime, apiKeySecret="serving-api-key")
    (secret,) = cfg.runtime.secret_envs(cfg)
    assert (secret.env, secret.secret_id, secret.name) == (env, "serving-api-key", f"{cfg.names.app_name}-api-key")
    assert {"name": env, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": "api-key"}}} in _server_env(cfg)


def test_the_bundled_server_checks_the_key_from_that_environment_variable():
    lws = manifests.leader_worker_set(
        config(**BUNDLED, apiKeySecret="serving-api-key"), plan_deployment(config(**BUNDLED))
    ).to_dict()
    (server,) = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    assert server["command"][-2:] == ["--api-key-env", protocol.API_KEY_ENV]
    assert cli.build_parser().parse_intermixed_args(server["command"][3:]).api_key_env == protocol.API_KEY_ENV
    keyless = manifests.leader_worker_set(config(**BUNDLED), plan_deployment(config(**BUNDLED))).to_dict()
    assert (
        "--api-key-env"
        not in keyless["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["command"]
    )


def test_without_the_keys_the_server_gets_no_secret():
    for runtime in (BUNDLED, VLLM):
        cfg = config(**runtime)
        assert cfg.runtime.secret_envs(cfg) == ()
        assert not any("valueFrom" in item and "secretKeyRef" in item["valueFrom"] for item in _server_env(cfg))


def test_jetstream_has_no_api_key_check_and_refuses_the_key():
    with pytest.raises(ConfigError) as refused:
        config(apiKeySecret="serving-api-key")
    assert refused.value.keys == ("apiKeySecret", "serverRuntime")
    assert "serverRuntime=bundled or serverRuntime=vllm" in refused.value.suggestion


@pytest.mark.parametrize("key", ["apiKeySecret", "hfTokenSecret"])
def test_a_secret_resource_path_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as refused:
        config(**VLLM, **{key: "projects/p/secrets/token/versions/1"})
    assert refused.value.keys == (key,)


def test_the_kubernetes_secret_and_its_summary():
    secret = server_secrets.SecretEnv(
        env="API_KEY", config_key="apiKeySecret", secret_id="k", name="app-api-key", data_key="api-key"
    )
    assert server_secrets.kubernetes_secret(secret, "ns", "value") == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "app-api-key", "namespace": "ns"},
        "type": "Opaque",
        "stringData": {"api-key": "value"},
    }
    assert "gcloud secrets versions access latest --secret=k" in server_secrets.summary(secret, "ns")


def test_the_program_reads_both_secrets_from_secret_manager_and_keeps_them_secret():
    raw = {"model": "llama3.1-8b", **VLLM, "hfTokenSecret": "hf-token", "apiKeySecret": "serving-api-key"}
    recording = run_stack({"gcp:project": "test-project", **qualified(raw)})
    read = {
        call["secret"]
        for token, call in recording.calls
        if token == "gcp:secretmanager/getSecretVersion:getSecretVersion"
    }
    assert read == {"hf-token", "serving-api-key"}
    secrets = {secret.inputs["metadata"]["name"]: secret for secret in recording.of_type("kubernetes:core/v1:Secret")}
    assert set(secrets) == {"jetstream-pathways-hf-token", "jetstream-pathways-api-key"}
    assert secrets["jetstream-pathways-api-key"].inputs["stringData"]["value"] == {
        "api-key": HF_TOKEN
    }  # wrapped: a Pulumi secret
    lws = recording.one("kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet")
    assert {secret.urn for secret in secrets.values()} <= set(lws.dependencies)
    assert HF_TOKEN not in json.dumps(lws.inputs)
