"""JetStream's gRPC messages and stubs, generated from jetstream.proto with grpcio-tools on first use.

The generated modules are not checked in: `load()` writes `jetstream_pb2.py` and
`jetstream_pb2_grpc.py` next to the .proto (or, if that directory is read-only, into a per-user
cache directory), regenerating them whenever the .proto is newer, and imports them. Generation
writes to a temporary directory and renames, so concurrent processes never see half a file.

  pb2, pb2_grpc = serving.server.proto.load()
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("jetstream.proto")
_MODULES = ("jetstream_pb2", "jetstream_pb2_grpc")


def _output_dir() -> Path:
    here = PROTO.parent
    if os.access(here, os.W_OK):
        return here
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "serving-proto"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _stale(out: Path) -> bool:
    proto_mtime = PROTO.stat().st_mtime
    return any(not (out / f"{m}.py").exists() or (out / f"{m}.py").stat().st_mtime < proto_mtime for m in _MODULES)


def _generate(out: Path) -> None:
    from grpc_tools import protoc  # imported lazily: only needed when the stubs are stale

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO.parent}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {PROTO} (exit {rc})")
        for module in _MODULES:
            os.replace(Path(tmp) / f"{module}.py", out / f"{module}.py")


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # jetstream_pb2_grpc does `import jetstream_pb2`
    spec.loader.exec_module(module)
    return module


@functools.cache
def load() -> tuple[ModuleType, ModuleType]:
    """(jetstream_pb2, jetstream_pb2_grpc), generating them first if missing or stale."""
    out = _output_dir()
    if _stale(out):
        _generate(out)
    pb2 = _import(out / "jetstream_pb2.py", "jetstream_pb2")
    pb2_grpc = _import(out / "jetstream_pb2_grpc.py", "jetstream_pb2_grpc")
    return pb2, pb2_grpc


def clean() -> None:
    """Remove generated stubs (used by tests to prove regeneration works)."""
    for module in _MODULES:
        (_output_dir() / f"{module}.py").unlink(missing_ok=True)
    shutil.rmtree(_output_dir() / "__pycache__", ignore_errors=True)
