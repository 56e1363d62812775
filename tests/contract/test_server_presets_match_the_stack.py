"""The bundled server's preset table (serving/engine/config.py) has the stack's presets
(components/core/models.py) by name, with the same shapes: the server refuses a checkpoint by
these shapes, and the stack plans memory with its own."""

from __future__ import annotations

from components.core import models
from serving.engine import config


def test_every_stack_preset_has_the_servers_shapes():
    assert set(config.STACK_PRESETS) == set(models.PRESETS)
    for name, stack in models.PRESETS.items():
        server = config.PRESETS[name]
        assert (
            server.n_layers,
            server.d_model,
            server.n_heads,
            server.n_kv_heads,
            server.head_dim,
            server.ffn_dim,
            server.vocab_size,
            server.tie_embeddings,
        ) == (
            stack.layers,
            stack.d_model,
            stack.heads,
            stack.kv_heads,
            stack.head_dim,
            stack.ffn_dim,
            stack.vocab,
            stack.tie_embeddings,
        ), name


def test_servable_presets_are_those_of_a_servable_architecture():
    assert set(config.SERVABLE_PRESETS) == set(config.STACK_PRESETS) - {"gemma-7b"}
