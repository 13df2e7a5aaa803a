"""Wheels for an offline x86-64 Python 3.12 machine (a GPU box with no network), at the versions
installed in this environment, with their dependencies.

    python scripts/offline_wheels.py trl datasets --skip-file on_target.txt -d .whl
    # there: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl

The closure follows each installed distribution's requirements (markers evaluated for the target:
Linux, CPython 3.12, no extras). ``--skip`` / ``--skip-file`` name distributions the target already
has (one per line, as ``pip list --format=freeze`` or bare names); they are neither fetched nor
walked, unless named as roots (to ship a newer version than the target's). Sets used for Kiln's GPU
benchmarks (docs/benchmarks.md), with the GPU image's package names as the skip file:

    align: trl datasets zstandard
    serve: fastapi uvicorn httptools openai, plus typer rich anyio idna typing-extensions (newer than
           the image's: `transformers serve`'s CLI and openai 3.x)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], skip: set[str]) -> dict[str, str]:
    """{distribution: installed version} for ``roots`` and what they require on the target."""
    from packaging.requirements import Requirement

    out: dict[str, str] = {}
    todo = [canon(r) for r in roots]
    root_set = set(todo)  # a root is fetched even if the target has it (to ship a newer version)
    while todo:
        name = todo.pop()
        if name in out or (name in skip and name not in root_set):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed here: install it (the version to ship) first, or --skip it")
        out[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(TARGET_ENV):
                todo.append(canon(req.name))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+")
    p.add_argument("-d", "--dest", default=".whl")
    p.add_argument("--skip", nargs="*", default=[], help="distributions the target has")
    p.add_argument("--skip-file", help="file of distributions the target has (freeze format or names)")
    p.add_argument("--dry-run", action="store_true", help="print the set, download nothing")
    a = p.parse_args(argv)
    skip = {canon(s) for s in a.skip}
    if a.skip_file:
        with open(a.skip_file) as f:
            skip |= {canon(re.split(r"[=<>!~ ;\[]", ln.strip(), maxsplit=1)[0]) for ln in f if ln.strip()}
    want = closure(a.roots, skip)
    print(" ".join(f"{n}=={v}" for n, v in sorted(want.items())))
    if a.dry_run:
        return 0
    flags = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", a.dest]
    for plat in PLATFORMS:
        flags += ["--platform", plat]
    cmd = [sys.executable, "-m", "pip", "download", "-q", *flags, *(f"{n}=={v}" for n, v in sorted(want.items()))]
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
