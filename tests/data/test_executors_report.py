"""Executors (local in-process, local pool, Ray when installed) and the funnel report."""

from __future__ import annotations

import pytest

from kiln.data.document import Document
from kiln.data.executors import (
    LocalExecutor,
    make_executor,
    mark_done,
    marker_path,
    run_tasks,
)
from kiln.data.report import funnel_rows, render_html, write_report
from kiln.data.steps import Stats


def _square(shard: int, x: int, marker_dir: str) -> int:
    from pathlib import Path

    mark_done(Path(marker_dir), "sq", shard)
    return x * x


def test_run_tasks_skips_marked_shards(tmp_path) -> None:
    mark_done(tmp_path, "sq", 1)
    ran = run_tasks(LocalExecutor(1), "sq", _square, [(2, str(tmp_path)), (3, str(tmp_path)), (4, str(tmp_path))], tmp_path)
    assert ran == 2 and all(marker_path(tmp_path, "sq", i).exists() for i in range(3))
    assert run_tasks(LocalExecutor(1), "sq", _square, [(2, str(tmp_path))] * 3, tmp_path) == 0


def test_local_pool_keeps_order() -> None:
    assert LocalExecutor(2).map(pow, [(i, 2) for i in range(6)]) == [i * i for i in range(6)]
    with pytest.raises(ValueError, match="local, ray"):
        make_executor("spark")


def _stats() -> Stats:
    s = Stats()
    docs = [Document("kept text " * 10, "a", {"language": "en", "domain": "x.org"}), Document("<b>", "b"), Document("c", "c")]
    for d in docs:
        s.add_input(d)
    s.add_kept(docs[0])
    s.add_drop(docs[1], "gopher_short_doc")
    s.add_drop(docs[2], "gopher_short_doc")
    s.add_error("warc_broken", "f.warc@12", 0, "Invalid WARC header")
    return s


def test_funnel_balances_and_report_renders(tmp_path) -> None:
    s = _stats()
    rows = funnel_rows(s)
    assert rows[0]["docs"] == 4 == sum(r["docs"] for r in rows[1:])
    assert rows[0]["bytes"] == sum(r["bytes"] for r in rows[1:])
    page = render_html(s, "test")
    assert "gopher_short_doc" in page and "f.warc@12" in page and "&lt;b&gt;" in page
    write_report(tmp_path, s, "test")
    assert (tmp_path / "funnel.png").stat().st_size > 1000
    merged = Stats.from_dict(s.to_dict()).merge(_stats())
    merged.check_balance()
    assert merged.docs_in == 8
    broken = _stats()
    broken.kept += 1
    with pytest.raises(AssertionError, match="does not balance"):
        broken.check_balance()
