"""The curation report: a funnel that balances exactly, as a table, a chart and a readable HTML page.

``funnel_rows(stats)`` lists documents and input bytes in, then each drop reason and error, then
kept; the rows sum back to the input (``Stats.check_balance`` is called first).
``write_report(out_dir, stats)`` writes ``funnel.png`` (matplotlib, Agg backend) and
``report.html``: the funnel, for each reason a sample of dropped documents, a sample of kept ones,
top domains and languages, counters (PII masks, lines removed) and the read errors with their file
and offset.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from kiln.data.steps import Stats


def funnel_rows(stats: Stats) -> list[dict[str, Any]]:
    """``[{"stage", "kind", "docs", "bytes"}]``: input, each drop reason / error (largest first), kept."""
    stats.check_balance()
    rows = [{"stage": "input", "kind": "in", "docs": stats.docs_in, "bytes": stats.bytes_in}]
    for reason, n in stats.errors.most_common():
        rows.append({"stage": reason, "kind": "error", "docs": n, "bytes": stats.error_bytes[reason]})
    for reason, n in stats.dropped.most_common():
        rows.append({"stage": reason, "kind": "dropped", "docs": n, "bytes": stats.dropped_bytes[reason]})
    rows.append({"stage": "kept", "kind": "kept", "docs": stats.kept, "bytes": stats.kept_bytes_in})
    return rows


def plot_funnel(stats: Stats, path: str | os.PathLike) -> None:
    """Horizontal bar chart of documents remaining after each drop reason (largest reasons first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = funnel_rows(stats)
    labels, remaining, removed = [], [], []
    left = stats.docs_in
    for r in rows[1:-1]:
        labels.append(r["stage"])
        removed.append(r["docs"])
        left -= r["docs"]
        remaining.append(left)
    labels = ["input"] + labels
    remaining = [stats.docs_in] + remaining
    removed = [0] + removed
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
    y = range(len(labels))[::-1]
    ax.barh(list(y), remaining, color="#4c72b0", label="remaining")
    ax.barh(list(y), removed, left=remaining, color="#dd8452", label="removed here")
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("documents")
    ax.set_title(f"funnel: {stats.docs_in} in, {stats.kept} kept")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _samples_html(items: list[dict[str, Any]]) -> str:
    out = []
    for s in items:
        head = html.escape(str(s.get("url") or s.get("id")))
        out.append(f"<details><summary>{head}</summary><pre>{html.escape(s.get('text', ''))}</pre></details>")
    return "\n".join(out) or "<p><i>none</i></p>"


def render_html(stats: Stats, name: str = "", seconds: float | None = None, chart: str | None = "funnel.png") -> str:
    """The report page as a string (self-contained apart from the chart image)."""
    rows = funnel_rows(stats)
    pct = lambda n, d: f"{100 * n / d:.1f}%" if d else "-"
    table = "\n".join(
        f"<tr class='{r['kind']}'><td>{html.escape(r['stage'])}</td><td>{r['kind']}</td>"
        f"<td>{r['docs']:,}</td><td>{pct(r['docs'], stats.docs_in)}</td><td>{_human(r['bytes'])}</td></tr>"
        for r in rows
    )
    sections = []
    for reason in list(stats.dropped) + ["kept"]:
        items = stats.samples.get(reason, [])
        sections.append(f"<h3>{html.escape(reason)} ({len(items)} samples)</h3>{_samples_html(items)}")
    top = lambda c: "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:,}</td></tr>" for k, v in c.most_common(20))
    errors = "".join(
        f"<tr><td>{html.escape(e['reason'])}</td><td>{html.escape(e['where'])}</td><td>{html.escape(e.get('detail', ''))}</td></tr>"
        for e in stats.error_samples
    )
    by_reason = "".join(
        f"<tr><td>{html.escape(r)}</td><td>"
        + ", ".join(f"{html.escape(str(d))} ({n:,})" for d, n in stats.drop_domains[r].most_common(10))
        + "</td></tr>"
        for r in sorted(stats.drop_domains, key=lambda r: -stats.dropped.get(r, 0))
    )
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Kiln data report {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}}tr.kept{{background:#e6f4e6}}tr.error{{background:#fbe9e9}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:6px}}</style></head><body>
<h1>Kiln data report: {html.escape(name)}</h1>
<p>{stats.docs_in:,} documents ({_human(stats.bytes_in)}) in, {stats.kept:,} kept
({_human(stats.kept_bytes_out)} of text out){took}. The funnel balances: in = kept + dropped + errors.</p>
{f'<img src="{chart}" alt="funnel chart">' if chart else ''}
<h2>Funnel</h2><table><tr><th>stage</th><th>kind</th><th>documents</th><th>share</th><th>input bytes</th></tr>{table}</table>
<h2>Counters</h2><table>{top(stats.counters)}</table>
<h2>Languages (kept)</h2><table>{top(stats.languages)}</table>
<h2>Top domains (kept)</h2><table>{top(stats.domains)}</table>
<h2>Top domains per drop reason</h2><table><tr><th>reason</th><th>domains (documents)</th></tr>{by_reason}</table>
<h2>Read errors (first 50)</h2><table><tr><th>reason</th><th>where (file@offset)</th><th>detail</th></tr>{errors}</table>
<h2>Samples</h2>{''.join(sections)}
</body></html>"""


def write_report(out_dir: str | os.PathLike, stats: Stats, name: str = "", seconds: float | None = None) -> Path:
    """Write ``funnel.png`` and ``report.html`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    plot_funnel(stats, out / "funnel.png")
    path = out / "report.html"
    path.write_text(render_html(stats, name, seconds), encoding="utf-8")
    return path
