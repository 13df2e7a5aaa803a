"""StageRun: atomic artifact directories, manifest last, reuse when config and inputs match."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from kiln.artifacts import ArtifactError, StageRun, config_to_dict, input_hash, read_manifest


@dataclass(frozen=True)
class Cfg:
    n: int = 1
    name: str = "x"


def _run(out, cfg, inputs, calls, **kw):
    with StageRun(out, "toy", cfg, inputs=inputs, **kw) as run:
        if not run.reused:
            calls.append(1)
            (run.tmp / "data.txt").write_text(f"n={cfg.n}")
            run.stats["n"] = cfg.n
    return run


def test_writes_manifest_last_and_reuses(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    out = tmp_path / "art"
    calls: list[int] = []
    run = _run(out, Cfg(), [src], calls)
    m = read_manifest(out, stage="toy")
    assert m["config"] == {"n": 1, "name": "x"}
    assert m["inputs"] == {str(src): input_hash(src)}
    assert m["stats"] == {"n": 1}
    assert "kiln" in m["code"] and run.manifest == m
    assert (out / "data.txt").read_text() == "n=1"
    assert not list(tmp_path.glob(".art.tmp-*"))

    _run(out, Cfg(), [src], calls)
    assert calls == [1], "unchanged config and inputs must be reused"
    _run(out, Cfg(n=2), [src], calls)
    assert calls == [1, 1] and (out / "data.txt").read_text() == "n=2"
    src.write_text("changed")
    _run(out, Cfg(n=2), [src], calls)
    assert calls == [1, 1, 1], "a changed input must recompute"
    _run(out, Cfg(n=2), [src], calls, force=True)
    assert calls == [1, 1, 1, 1]


def test_failure_leaves_no_artifact(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="boom"):
        with StageRun(out, "toy", Cfg()) as run:
            (run.tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_artifact(tmp_path):
    out = tmp_path / "art"
    _run(out, Cfg(), [], [])
    with pytest.raises(RuntimeError):
        with StageRun(out, "toy", Cfg(n=5)) as run:
            raise RuntimeError("killed")
    assert read_manifest(out)["config"]["n"] == 1


def test_incomplete_and_foreign_artifacts_are_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="incomplete"):
        read_manifest(tmp_path / "half")
    _run(tmp_path / "art", Cfg(), [], [])
    with pytest.raises(ArtifactError, match="'tokenizer' artifact was expected"):
        read_manifest(tmp_path / "art", stage="tokenizer")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "bad")


def test_artifact_dir_input_hashes_by_manifest(tmp_path):
    _run(tmp_path / "a", Cfg(), [], [])
    h1 = input_hash(tmp_path / "a")
    assert h1.startswith("manifest:")
    _run(tmp_path / "a", Cfg(n=3), [], [])
    assert input_hash(tmp_path / "a") != h1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        input_hash(tmp_path / "missing")


def test_config_to_dict_nested():
    @dataclass(frozen=True)
    class Outer:
        inner: Cfg = Cfg()
        xs: tuple = (1, 2)

    assert config_to_dict(Outer()) == {"inner": {"n": 1, "name": "x"}, "xs": [1, 2]}
    json.dumps(config_to_dict(Outer()))
