"""`python -m serving.convert`: the bundled GGUF to an int8 .npz that serves the same weights."""

from __future__ import annotations

import jax
import numpy as np

from serving import convert
from serving.engine.loaders import load_checkpoint
from serving.server.settings import ServingSettings


def test_int8_npz_holds_the_weights_quantize_on_load_makes(tmp_path, capsys):
    out = str(tmp_path / "smollm2-int8.npz")
    assert convert.main([out, "quantization=int8"]) == 0
    assert "int8 weights: True" in capsys.readouterr().out
    on_load = load_checkpoint(ServingSettings(quantization="int8").engine_settings())
    converted = load_checkpoint(
        ServingSettings(quantization="int8", checkpoint_is_quantized=True, load_parameters_path=out).engine_settings()
    )
    assert converted[0] == on_load[0]
    jax.tree.map(np.testing.assert_array_equal, converted[1], on_load[1])
    assert converted[2].encode("Hello, world!") == on_load[2].encode("Hello, world!")


def test_bad_arguments_are_named(tmp_path, capsys):
    assert convert.main([]) == 2
    assert "python -m serving.convert OUT.npz" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "x.npz"), "quantisation=int8"]) == 2
    assert "quantisation" in capsys.readouterr().err
