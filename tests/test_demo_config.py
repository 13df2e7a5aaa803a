"""DemoConfig: bad values are clear errors; the report flattens nested statistics."""

from __future__ import annotations

import pytest

from kiln.demo import DemoConfig, _flatten, config_from_dict


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 200}, "smaller than 256 bytes"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 0.6}, "val_fraction"),
        ({"max_steps": 0}, "max_steps"),
        ({"eval_tokens": 0}, "eval_tokens"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"unknown demo option\(s\) \['vocab'\]"):
        config_from_dict({"vocab": 10})
    assert config_from_dict({"vocab_size": 512}).vocab_size == 512


def test_flatten_stats():
    stats = {"train": {"tokens": 5, "inner": {"x": 1}}, "errors": {}, "n": 3}
    assert _flatten(stats) == {"train.tokens": 5, "train.inner.x": 1, "errors": "none", "n": 3}
