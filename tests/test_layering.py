"""The seams of the codebase hold: each layer imports only the layers below it.

Read from the source (every import statement, including those inside functions), so a shortcut
across a seam fails here rather than in review:

  serving/engine_api.py            the contract; imports no engine, no server, no JAX
  serving/engine/**                the model, its math and its engine; never the server
  serving/engine/{model,quant,sampling,config,parallelism}.py   pure math: no engine or loader
  serving/engine/settings.py       the engine's own settings type: imports no JAX and nothing of the project
  serving/server/{orchestrator,requests,http_api,grpc_api,metrics,settings}.py
                                   talk to engines only through engine_api: no JAX, no serving.engine
                                   (the server's settings map themselves onto serving.engine.settings)
  components/core/**               the pure planning core: no Pulumi, no components.resources
  components/core, by layer        declarations (naming, hpa, lws_model, config_keys, gateway) import nothing
                                   above them; the key table (config_table) nothing that parses, plans or
                                   builds manifests; the config parts (config_values, config_runtime,
                                   config_roles, config_scaling, config_gateway) neither StackConfig nor
                                   planning nor manifests, and one another only downwards (values <- runtime,
                                   roles); planning and manifests read the parsed StackConfig, never a
                                   parsing helper; the gateway's objects (gateway_manifests) are built from
                                   its declarations only; and the core's module-level imports have no cycle
  serving/protocol.py              what both halves share (ports, names): imports nothing of the project
  components/**                    from serving, only serving.protocol and the pure serving.engine.parallelism
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from serving.engine.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names (absolute imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(pattern: str) -> list[Path]:
    found = sorted(ROOT.glob(pattern))
    assert found, f"no files match {pattern}"
    return found


def crosses(module: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> bool:
    def within(prefixes: tuple[str, ...]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    return within(forbidden) and not within(allowed)


PURE_MATH = ("model", "quant", "sampling", "config", "parallelism")
ENGINE_AGNOSTIC_SERVER = ("orchestrator", "requests", "http_api", "grpc_api", "metrics", "settings")
ENGINE_SETTINGS = "serving.engine.settings"
# (files, modules they may not import, exceptions among those)
RULES = [
    (["serving/engine_api.py"], ("serving.engine", "serving.server", "jax"), ()),
    (["serving/engine/**/*.py"], ("serving.server",), ()),
    (
        [f"serving/engine/{m}.py" for m in PURE_MATH],
        ("serving.engine.jax_engine", "serving.engine.loaders", "serving.engine.sharding"),
        (),
    ),
    (["serving/engine/settings.py"], ("jax", "numpy", "serving", "components"), ()),
    ([f"serving/server/{m}.py" for m in ENGINE_AGNOSTIC_SERVER], ("jax", "serving.engine"), (ENGINE_SETTINGS,)),
    (["components/core/**/*.py"], ("pulumi", "pulumi_gcp", "pulumi_kubernetes", "components.resources"), ()),
    (["serving/protocol.py"], ("serving", "components", "jax"), ()),
]
SERVING_FOR_THE_STACK = ("serving.protocol", "serving.engine.parallelism")


def core(*names: str) -> tuple[str, ...]:
    return tuple(f"components.core.{name}" for name in names)


def core_files(*names: str) -> list[str]:
    return [f"components/core/{name}.py" for name in names]


PLANNING = core("planner", "node_pools", "scheduling", "admission")
MANIFESTS = core("manifests", "gateway_manifests", "lws_model", "kube_model")
CONFIG_PARSING = core(
    "config_values", "config_runtime", "config_roles", "config_scaling", "config_gateway", "config_keys"
)
# The seams inside the core: (files, modules they may not import, exceptions among those).
CORE_RULES = [
    (core_files("naming", "hpa", "lws_model", "errors", "gateway"), ("components", "serving"), ()),
    (core_files("config_keys"), ("components",), core("errors")),
    (core_files("kube_model"), ("components",), core("lws_model")),
    (core_files("autoscaling"), ("components",), core("hpa")),
    (
        core_files("config_table"),
        (*PLANNING, *MANIFESTS, *CONFIG_PARSING, *core("config")),
        core("config_keys", "config_scaling", "config_gateway"),
    ),
    (
        core_files("config_values"),
        (*PLANNING, *MANIFESTS, *CONFIG_PARSING, *core("config", "runtimes")),
        core("config_keys"),
    ),
    (
        core_files("config_runtime", "config_roles"),
        (*PLANNING, *MANIFESTS, *core("config", "config_runtime", "config_roles")),
        (),
    ),
    (core_files("config_roles"), core("runtimes"), ()),
    (
        core_files("config_scaling", "config_gateway"),
        (*PLANNING, *MANIFESTS, *core("config", "config_table", "config_values", "config_scaling", "config_gateway")),
        (),
    ),
    (core_files("gateway_manifests"), ("components", "serving"), core("gateway")),
    (core_files("planner", "node_pools", "scheduling", "manifests", "admission"), CONFIG_PARSING, ()),
]


@pytest.mark.parametrize(
    "patterns,forbidden,allowed", RULES + CORE_RULES, ids=lambda v: v[0] if isinstance(v, list) else ""
)
def test_no_import_crosses_a_seam(patterns, forbidden, allowed):
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for pattern in patterns
        for path in files(pattern)
        for module in sorted(imported_modules(path))
        if crosses(module, forbidden, allowed)
    ]
    assert not offences, "\n".join(offences)


def test_the_engine_owns_its_settings_type():
    """The engine reads its own frozen EngineSettings, never the server's ServingSettings (not even by
    name in a comment), and every engine function taking `settings` is annotated with it."""
    assert EngineSettings.__module__ == ENGINE_SETTINGS and dataclasses.fields(EngineSettings)
    assert EngineSettings.__dataclass_params__.frozen
    engine_files = files("serving/engine/**/*.py")
    naming_the_server_type = [str(p.relative_to(ROOT)) for p in engine_files if "ServingSettings" in p.read_text()]
    assert not naming_the_server_type, naming_the_server_type
    untyped = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: settings is not annotated EngineSettings"
        for path in engine_files
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if arg.arg == "settings" and (arg.annotation is None or ast.unparse(arg.annotation) != "EngineSettings")
    ]
    assert not untyped, "\n".join(untyped)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from serving.server.settings import parse_settings\n    import jax.numpy\n")
    assert {"serving.server.settings", "jax.numpy"} <= imported_modules(source)
    assert crosses("jax.numpy", ("jax",)) and not crosses("jaxlib_x", ("jax",))
    assert not crosses(ENGINE_SETTINGS, ("serving.engine",), (ENGINE_SETTINGS,))
    assert crosses("serving.engine.jax_engine", ("serving.engine",), (ENGINE_SETTINGS,))


def test_the_stack_imports_only_the_shared_and_pure_parts_of_the_server():
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files("components/**/*.py")
        for module in sorted(imported_modules(path))
        if module != "serving" and crosses(module, ("serving",)) and not crosses(module, SERVING_FOR_THE_STACK)
    ]
    assert not offences, "\n".join(offences)


RUNTIME_BRANCH = re.compile(r"\.bundled\b|\bruntime\.name\s*[!=]=|[!=]=\s*\"(jetstream|bundled|vllm)\"")


def test_no_shared_module_branches_on_the_server_runtime():
    """The runtime is chosen once (components/core/runtimes/); everything else asks it."""
    offences = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files("components/**/*.py")
        if "runtimes" not in path.relative_to(ROOT).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if RUNTIME_BRANCH.search(line)
    ]
    assert not offences, "\n".join(offences)
    assert RUNTIME_BRANCH.search('if cfg.runtime.name == "vllm":') and RUNTIME_BRANCH.search("cfg.bundled")


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """Which of `modules` a file imports when it is imported: not inside functions, not under
    TYPE_CHECKING. `from package import submodule` imports the submodule, not the package (Python
    resolves it even while the package itself is still being imported)."""

    def imported(node: ast.ImportFrom) -> set[str]:
        submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
        return submodules or {node.module}

    def walk(statements) -> set[str]:
        names: set[str] = set()
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= imported(node)
            elif isinstance(node, ast.If) and ast.unparse(node.test) != "TYPE_CHECKING":
                names |= walk(node.body) | walk(node.orelse)
        return names

    return walk(ast.parse(path.read_text(), str(path)).body) & modules


def core_import_graph() -> dict[str, set[str]]:
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in files("components/core/**/*.py")
    }
    return {module: module_level_imports(path, set(modules)) - {module} for module, path in modules.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (its modules in order), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            found = visit(imported, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    return next((found for module in sorted(graph) if (found := visit(module, []))), None)


def test_the_core_imports_have_no_cycle():
    assert cycle_in(core_import_graph()) is None, " -> ".join(cycle_in(core_import_graph()))
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None
