"""The `kiln` command: every subcommand has --help, and every option is documented."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kiln.cli.main import build_parser, main

REQUIRED = ["demo", "tokenizer", "tokenize", "train", "eval", "generate", "bench", "data"]


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
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["tokenize", "--corpus", str(tmp_path / "missing"), "--tokenizer", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "error" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
