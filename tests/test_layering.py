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


@pytest.mark.parametrize("patterns,forbidden,allowed", RULES, ids=lambda v: v[0] if isinstance(v, list) else "")
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
