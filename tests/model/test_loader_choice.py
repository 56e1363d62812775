"""Which loader a model_name / load_parameters_path pair picks: only the exact tiny preset names
mean random weights; any other model_name is informational (the bundled GGUF is loaded)."""

from __future__ import annotations

import pytest

from serving.engine.loaders import LOADERS
from serving.server.settings import ServingSettings


def loader_for(**settings) -> str:
    return next(loader.name for loader in LOADERS if loader.matches(ServingSettings(**settings).engine_settings()))


@pytest.mark.parametrize(
    "settings,loader",
    [
        ({"model_name": "tiny"}, "random"),
        ({"model_name": "tiny-untied"}, "random"),
        ({"model_name": "tinyllama-2"}, "gguf"),  # once a KeyError at start: it looked like a preset
        ({"model_name": "tiny-llama"}, "gguf"),
        ({"model_name": "smollm2-135m"}, "gguf"),
        ({"model_name": "tiny", "load_parameters_path": "/weights/tiny.npz"}, "npz"),
    ],
)
def test_only_exact_tiny_names_mean_random_weights(settings, loader):
    assert loader_for(**settings) == loader
