"""One reading layer for the data, tokenizer and tokens stages (issue 24 item 6; issue 17 item 2):
document artifacts are read through their manifest, ``.jsonl.zst`` shards as text, Hugging Face's
``hf://datasets/ORG/NAME[@REV]/PATH`` through ``HfFileSystem`` (one shard per remote file), URLs
with retries; and the corpus stage writes the format ``kiln data run`` writes."""

from __future__ import annotations

import collections
import functools
import http.server
import json
import sys
import threading
import types
from dataclasses import replace
from pathlib import Path

import pytest

from kiln.artifacts import read_manifest
from kiln.data.document import Document
from kiln.data.pipeline import expand_inputs, minimal, run_pipeline
from kiln.data.readers import download, read_documents, read_texts
from kiln.data.writers import JsonlZstFile, list_doc_files

from webfixtures import english_paragraphs


def _text(i: int) -> str:
    return english_paragraphs(i, 8)


@pytest.fixture
def data_run(tmp_path) -> Path:
    """A finished `kiln data run` folder (minimal preset): train shard, stats.json, report, manifest."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": _text(i)}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    run_pipeline(replace(minimal(), workers=1, val_fraction=0.2), [str(src)], out)
    return out


def test_data_run_folder_is_read_through_its_manifest(data_run) -> None:
    files = read_manifest(data_run)["stats"]["files"]
    assert files == list_doc_files(data_run) and files["train"] == ["train_00000.jsonl.zst"] and files["val"]
    assert (data_run / "stats.json").is_file() and (data_run / "report.html").is_file()
    errors = collections.Counter()
    train = list(read_documents(str(data_run), errors=errors))
    val = list(read_documents(str(data_run), split="val", errors=errors))
    assert not errors and len(train) + len(val) == 40 and train and val  # stats.json is never parsed


def test_tokenize_a_data_run_folder_reads_no_metadata_files(data_run, tmp_path) -> None:
    from kiln.shards.tokenize import TokenizeConfig, tokenize_corpus

    class Bytes:
        vocab_size, eot_id = 257, 256

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    for cfg in (TokenizeConfig(train=(str(data_run),), tokenizer=str(tok), num_workers=1),
                TokenizeConfig(corpus=str(data_run), tokenizer=str(tok), num_workers=1)):
        out = tokenize_corpus(cfg, tmp_path / f"tokens{len(cfg.train)}", tokenizer=Bytes(), progress=False)
        stats = read_manifest(out)["stats"]
        assert stats["errors"] == {}  # was 393 read errors: stats.json, manifest.json, report.html as JSONL
        assert stats["train"]["docs"] == len(list(read_documents(str(data_run))))


def test_tokenizer_trains_on_text_of_zst_shards_and_folders(data_run, tmp_path) -> None:
    from kiln.tokenizer import Tokenizer
    from kiln.tokenizer.stage import TokenizerTrainConfig, train_tokenizer

    shard = data_run / "train_00000.jsonl.zst"
    with pytest.raises(ValueError, match="read_texts"):  # never the compressed bytes
        train_tokenizer(TokenizerTrainConfig(inputs=(str(shard),), vocab_size=300), tmp_path / "t0")
    for i, src in enumerate((shard, data_run, data_run / "train_*.jsonl.zst")):
        out = train_tokenizer(TokenizerTrainConfig(inputs=(str(src),), vocab_size=300, workers=1),
                              tmp_path / f"t{i + 1}", read_texts=read_texts)
        tok = Tokenizer.load(out)
        merged = [tok.decode([t]) for t in range(256, 300)]
        # Text: " the", "otter"... (trained on the compressed bytes, merges were "Ā Ā" and U+FFFD).
        assert all("\ufffd" not in m and m.isprintable() for m in merged), merged
        assert sum(m.strip(" ").isalpha() for m in merged) > 0.8 * len(merged), merged
        assert len(tok.encode(_text(3))) < 0.75 * len(_text(3))  # merges of text compress text
    assert read_manifest(tmp_path / "t2")["stats"]["heldout_bytes"] > 0  # the folder's val split


def test_corpus_stage_writes_the_data_run_format(tmp_path) -> None:
    from kiln.data.corpus import CorpusConfig, prepare_corpus

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _text(i)}) + "\n" for i in range(30)))
    out = prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.2), tmp_path / "corpus", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_00000.jsonl.zst", "val_00000.jsonl.zst"]
    assert read_manifest(out)["stats"]["files"] == list_doc_files(out)
    assert len(list(read_documents(str(out)))) + len(list(read_documents(str(out), split="val"))) == 30


def test_old_corpus_artifacts_are_still_read(tmp_path) -> None:
    from kiln.shards.tokenize import TokenizeConfig, split_sources

    old = tmp_path / "old"
    old.mkdir()
    (old / "train.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    (old / "val.jsonl").write_text(json.dumps({"text": "d e"}) + "\n")
    (old / "manifest.json").write_text(json.dumps({"stage": "corpus", "stats": {"train_docs": 1}}))
    assert [d.text for d in read_documents(str(old))] == ["a b c"]
    assert [d.text for d in read_documents(str(old), split="val")] == ["d e"]
    assert split_sources(TokenizeConfig(corpus=str(old), tokenizer="t")) == {
        "train": [str(old / "train.jsonl")], "val": [str(old / "val.jsonl")]}
    tokens = tmp_path / "tok"
    tokens.mkdir()
    (tokens / "manifest.json").write_text(json.dumps({"stage": "tokens"}))
    with pytest.raises(ValueError, match="'tokens' artifact, not documents"):
        list(read_documents(str(tokens)))


class _StandInHfFileSystem:
    """A local stand-in for ``huggingface_hub.HfFileSystem`` (no network here): paths
    ``datasets/ORG/NAME@REV/PATH`` map to a folder tree; the subset of the fsspec API Kiln uses."""

    root: Path = Path(".")
    opened: list[str] = []

    def _p(self, path: str) -> Path:
        return self.root / path

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern))

    def find(self, path: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self._p(path).rglob("*") if p.is_file())

    def isdir(self, path: str) -> bool:
        return self._p(path).is_dir()

    def open(self, path: str, mode: str = "rb"):
        type(self).opened.append(path)
        return open(self._p(path), mode)


def test_hf_datasets_urls_one_shard_per_remote_file(tmp_path, monkeypatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    repo = tmp_path / "hub" / "datasets" / "kiln-org" / "pots@v1"
    (repo / "data").mkdir(parents=True)
    w = JsonlZstFile(repo / "data" / "part-0.jsonl.zst")
    for i in range(3):
        w.write(Document(_text(i), f"d{i}"))
    w.close()
    pq.write_table(pa.table({"text": [_text(10), _text(11)]}), repo / "data" / "part-1.parquet")
    (repo / "data" / "README.md").write_text("a dataset card, not a document")
    _StandInHfFileSystem.root, _StandInHfFileSystem.opened = tmp_path / "hub", []
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfFileSystem=_StandInHfFileSystem))

    url = "hf://datasets/kiln-org/pots@v1/data"
    assert expand_inputs([url]) == [f"{url}/part-0.jsonl.zst", f"{url}/part-1.parquet"]
    assert expand_inputs([url + "/*.parquet"]) == [f"{url}/part-1.parquet"]
    docs = list(read_documents(url))
    assert [d.text for d in docs] == [_text(i) for i in (0, 1, 2, 10, 11)]
    assert docs[3].metadata["source"] == f"{url}/part-1.parquet"
    stats = run_pipeline(replace(minimal(), workers=1, report=False), [url], tmp_path / "out")
    assert stats.docs_in == 5 and read_manifest(tmp_path / "out")["stats"]["shards"] == 2
    assert "datasets/kiln-org/pots@v1/data/part-1.parquet" in _StandInHfFileSystem.opened


@pytest.fixture
def flaky_server(tmp_path):
    """An HTTP server on 127.0.0.1 that answers 503 twice per path before serving the file (and 404
    for missing files); counts requests per path."""
    root = tmp_path / "www"
    root.mkdir()
    hits: collections.Counter = collections.Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits[self.path] += 1
            if hits[self.path] <= 2 and "flaky" in self.path:
                self.send_error(503, "busy")
                return
            super().do_GET()

        def log_message(self, *a, **k):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_urls_are_retried_with_backoff(flaky_server, tmp_path) -> None:
    root, base, hits = flaky_server
    (root / "flaky.jsonl").write_text(json.dumps({"text": "served on the third try"}) + "\n")
    path = download(f"{base}/flaky.jsonl", tmp_path / "cache", backoff_s=0.01)
    assert path.read_text().startswith('{"text": "served') and hits["/flaky.jsonl"] == 3
    with pytest.raises(RuntimeError, match="1 attempts"):  # a 404 is not retried
        download(f"{base}/missing.jsonl", tmp_path / "cache", backoff_s=0.01)
    assert hits["/missing.jsonl"] == 1
    with pytest.raises(RuntimeError, match="2 attempts"):
        download(f"{base}/flaky2.jsonl", tmp_path / "cache", retries=1, backoff_s=0.01)


def test_eval_reads_held_out_text_through_the_same_layer(data_run) -> None:
    from kiln.eval.perplexity import read_texts as eval_texts

    val = [d.text for d in read_documents(str(data_run), split="val")]
    assert list(eval_texts(data_run)) == val  # the folder: its val split, through the manifest
    shard = data_run / "val_00000.jsonl.zst"
    assert list(eval_texts(shard)) == val  # was: the compressed bytes read as UTF-8 text
