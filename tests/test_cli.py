"""The `kiln` command: every subcommand has --help, and every option is documented."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kiln.cli.main import build_parser, main

REQUIRED = ["demo", "tokenizer", "tokenize", "train", "eval", "generate", "export", "bench", "data"]


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _walk(parser, prefix=()):
    yield prefix, parser
    for name, sub in _subparsers(parser):
        yield from _walk(sub, prefix + (name,))


def test_required_subcommands_exist():
    names = dict(_subparsers(build_parser()))
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"missing subcommands: {missing}"


def test_every_option_is_documented():
    undocumented = []
    for prefix, parser in _walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                undocumented.append(" ".join(prefix) + " " + "/".join(action.option_strings or [action.dest]))
    assert not undocumented, f"options without help text: {undocumented}"


@pytest.mark.parametrize("cmd", [[], ["demo"], ["train"], ["generate"], ["tokenize"]])
def test_help_runs(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: kiln" in capsys.readouterr().out


def test_console_script_installed():
    """The `kiln` script that `pip install` put beside this Python runs (and is Kiln's CLI)."""
    import shutil
    from pathlib import Path

    script = Path(sys.executable).with_name("kiln")
    script = str(script) if script.is_file() else shutil.which("kiln")
    assert script, "no `kiln` script beside this Python or on PATH; install Kiln with `pip install -e .`"
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: kiln" in r.stdout and "export" in r.stdout, r.stderr


def test_python_dash_m_kiln_is_the_kiln_command(tmp_path, capsys, monkeypatch):
    """`python -m kiln` (runpy runs kiln/__main__.py as __main__, as the interpreter does) parses and
    runs like `kiln`: a subcommand, its one-line error, its exit status."""
    import runpy

    monkeypatch.delenv("KILN_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["kiln", "generate", "--model", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("kiln", run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("kiln generate: error:") and len(err.splitlines()) == 1, err


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["tokenize", "--corpus", str(tmp_path / "missing"), "--tokenizer", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "error" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _shard_with_bad_id(tmp_path):
    """A tokens folder whose train shard holds id 32877 at position 7 (a flipped bit) under vocab 512."""
    import numpy as np

    from kiln.shards import write_shard
    from kiln.shards.format import HEADER_BYTES

    d = tmp_path / "tokens"
    d.mkdir()
    p = write_shard(d / "train_00000.bin", np.arange(3000) % 512, [0], vocab_size=512)  # one tiny batch
    with open(p, "r+b") as f:
        f.seek(HEADER_BYTES + 7 * 2)
        f.write((32877).to_bytes(2, "little"))
    return d


def test_shard_id_outside_vocab_is_one_line_error(tmp_path, capsys, monkeypatch):
    from kiln.artifacts import KilnError

    tokens = _shard_with_bad_id(tmp_path)
    argv = ["train", "--tokens", str(tokens), "--out", str(tmp_path / "run"), "--max-steps", "1"]
    monkeypatch.delenv("KILN_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train_00000.bin: token id 32877 at position 7" in err and "vocabulary of 512" in err
    assert "re-run `kiln tokenize`" in err and "Traceback" not in err
    with pytest.raises(KilnError, match="32877 at position 7"):
        main(argv + ["--debug"])
    monkeypatch.setenv("KILN_DEBUG", "1")
    with pytest.raises(KilnError):
        main(argv)


def test_bad_config_json_is_one_line_error(tmp_path, capsys, monkeypatch):
    from kiln.tokenizer import Tokenizer

    monkeypatch.delenv("KILN_DEBUG", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(model / "tokenizer.json")
    assert main(["generate", "--model", str(model), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln generate: error:"), err
    assert "config.json is not valid JSON" in err


def test_recipe_cpu_preset_keeps_its_stage_settings_and_the_users_win():
    """`kiln recipe chat --preset cpu --set ...`: the preset's stage overrides stay, the user's come
    after them (so they win), and recipe fields are set directly."""
    from kiln.align.grpo import GRPOConfig
    from kiln.align.recipe import _with, recipe_config

    args = build_parser().parse_args(["recipe", "chat", "--preset", "cpu", "--base", "B", "--set",
                                      "grpo.train.lr=1e-4", "sft_steps=7"])
    cfg = recipe_config(args.preset, args.overrides, base=args.base, out=args.out, shared=args.shared)
    assert cfg.base == "B" and cfg.sft_steps == 7 and cfg.digits == 1
    assert "sft.train.lr=2e-3" in cfg.overrides and cfg.overrides[-1] == "grpo.train.lr=1e-4"
    grpo = _with(GRPOConfig(), "grpo", cfg.overrides)
    assert grpo.train.lr == 1e-4 and grpo.temperature == 0.7
