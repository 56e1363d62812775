"""The GitHub workflows: valid against GitHub's workflow schema, and the review/apply rules
docs/stack/pr-review.md promises - triggers, least-privilege permissions, pinned actions, Workload
Identity Federation only, which job on which trigger can reach which credential, the preview comment,
the policy pack, environments and concurrency groups."""

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

from tests.stack.pulumi_harness import EXAMPLE_STACKS

ROOT = pathlib.Path(__file__).resolve().parents[2]
GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
ACTIONS = sorted((GITHUB / "actions").glob("*/action.yml"))
PINNED = re.compile(r"[\w.-]+/[\w.-]+(?:/[\w./-]+)?@[0-9a-f]{40}")
RELEASE_TAG_COMMENT = re.compile(r"#\s*v\d+\.\d+\.\d+\s*$")
AUTH, GCLOUD, PULUMI = "google-github-actions/auth", "google-github-actions/setup-gcloud", "pulumi/actions"
DOWNLOAD = "actions/download-artifact"
FORK_GUARD = "github.event.pull_request.head.repo.full_name == github.repository"
SELF = "$/"  # GitHub's self-repository form of a local action or reusable workflow
DEPLOYMENT_ENVIRONMENTS = ("platform", "dev", "prod")
PREVIEW_ENVIRONMENT = "preview"
SECRET = re.compile(r"secrets\.(\w+)")
VARIABLE = re.compile(r"vars\.(\w+)")


def load(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text())


def workflow(name: str) -> dict:
    return load(GITHUB / "workflows" / name)


def triggers(parsed: dict) -> dict:
    return parsed.get("on", parsed.get(True))  # YAML 1.1 reads the key `on` as true


def action_name(uses: str) -> str:
    return uses.split("@", 1)[0]


def expanded_steps(steps: list[dict]) -> list[dict]:
    """The steps, with each local composite action ($/.github/actions/...) replaced by its own steps."""
    expanded = []
    for step in steps:
        uses = step.get("uses", "")
        if uses.startswith(f"{SELF}.github/actions/"):
            expanded += expanded_steps(load(ROOT / uses.removeprefix(SELF) / "action.yml")["runs"]["steps"])
        else:
            expanded.append(step)
    return expanded


def job_steps(job: dict) -> list[dict]:
    """Every step a job runs, through local composite actions and a called local workflow."""
    if job.get("uses", "").startswith(f"{SELF}.github/workflows/"):
        called = load(ROOT / job["uses"].removeprefix(SELF))
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
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- schema ---------------------------------------------------------------------------------------


def test_the_workflows_and_actions_exist():
    names = {path.name for path in WORKFLOWS}
    assert names == {"pull-request.yml", "deploy.yml", "pulumi-up.yml", "render-comment.yml"}
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
        lines += [
            (path.name, line.strip())
            for line in path.read_text().splitlines()
            if line.strip().removeprefix("- ").startswith("uses:")
        ]
    return lines


def test_every_action_is_pinned_to_a_full_commit_sha_with_its_release_tag():
    remote = [(name, line) for name, line in every_uses_line() if SELF not in line]
    assert all("./" not in line for _, line in every_uses_line()), "local references use GitHub's $/ form"
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
    steps = job_steps(job)
    uses_wif = bool(steps_using(job, AUTH))
    comments = any("gh pr comment" in step.get("run", "") for step in steps)
    reads_code = any(action_name(step.get("uses", "")) == "actions/checkout" for step in steps)
    reads_other_runs = any("run-id" in step.get("with", {}) for step in steps_using(job, DOWNLOAD)) or any(
        "gh run list" in step.get("run", "") for step in steps
    )
    assert (permissions.get("id-token") == "write") == uses_wif, "id-token: write exactly where WIF is used"
    assert (permissions.get("pull-requests") == "write") == comments, "pull-requests: write exactly where commenting"
    others = {scope: level for scope, level in permissions.items() if scope not in ("id-token", "pull-requests")}
    expected = {**({"contents": "read"} if reads_code else {}), **({"actions": "read"} if reads_other_runs else {})}
    assert others == expected


def test_google_cloud_credentials_come_only_from_workload_identity_federation():
    auth_steps = [step for _, _, job in all_jobs() for step in steps_using(job, AUTH)]
    assert auth_steps
    for step in auth_steps:
        assert set(step["with"]) == {"workload_identity_provider", "service_account"}
    for path in GITHUB.rglob("*"):
        if path.is_file():
            assert "credentials_json" not in path.read_text(), f"{path} mentions a key file"


def pulumi_commands(job: dict) -> list[str]:
    """Each `pulumi preview|up` the job runs: through pulumi/actions' command, or a run step."""
    given = [step["with"] for step in steps_using(job, PULUMI) if "command" in step.get("with", {})]
    commands = [f"pulumi {w['command']} --stack {w['stack-name']} --policy-pack {w.get('policyPacks')}" for w in given]
    return commands + [
        line.strip()
        for step in job_steps(job)
        for line in step.get("run", "").splitlines()
        if re.match(r"\s*pulumi (preview|up)\b", line)
    ]


@pytest.mark.parametrize(
    ("file", "name", "job"),
    [j for j in all_jobs() if steps_using(j[2], PULUMI)],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_every_pulumi_job_authenticates_installs_the_gke_auth_plugin_and_applies_the_policy_pack(file, name, job):
    steps = job_steps(job)
    names = [action_name(step.get("uses", "")) for step in steps]
    assert names.index(AUTH) < names.index(GCLOUD) < names.index(PULUMI)
    [gcloud] = steps_using(job, GCLOUD)
    assert "gke-gcloud-auth-plugin" in gcloud["with"]["install_components"].split(",")
    assert any(step.get("run", "").strip() == "./setup.sh --deploy" for step in steps)
    for step in steps_using(job, PULUMI):
        assert step["with"]["pulumi-version"] == pulumi_pin(), "the CLI matches the pulumi SDK in requirements.txt"
    [command] = pulumi_commands(job)
    assert "--policy-pack policy" in command


def test_every_stack_name_is_qualified_by_the_pulumi_organisation_variable():
    """A token whose default organisation differs would otherwise find no stack."""
    jobs = [job for _, _, job in all_jobs()]
    stacks = [
        step["with"]["stack-name"] for job in jobs for step in steps_using(job, PULUMI) if "stack-name" in step["with"]
    ]
    stacks += [job["env"]["STACK"] for job in jobs if any("pulumi preview" in c for c in pulumi_commands(job))]
    organisation = "${{ vars.PULUMI_ORG }}/jetstream-tpu/"
    assert set(stacks) == {f"{organisation}${{{{ inputs.stack }}}}", f"{organisation}${{{{ matrix.stack }}}}"}


# --- which job, on which trigger, can obtain which credential ------------------------------------


def callers(workflow_file: str) -> list[tuple[str, str]]:
    """(workflow, job) pairs that call the reusable workflow `workflow_file`."""
    called = f"{SELF}.github/workflows/{workflow_file}"
    return [(file, name) for file, name, job in all_jobs() if job.get("uses") == called]


def reach(file: str, name: str, job: dict) -> dict:
    """What a job can obtain: its triggers (a called workflow's are its callers'), its GitHub
    environment, the secrets and variables it names, and the Google identity it impersonates."""
    runs_in = [(file, name, job)]
    if job.get("uses"):  # a call: the called workflow's jobs run with the caller's triggers
        called = job["uses"].removeprefix(SELF).rsplit("/", 1)[1]
        runs_in = [(called, called_name, called_job) for called_name, called_job in workflow(called)["jobs"].items()]
    text = json.dumps([called_job for _, _, called_job in runs_in]) + json.dumps(job_steps(job))
    [environment] = {called_job.get("environment") for _, _, called_job in runs_in}
    # The Google identity is what the job hands the auth action, directly or through the local set-up action.
    steps = [step for _, _, called_job in runs_in for step in called_job.get("steps", [])]
    local_action = f"{SELF}.github/actions/"
    identities = {
        step["with"]["service_account"]
        for step in steps
        if action_name(step.get("uses", "")) == AUTH or step.get("uses", "").startswith(local_action)
    }
    return {
        "triggers": set(triggers(workflow(file))),
        "environment": environment,
        "secrets": set(SECRET.findall(text)),
        "variables": set(VARIABLE.findall(text)),
        "identities": identities,
    }


REACH = {(file, name): reach(file, name, job) for file, name, job in all_jobs()}


def test_credentials_are_environment_secrets_never_repository_wide():
    """Every job that names a secret runs in a GitHub environment, so the set-up creates no
    repository secret a pull request's code could read from a job of its own."""
    for (file, name), can in REACH.items():
        if can["secrets"]:
            assert can["environment"], f"{file}:{name} reads {can['secrets']} outside an environment"
        assert "secrets" not in workflow(file)["jobs"][name], "environment secrets reach the called job directly"


def test_pull_request_code_never_obtains_credentials_that_can_change_a_stack():
    """Jobs on pull_request run the pull request's code: only the preview environment, whose token
    and Google identity (GCP_PREVIEW_SERVICE_ACCOUNT) can read and preview, never change."""
    on_pull_requests = {key: can for key, can in REACH.items() if "pull_request" in can["triggers"]}
    assert {name for _, name in on_pull_requests} == {"offline", "affected", "preview"}
    for can in on_pull_requests.values():
        assert can["environment"] in (None, PREVIEW_ENVIRONMENT)
        assert can["identities"] <= {"${{ vars.GCP_PREVIEW_SERVICE_ACCOUNT }}"}
        assert "GCP_DEPLOY_SERVICE_ACCOUNT" not in can["variables"]
    offline = REACH[("pull-request.yml", "offline")]
    assert offline["secrets"] == set() == offline["identities"]
    assert REACH[("pull-request.yml", "preview")]["environment"] == PREVIEW_ENVIRONMENT


def test_deployment_environments_and_the_deploy_identity_are_reached_only_from_a_push_to_main():
    called_by = callers("pulumi-up.yml")
    assert {file for file, _ in called_by} == {"deploy.yml"}
    assert triggers(workflow("deploy.yml")) == {"push": {"branches": ["main"]}}
    assert set(triggers(workflow("pulumi-up.yml"))) == {"workflow_call"}
    for (file, name), can in REACH.items():
        deploys = "${{ vars.GCP_DEPLOY_SERVICE_ACCOUNT }}" in can["identities"]
        assert deploys == (can["environment"] == "${{ inputs.stack }}"), f"{file}:{name}"
        if deploys:
            assert can["triggers"] <= {"push", "workflow_call"}
            assert (file, name) in {*called_by, ("pulumi-up.yml", "up")}


def test_the_render_comment_workflow_holds_no_credential_and_runs_no_pull_request_code():
    comment = workflow("render-comment.yml")
    assert triggers(comment) == {"workflow_run": {"workflows": ["pull request"], "types": ["completed"]}}
    [(name, job)] = comment["jobs"].items()
    can = REACH[("render-comment.yml", name)]
    assert can["secrets"] == set() and can["identities"] == set() and can["environment"] is None
    assert job["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert not any(action_name(step.get("uses", "")) == "actions/checkout" for step in job["steps"])
    [download] = steps_using(job, DOWNLOAD)
    assert download["with"]["name"] == "rendered-manifests"
    assert download["with"]["run-id"] == "${{ github.event.workflow_run.id }}"
    script = job["steps"][-1]["run"]
    assert '[[ "$number" =~ ^[0-9]+$ ]]' in script and '"$head" != "$HEAD_SHA"' in script


def test_the_set_up_commands_admit_main_only_to_the_deployment_environments():
    """docs/stack/pr-review.md's commands: a branch policy of main on platform, dev and prod; the
    preview environment has none (pull requests run from refs/pull/...); secrets only per environment."""
    doc = (ROOT / "docs" / "stack" / "pr-review.md").read_text()
    loop = re.search(r"^for ENV in ([\w ]+); do[^\n]*\n(.*?)^done$", doc, re.MULTILINE | re.DOTALL)
    assert tuple(loop.group(1).split()) == DEPLOYMENT_ENVIRONMENTS
    body = loop.group(2)
    assert re.search(r"gh api -X PUT repos/\$REPO/environments/\$ENV .*\"custom_branch_policies\": true", body)
    assert "gh api -X POST repos/$REPO/environments/$ENV/deployment-branch-policies -f name=main -f type=branch" in body
    assert f"gh api -X PUT repos/$REPO/environments/{PREVIEW_ENVIRONMENT} >/dev/null" in doc
    assert f"environments/{PREVIEW_ENVIRONMENT}/deployment-branch-policies" not in doc
    secret_lines = [line for line in doc.splitlines() if line.strip().startswith("gh secret set")]
    assert secret_lines and all(" --env " in line for line in secret_lines)


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
    # render-comment.yml learns the pull request from the artifact (a fork's workflow_run names none).
    assert any('> "$RUNNER_TEMP/render/pull-request-number"' in run for run in runs)


def test_the_preview_job_previews_each_affected_stack_and_posts_its_output_whatever_the_outcome():
    jobs = workflow("pull-request.yml")["jobs"]
    assert jobs["affected"]["if"] == FORK_GUARD, "forks get no OIDC token or secrets: no cloud preview"
    assert "affected_stacks.py --base" in jobs["affected"]["steps"][-1]["run"]
    preview = jobs["preview"]
    assert preview["needs"] == "affected"
    assert preview["if"].startswith("${{ !cancelled() && needs.affected.result == 'success'")
    assert preview["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.affected.outputs.stacks) }}"
    [install] = steps_using(preview, PULUMI)
    assert "command" not in install["with"], "pulumi/actions throws before it comments: it only installs the CLI"
    steps = {step.get("id") or step.get("name"): step for step in preview["steps"]}
    run = steps["preview"]["run"]
    assert run.startswith("set +e\n") and 'pulumi preview --stack "$STACK" --diff --policy-pack policy' in run
    assert 'echo "exit-code=$?" >> "$GITHUB_OUTPUT"' in run
    post = steps["Post the preview and its policy violations on the pull request, whatever the outcome"]
    fail = steps["Fail when the preview failed"]
    assert post["if"] == "${{ !cancelled() && steps.preview.outputs.exit-code != '' }}"
    assert "preview_comment.py" in post["run"] and "gh pr comment" in post["run"]
    assert fail["if"] == "${{ !cancelled() && steps.preview.outputs.exit-code != '0' }}"
    assert fail["run"].rstrip().endswith("exit 1")
    names = list(steps)
    assert names.index("preview") < names.index(post["name"]) < names.index(fail["name"])


# --- the apply on main -------------------------------------------------------------------------------


def test_a_push_to_main_applies_the_affected_stacks_platform_then_dev_then_prod():
    deploy = workflow("deploy.yml")
    assert triggers(deploy) == {"push": {"branches": ["main"]}}
    # Compared with the last successful deploy: a failed or replaced run leaves its changes to the next.
    affected = deploy["jobs"]["affected"]["steps"][-1]["run"]
    assert 'gh run list --repo "$GITHUB_REPOSITORY" --workflow deploy.yml --branch main --status success' in affected
    assert 'affected_stacks.py --since "$last"' in affected
    assert deploy["concurrency"] == {"group": "deploy-main", "cancel-in-progress": False}
    environments = load_script("affected_stacks").ENVIRONMENTS
    assert environments == DEPLOYMENT_ENVIRONMENTS
    for index, stack in enumerate(environments):
        job = deploy["jobs"][stack]
        assert job["uses"] == f"{SELF}.github/workflows/pulumi-up.yml" and job["with"] == {"stack": stack}
        assert "secrets" not in job, "no secrets: inherit, and none passed: the environment holds them"
        earlier = environments[:index]
        needs = [job["needs"]] if isinstance(job["needs"], str) else job["needs"]
        assert needs == ["affected", *earlier]
        # A skipped earlier stack (not affected) must not skip this one; a failed one must.
        assert job["if"] == (
            "${{ !cancelled() && needs.affected.result == 'success' && "
            + "".join(f"needs.{before}.result != 'failure' && " for before in earlier)
            + f"contains(fromJSON(needs.affected.outputs.stacks), '{stack}') }}}}"
        )


def test_each_apply_runs_in_its_github_environment_and_its_own_concurrency_group():
    called = workflow("pulumi-up.yml")
    assert triggers(called) == {
        "workflow_call": {
            "inputs": {
                "stack": {
                    "description": "The environment stack to update (platform, dev, prod)",
                    "type": "string",
                    "required": True,
                }
            }
        }
    }
    [job] = called["jobs"].values()
    assert job["environment"] == "${{ inputs.stack }}"
    assert job["concurrency"] == {"group": "pulumi-up-${{ inputs.stack }}", "cancel-in-progress": False}
    [step] = steps_using(job, PULUMI)
    assert step["with"]["command"] == "up" and step["with"]["policyPacks"] == "policy"


def test_ci_runs_the_first_run_commands_set_up_then_the_readme_test_command():
    commands = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["./setup.sh", "python3 -m pytest -q"]


# --- the scripts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (["Pulumi.dev.yaml"], ["dev"]),
        (["Pulumi.prod.yaml", "Pulumi.platform.yaml"], ["platform", "prod"]),
        (["components/core/planner.py"], ["platform", "dev", "prod"]),
        (["requirements.txt"], ["platform", "dev", "prod"]),
        (["policy/rules.py"], ["platform", "dev", "prod"]),
        (["serving/Dockerfile"], ["platform", "dev", "prod"]),
        (["README.md", "tests/stack/test_stack_program.py", "benchmarks/serve_bench.py"], []),
        (["Pulumi.llama3-8b-v6e8.yaml"], []),
        (["Pulumi.yaml.orig", "components-old/x.py"], []),
    ],
)
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


def git(tree: pathlib.Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_main_applies_what_changed_since_its_last_successful_deploy(tmp_path):
    script = load_script("affected_stacks")
    git(tmp_path, "init", "-q")
    (tmp_path / "README.md").write_text("a\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "deployed")
    deployed = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "Pulumi.dev.yaml").write_text("config: {}\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "a dev change whose run was replaced")
    (tmp_path / "README.md").write_text("b\n")
    git(tmp_path, "commit", "-qam", "a docs change")
    present = ["platform", "dev", "prod"]
    assert script.stacks_since(deployed, present, tmp_path) == ["dev"]  # the replaced run's change too
    assert script.stacks_since(git(tmp_path, "rev-parse", "HEAD"), present, tmp_path) == []
    # No successful deploy yet, or one a force push removed from the history: every environment.
    assert script.stacks_since("", present, tmp_path) == present
    assert script.stacks_since("1" * 40, present, tmp_path) == present


@pytest.mark.parametrize(
    ("exit_code", "output", "outcome"),
    [
        (0, "Previewing update (org/jetstream-tpu/dev)\n  ~ 1 to update\n", "passed"),
        (
            255,
            "Policy Violations:\n    [mandatory]  jetstream-tpu-guardrails  container-images-pinned\n",
            "failed: policy violations (exit code 255)",
        ),
        (255, "error: could not read plugin\n", "failed (exit code 255)"),
    ],
)
def test_the_preview_comment_says_the_outcome_and_shows_the_output(exit_code, output, outcome):
    body = load_script("preview_comment").comment("org/jetstream-tpu/dev", exit_code, output)
    assert body.startswith(f"### `pulumi preview` of `org/jetstream-tpu/dev`: {outcome}\n")
    assert output.strip() in body


def test_a_long_preview_keeps_its_end_within_a_comment():
    script = load_script("preview_comment")
    output = "".join(f"line {index}\n" for index in range(20000)) + "error: the last line\n"
    body = script.comment("s", 1, output)
    assert len(body) <= script.COMMENT_LIMIT and "error: the last line" in body and "line 0\n" not in body
    assert "(output cut: the beginning is in the job log)" in body
