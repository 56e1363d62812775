"""AVX-512 matmul kernels for XLA:CPU (cpu_matmul.cc), compiled with the system's C++ compiler on first use.

`matmul(x, w)` is `x [M, K] . w [N, K]^T` for int8 (-> int32) or bfloat16 (-> float32), as an
XLA FFI custom call; quant.einsum routes a model's products here when the engine runs on one CPU
device (`ModelConfig.cpu_kernels`). `unavailable()` says why they cannot run here, or None.

The library is built like the gRPC stubs are generated (serving/server/proto): next to the source,
or in a per-user cache directory when that is read-only, under a name that hashes the source, the
compiler flags and the jaxlib version whose FFI headers it includes; the build writes a temporary
file and renames it, so concurrent processes never load half a library.

  python -m serving.engine.cpu_matmul     # build now (the image does, at build time)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
TARGETS = {
    jnp.dtype(jnp.int8): ("jst_matmul_s8", "JstMatmulS8", jnp.int32),
    jnp.dtype(jnp.bfloat16): ("jst_matmul_bf16", "JstMatmulBf16", jnp.float32),
}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jax.__version__.encode())
    name = f"_cpu_matmul-{key.hexdigest()[:16]}.so"
    here = SOURCE.parent
    if os.access(here, os.W_OK):
        return here / name
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "serving-cpu-kernels"
    cache.mkdir(parents=True, exist_ok=True)
    return cache / name


def build() -> Path:
    """The compiled library, compiling it first if this source, these flags and this jaxlib have
    none yet. Raises RuntimeError with the compiler's message when it cannot be built."""
    out = _library_path()
    if out.exists():
        return out
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp_out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp_out, out)
    return out


@functools.cache
def unavailable() -> str | None:
    """Why the kernels cannot run on this machine, or None once they are built, loaded and registered."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"they are x86-64 kernels and this machine is {platform.machine()}"
    try:
        library = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        return f"the library did not build or load: {e}"
    if not library.jst_cpu_kernels_supported():
        return "this CPU lacks AVX-512 VNNI or BF16 (avx512_vnni, avx512_bf16 in /proc/cpuinfo)"
    for name, symbol, _ in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def supports(x_dtype, w_dtype) -> bool:
    """Whether `matmul` takes operands of these dtypes (both int8, or both bfloat16)."""
    return jnp.dtype(x_dtype) == jnp.dtype(w_dtype) and jnp.dtype(x_dtype) in TARGETS


def matmul(x: jax.Array, w: jax.Array, rows: jax.Array | int | None = None) -> jax.Array:
    """x [M, K] . w [N, K]^T -> [M, N]: int8 -> int32 (exact), bfloat16 -> float32.

    `rows` (traced) says which rows matter; the others' results are zeros. A count: x's first
    `rows` rows, so a prompt padded to its bucket costs its own length. Counts [S]: x is S equal
    segments (prompts padded to one bucket) and segment s's first rows[s] rows matter; their rows
    are multiplied together, reading the weights once."""
    if (reason := unavailable()) is not None:
        raise RuntimeError(f"the CPU matmul kernels cannot run: {reason}")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or not supports(x.dtype, w.dtype):
        raise ValueError(
            f"matmul takes x [M, K] and w [N, K], both int8 or bfloat16; got {x.dtype}{list(x.shape)}, "
            f"{w.dtype}{list(w.shape)}"
        )
    name, _, out_dtype = TARGETS[jnp.dtype(x.dtype)]
    count = jnp.atleast_1d(jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32))
    if x.shape[0] % count.shape[0]:
        raise ValueError(f"{count.shape[0]} row counts do not split x's {x.shape[0]} rows into equal segments")
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), out_dtype))(x, w, count)


if __name__ == "__main__":  # builds even where this CPU cannot run the kernels (an image's build stage)
    try:
        path = build()
    except RuntimeError as e:
        sys.exit(f"cpu_matmul: {e}")
    reason = unavailable()
    print(f"{path}: " + ("ready" if reason is None else f"built; cannot run on this machine: {reason}"))
