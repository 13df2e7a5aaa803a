"""Line dedup counts a line once per *surviving* document (issue 24 item 8): a page crawled 40 times
keeps its text; boilerplate lines shared by 40 different pages go."""

from __future__ import annotations

import json
from dataclasses import replace

from webfixtures import english_paragraphs

from kiln.data.dedup import DedupConfig, MinHashConfig
from kiln.data.pipeline import minimal, run_pipeline
from kiln.data.readers import read_documents

BOILERPLATE = ["Accept all cookies to keep browsing this site.", "Subscribe to our weekly newsletter today."]


def test_a_page_crawled_40_times_survives_whole_and_boilerplate_goes(tmp_path) -> None:
    page = "\n".join(english_paragraphs(7, 12).replace(". ", ".\n").split("\n"))  # one sentence a line
    others = ["\n".join([*english_paragraphs(100 + i, 12).replace(". ", ".\n").split("\n"), *BOILERPLATE])
              for i in range(40)]
    src = tmp_path / "crawl.jsonl"
    with open(src, "w") as f:
        for i in range(40):  # the same page, 40 crawls, interleaved with the other pages
            f.write(json.dumps({"text": page, "url": f"https://a.example/p?visit={i}"}) + "\n")
            f.write(json.dumps({"text": others[i]}) + "\n")
    cfg = replace(minimal(), workers=1, report=False,
                  dedup=DedupConfig(exact=True, minhash=MinHashConfig(), line_min_docs=20))
    stats = run_pipeline(cfg, [str(src)], tmp_path / "out")
    stats.check_balance()
    assert stats.dropped["dedup_exact"] == 39 and stats.kept == 41
    docs = list(read_documents(str(next((tmp_path / "out").glob("train_*")))))
    kept_page = [d for d in docs if d.text.startswith(page.split("\n")[0])]
    assert len(kept_page) == 1 and kept_page[0].text == page  # whole: not one line removed
    for d in docs:
        assert not any(b in d.text for b in BOILERPLATE)
    assert stats.counters["dedup_lines_removed"] == 2 * 40
