"""The GitHub workflows: valid against GitHub's workflow schema, and the review/apply rules the README
promises - triggers, least-privilege permissions, pinned actions, Workload Identity Federation only,
the preview comment, the policy pack, environments and concurrency groups."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "stack"))
from pulumi_harness import EXAMPLE_STACKS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
ACTIONS = sorted((GITHUB / "actions").glob("*/action.yml"))
PINNED = re.compile(r"[\w.-]+/[\w.-]+(?:/[\w./-]+)?@[0-9a-f]{40}")
RELEASE_TAG_COMMENT = re.compile(r"#\s*v\d+\.\d+\.\d+\s*$")
AUTH, GCLOUD, PULUMI = "google-github-actions/auth", "google-github-actions/setup-gcloud", "pulumi/actions"
FORK_GUARD = "github.event.pull_request.head.repo.full_name == github.repository"


def load(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text())


def workflow(name: str) -> dict:
    return load(GITHUB / "workflows" / name)


def triggers(parsed: dict) -> dict:
    return parsed.get("on", parsed.get(True))  # YAML 1.1 reads the key `on` as true


def action_name(uses: str) -> str:
    return uses.split("@", 1)[0]


def expanded_steps(steps: list[dict]) -> list[dict]:
    """The steps, with each local composite action (./.github/actions/...) replaced by its own steps."""
    expanded = []
    for step in steps:
        uses = step.get("uses", "")
        if uses.startswith("./.github/actions/"):
            expanded += expanded_steps(load(ROOT / uses / "action.yml")["runs"]["steps"])
        else:
            expanded.append(step)
    return expanded


def job_steps(job: dict) -> list[dict]:
    """Every step a job runs, through local composite actions and a called local workflow."""
    if job.get("uses", "").startswith("./.github/workflows/"):
        called = load(ROOT / job["uses"])
        return [step for called_job in called["jobs"].values() for step in job_steps(called_job)]
    return expanded_steps(job.get("steps", []))


def steps_using(job: dict, action: str) -> list[dict]:
    return [step for step in job_steps(job) if action_name(step.get("uses", "")) == action]


def all_jobs() -> list[tuple[str, str, dict]]:
    return [(path.name, name, job) for path in WORKFLOWS for name, job in load(path)["jobs"].items()]


def pulumi_pin() -> str:
    return re.search(r"^pulumi==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, GITHUB / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_jsonschema(schema: str, *files: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, files)],
                          capture_output=True, text=True, timeout=120, check=False)


# --- schema ---------------------------------------------------------------------------------------

def test_the_workflows_and_actions_exist():
    assert {path.name for path in WORKFLOWS} == {"pull-request.yml", "deploy.yml", "pulumi-up.yml"}
    assert [path.parent.name for path in ACTIONS] == ["pulumi-cloud-setup"]


def test_every_workflow_validates_against_the_github_workflow_schema():
    result = check_jsonschema("vendor.github-workflows", *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_local_action_validates_against_the_github_action_schema():
    result = check_jsonschema("vendor.github-actions", *ACTIONS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path):
    broken = workflow("pull-request.yml")
    del broken["jobs"]["offline"]["runs-on"]
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    assert check_jsonschema("vendor.github-workflows", path).returncode != 0


# --- pinning, permissions, credentials --------------------------------------------------------------

def every_uses_line() -> list[tuple[str, str]]:
    lines = []
    for path in [*WORKFLOWS, *ACTIONS]:
        lines += [(path.name, line.strip()) for line in path.read_text().splitlines()
                  if line.strip().removeprefix("- ").startswith("uses:")]
    return lines


def test_every_action_is_pinned_to_a_full_commit_sha_with_its_release_tag():
    remote = [(name, line) for name, line in every_uses_line() if "./" not in line]
    assert remote
    for name, line in remote:
        uses = line.removeprefix("- ").removeprefix("uses:").split("#")[0].strip()
        assert PINNED.fullmatch(uses), f"{name}: {line} is not pinned to a 40-hex commit SHA"
        assert RELEASE_TAG_COMMENT.search(line), f"{name}: {line} does not name its release tag (# vX.Y.Z)"


def test_workflows_grant_nothing_by_default_and_every_job_declares_its_permissions():
    for path in WORKFLOWS:
        assert load(path)["permissions"] == {}, path.name
    for file, name, job in all_jobs():
        assert isinstance(job.get("permissions"), dict), f"{file}:{name} has no permissions block"


@pytest.mark.parametrize(("file", "name", "job"), all_jobs(), ids=[f"{f}:{n}" for f, n, _ in all_jobs()])
def test_each_job_has_least_privilege(file, name, job):
    permissions = job["permissions"]
    uses_wif = bool(steps_using(job, AUTH))
    comments = any(str(step["with"].get("comment-on-pr")).lower() == "true" for step in steps_using(job, PULUMI))
    assert (permissions.get("id-token") == "write") == uses_wif, "id-token: write exactly where WIF is used"
    assert (permissions.get("pull-requests") == "write") == comments, "pull-requests: write exactly where commenting"
    others = {scope: level for scope, level in permissions.items() if scope not in ("id-token", "pull-requests")}
    assert others == {"contents": "read"}


def test_google_cloud_credentials_come_only_from_workload_identity_federation():
    auth_steps = [step for _, _, job in all_jobs() for step in steps_using(job, AUTH)]
    assert auth_steps
    for step in auth_steps:
        assert set(step["with"]) == {"workload_identity_provider", "service_account"}
    for path in GITHUB.rglob("*"):
        if path.is_file():
            assert "credentials_json" not in path.read_text(), f"{path} mentions a key file"


@pytest.mark.parametrize(("file", "name", "job"), [j for j in all_jobs() if steps_using(j[2], PULUMI)],
                         ids=lambda value: value if isinstance(value, str) else "")
def test_every_pulumi_job_authenticates_installs_the_gke_auth_plugin_and_applies_the_policy_pack(file, name, job):
    steps = job_steps(job)
    names = [action_name(step.get("uses", "")) for step in steps]
    assert names.index(AUTH) < names.index(GCLOUD) < names.index(PULUMI)
    [gcloud] = steps_using(job, GCLOUD)
    assert "gke-gcloud-auth-plugin" in gcloud["with"]["install_components"].split(",")
    assert any(step.get("run", "").strip() == "./setup.sh --deploy" for step in steps)
    for step in steps_using(job, PULUMI):
        assert step["with"]["policyPacks"] == "policy"
        assert step["with"]["pulumi-version"] == pulumi_pin(), "the CLI matches the pulumi SDK in requirements.txt"


# --- the pull-request workflow ----------------------------------------------------------------------

def test_pull_requests_trigger_the_review_workflow():
    assert triggers(workflow("pull-request.yml")) == {"pull_request": {"branches": ["main"]}}


def test_the_offline_job_needs_no_credentials_and_runs_the_tests_and_the_render_diff():
    offline = workflow("pull-request.yml")["jobs"]["offline"]
    assert offline["permissions"] == {"contents": "read"}
    text = json.dumps(offline)
    assert "secrets." not in text and "vars." not in text and "if" not in offline
    runs = [step.get("run", "") for step in offline["steps"]]
    assert "bash .ci/run" in runs
    assert any("python .github/scripts/render_diff.py" in run and "$BASE_SHA" in run for run in runs)
    [upload] = [step for step in offline["steps"] if action_name(step.get("uses", "")) == "actions/upload-artifact"]
    assert upload["with"]["name"] == "rendered-manifests"


def test_the_preview_job_previews_each_affected_stack_with_a_diff_comment_on_the_pull_request():
    jobs = workflow("pull-request.yml")["jobs"]
    assert jobs["affected"]["if"] == FORK_GUARD, "forks get no OIDC token or secrets: no cloud preview"
    assert "affected_stacks.py --base" in jobs["affected"]["steps"][-1]["run"]
    preview = jobs["preview"]
    assert preview["needs"] == "affected"
    assert preview["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.affected.outputs.stacks) }}"
    [step] = steps_using(preview, PULUMI)
    assert step["with"]["command"] == "preview"
    assert step["with"]["stack-name"] == "${{ matrix.stack }}"
    assert step["with"]["diff"] is True and step["with"]["comment-on-pr"] is True


# --- the apply on main -------------------------------------------------------------------------------

def test_a_push_to_main_applies_platform_then_dev_then_prod():
    deploy = workflow("deploy.yml")
    assert triggers(deploy) == {"push": {"branches": ["main"]}}
    environments = load_script("affected_stacks").ENVIRONMENTS
    assert environments == ("platform", "dev", "prod")
    previous = None
    for stack in environments:
        job = deploy["jobs"][stack]
        assert job["uses"] == "./.github/workflows/pulumi-up.yml" and job["with"] == {"stack": stack}
        assert job["secrets"] == "inherit"
        needs = [job["needs"]] if isinstance(job["needs"], str) else job["needs"]
        assert ("environments" in needs) and (previous is None or previous in needs)
        previous = stack


def test_each_apply_runs_in_its_github_environment_and_its_own_concurrency_group():
    called = workflow("pulumi-up.yml")
    assert triggers(called) == {"workflow_call": {"inputs": {"stack": {
        "description": "The environment stack to update (platform, dev, prod)", "type": "string", "required": True}}}}
    [job] = called["jobs"].values()
    assert job["environment"] == "${{ inputs.stack }}"
    assert job["concurrency"] == {"group": "pulumi-up-${{ inputs.stack }}", "cancel-in-progress": False}
    [step] = steps_using(job, PULUMI)
    assert step["with"]["command"] == "up" and step["with"]["stack-name"] == "${{ inputs.stack }}"


def test_ci_runs_the_first_run_commands_set_up_then_the_readme_test_command():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["./setup.sh", "python3 -m pytest -q"]


# --- the scripts ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("changed", "expected"), [
    (["Pulumi.dev.yaml"], ["dev"]),
    (["Pulumi.prod.yaml", "Pulumi.platform.yaml"], ["platform", "prod"]),
    (["components/core/planner.py"], ["platform", "dev", "prod"]),
    (["requirements.txt"], ["platform", "dev", "prod"]),
    (["policy/rules.py"], ["platform", "dev", "prod"]),
    (["serving/Dockerfile"], ["platform", "dev", "prod"]),
    (["README.md", "tests/stack/test_stack_program.py", "benchmarks/serve_bench.py"], []),
    (["Pulumi.llama3-8b-v6e8.yaml"], []),
    (["Pulumi.yaml.orig", "components-old/x.py"], []),
])
def test_affected_stacks(changed, expected):
    affected = load_script("affected_stacks").affected_stacks
    assert affected(changed, present=["platform", "dev", "prod"]) == expected


def test_only_environments_with_a_stack_file_are_affected():
    script = load_script("affected_stacks")
    assert script.affected_stacks(["components/core/planner.py"], present=["dev"]) == ["dev"]
    present = script.present_environments()
    assert present == [stack for stack in script.ENVIRONMENTS if (ROOT / f"Pulumi.{stack}.yaml").is_file()]


def copy_tree(destination: pathlib.Path, stacks: list[str]) -> pathlib.Path:
    """The files `python -m components.render` reads, plus the given stack files."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("components", "serving"):
        shutil.copytree(ROOT / package, destination / package, ignore=ignore)
    shutil.copy(ROOT / "Pulumi.yaml", destination)
    for stack in stacks:
        shutil.copy(ROOT / f"Pulumi.{stack}.yaml", destination)
    return destination


def set_config(tree: pathlib.Path, stack: str, key: str, value: str) -> None:
    path = tree / f"Pulumi.{stack}.yaml"
    stack_file = yaml.safe_load(path.read_text())
    stack_file["config"][f"jetstream-tpu:{key}"] = value
    path.write_text(yaml.safe_dump(stack_file))


def test_render_diff_shows_what_the_change_does_to_the_rendered_manifests(tmp_path):
    changed, removed, added = EXAMPLE_STACKS[:3]
    base = copy_tree(tmp_path / "base", [changed, removed])
    head = copy_tree(tmp_path / "head", [changed, added])
    set_config(head, changed, "appName", "renamed-app")
    out = tmp_path / "out"
    assert load_script("render_diff").compare(base, head, out) is True
    summary = (out / "summary.md").read_text()
    assert f"| `{added}` | added |" in summary and f"| `{removed}` | removed |" in summary
    assert re.search(rf"\| `{changed}` \| changed \(\+\d+ -\d+\) \|", summary)
    diff = (out / "render.diff").read_text()
    assert f"+++ head/{changed}.yaml" in diff
    assert any(line.startswith("+") and "renamed-app" in line for line in diff.splitlines())
    assert (out / "base" / f"{removed}.yaml").exists() and (out / "head" / f"{added}.yaml").exists()


def test_render_diff_fails_when_a_stack_file_no_longer_renders(tmp_path):
    stack = EXAMPLE_STACKS[0]
    base = copy_tree(tmp_path / "base", [stack])
    head = copy_tree(tmp_path / "head", [stack])
    set_config(head, stack, "topology", "9x9")
    out = tmp_path / "out"
    assert load_script("render_diff").compare(base, head, out) is False
    assert f"| `{stack}` | **fails to render at the head** |" in (out / "summary.md").read_text()
    assert "topology" in (out / "head" / f"{stack}.yaml").read_text()
