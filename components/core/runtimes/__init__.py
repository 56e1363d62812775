"""The server runtimes, by their `serverRuntime` value (see `base.ServerRuntime` for the seam)."""

from __future__ import annotations

from components.core.runtimes.base import ServerRuntime
from components.core.runtimes.bundled import BundledRuntime
from components.core.runtimes.pathways import PathwaysRuntime
from components.core.runtimes.vllm import VllmRuntime

RUNTIMES: dict[str, ServerRuntime] = {
    runtime.name: runtime for runtime in (PathwaysRuntime(), BundledRuntime(), VllmRuntime())
}
