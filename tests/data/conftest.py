"""Keep the data tests' caches (the converted toxicity model) out of the user's home."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _kiln_cache(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("KILN_CACHE")
    os.environ["KILN_CACHE"] = str(tmp_path_factory.mktemp("kiln-cache"))
    yield
    if old is None:
        os.environ.pop("KILN_CACHE", None)
    else:
        os.environ["KILN_CACHE"] = old
