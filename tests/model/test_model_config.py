"""ModelConfig validation: every invalid value gets one error that says how to fix it."""

from __future__ import annotations

import dataclasses

import pytest

from kiln.model import ModelConfig


def test_defaults_run_and_resolve():
    c = ModelConfig()
    assert c.n_kv_heads == c.n_heads
    assert c.d_ff % 64 == 0 and c.d_ff >= 8 * c.d_model // 3
    assert c.head_dim == c.d_model // c.n_heads
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"d_model": 100, "n_heads": 3}, r"n_heads=3 does not divide d_model=100; pick n_heads from \[1, 2, 4, 5"),
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_kv_heads=3 does not divide n_heads=4"),
        ({"d_model": 12, "n_heads": 4}, r"head dimension .* is odd"),
        ({"vocab_size": 0}, r"vocab_size=0 must be a positive integer"),
        ({"n_layers": 2.0}, r"n_layers=2.0 must be a positive integer"),
        ({"rope_theta": 0.0}, r"rope_theta"),
        ({"norm_eps": -1.0}, r"norm_eps"),
        ({"attention_impl": "flash"}, r"attention_impl='flash' is unknown; use one of \['kiln', 'sdpa', 'triton'"),
        ({"norm_impl": "fused"}, r"norm_impl='fused' is unknown"),
    ],
)
def test_invalid_configs_raise_with_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.from_dict({"d_model": 64, "hidden_size": 64})
