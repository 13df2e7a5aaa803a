"""`kiln bench tokenizer`: Kiln's BPE against HF tokenizers, rustbpe and tiktoken, one run.

On the first ``--mb`` MB of a corpus (default: Gutenberg books joined by ``<|endoftext|>``):

- **train**: a byte-level BPE of ``--vocab-size`` with the GPT-2 split pattern, by Kiln (C core),
  HF ``tokenizers`` (``BpeTrainer``) and ``rustbpe``; optionally Kiln's pure-Python reference.
- **encode**: the same text with GPT-2's vocabulary (``tokenizers/gpt2`` files) by Kiln, tiktoken
  and HF ``tokenizers``, at each ``--threads`` count; ids are checked equal to Kiln's.

Every job runs in a fresh spawned process so its peak memory (max RSS, text included) is its own.
``seconds`` is wall clock, ``cpu_s`` the CPU time of all the job's threads (the fairer figure on a
shared, loaded machine).
Libraries that are not installed are skipped. Results print as a table (ratios are the other
library's time over Kiln's at the same thread count) and, with ``--out``, as markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import resource
import tarfile
import time
from pathlib import Path
from typing import Any

ENDOFTEXT = "<|endoftext|>"
GPT2_PAT_TIKTOKEN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def prepare_sample(source: str | os.PathLike, out: str | os.PathLike, max_bytes: int) -> Path:
    """First ``max_bytes`` bytes of ``source`` as one text file, books joined by ``<|endoftext|>``.

    ``source`` is a ``.tar.gz`` of text files (taken in archive order) or a text file. Reused when
    ``out`` exists with the same size request (recorded in a ``.meta`` file beside it).
    """
    out = Path(out)
    meta = out.with_suffix(".meta")
    want = {"source": os.fspath(source), "max_bytes": max_bytes}
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()) == want:
        return out
    src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(f"benchmark corpus {src} does not exist; pass --data FILE")
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "wb") as f:
        if src.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(src) as tf:
                for m in tf:
                    if n >= max_bytes:
                        break
                    if not m.isfile():
                        continue
                    data = tf.extractfile(m).read()[: max_bytes - n]  # type: ignore[union-attr]
                    if n:
                        f.write(ENDOFTEXT.encode())
                    f.write(data)
                    n += len(data)
        else:
            with open(src, "rb") as g:
                f.write(g.read(max_bytes))
    meta.write_text(json.dumps(want))
    return out


def _docs(sample: Path) -> list[str]:
    return sample.read_bytes().decode("utf-8", "replace").split(ENDOFTEXT)


def _ids_digest(batches: list[list[int]]) -> tuple[int, str]:
    h = hashlib.sha1()
    n = 0
    for ids in batches:
        h.update(json.dumps(ids).encode())
        n += len(ids)
    return n, h.hexdigest()[:12]


# --------------------------------------------------------------------------- jobs (run in children)
def _job_train(lib: str, sample: str, vocab_size: int, threads: int) -> dict[str, Any]:
    if lib.startswith("kiln"):
        from kiln.tokenizer import train_bpe

        t0, c0 = time.perf_counter(), time.process_time()
        _, merges = train_bpe(sample, vocab_size, [ENDOFTEXT], workers=threads, backend="python" if lib == "kiln-python" else "auto")
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"seconds": secs, "cpu_s": cpu, "merges": [list(map(bytes.hex, m)) for m in merges]}
    docs = _docs(Path(sample))
    if lib == "hf":
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t0, c0 = time.perf_counter(), time.process_time()
        tok.train_from_iterator(docs, trainer=trainer)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "vocab": tok.get_vocab_size()}
    if lib == "rustbpe":
        import rustbpe

        from kiln.tokenizer.pretokenize import GPT2_PATTERN

        tok = rustbpe.Tokenizer()
        t0, c0 = time.perf_counter(), time.process_time()
        tok.train_from_iterator(iter(docs), vocab_size - 1, pattern=GPT2_PATTERN)  # no special token slot
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        ranks = sorted(tok.get_mergeable_ranks(), key=lambda kv: kv[1])
        return {"seconds": secs, "cpu_s": cpu, "tokens": [bytes(b).hex() for b, _ in ranks[256:]]}
    raise ValueError(lib)


def _job_encode(lib: str, sample: str, gpt2_dir: str, threads: int, max_mb: float | None = None) -> dict[str, Any]:
    docs = _docs(Path(sample))
    if max_mb is not None:  # the first documents that make up about max_mb MB
        keep, size = [], 0
        for d in docs:
            if size >= max_mb * 1e6:
                break
            keep.append(d)
            size += len(d)
        docs = keep
    n_bytes = sum(len(d.encode()) for d in docs)
    vocab_json, merges_txt = Path(gpt2_dir) / "vocab.json", Path(gpt2_dir) / "merges.txt"
    if lib == "kiln":
        from kiln.tokenizer import Tokenizer

        tok = Tokenizer.from_gpt2_files(vocab_json, merges_txt)
        t0, c0 = time.perf_counter(), time.process_time()
        out = tok.encode_batch(docs, num_threads=threads)
    elif lib == "tiktoken":
        import tiktoken

        from kiln.tokenizer.formats import unicode_to_byte

        u2b = unicode_to_byte()
        ranks = {bytes(u2b[c] for c in k): v for k, v in json.loads(vocab_json.read_text()).items() if k != ENDOFTEXT}
        enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PAT_TIKTOKEN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256})
        t0, c0 = time.perf_counter(), time.process_time()
        out = [enc.encode_ordinary(d) for d in docs] if threads == 1 else enc.encode_ordinary_batch(docs, num_threads=threads)
    elif lib == "hf":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        t0, c0 = time.perf_counter(), time.process_time()
        out = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    else:
        raise ValueError(lib)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_tokens, digest = _ids_digest(out)
    return {"seconds": secs, "cpu_s": cpu, "bytes": n_bytes, "tokens": n_tokens, "digest": digest}


def _child(fn_name: str, args: tuple, threads: int, q: mp.Queue) -> None:
    try:
        res = globals()[fn_name](*args)
    except Exception as e:  # noqa: BLE001 - reported as a row, not a crash of the whole benchmark
        res = {"error": f"{type(e).__name__}: {e}"}
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put(res)


def run_job(fn_name: str, args: tuple, threads: int) -> dict[str, Any]:
    """Run one job in a fresh spawned process with ``threads`` threads allowed to the libraries."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    env_keys = ["RAYON_NUM_THREADS", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"]
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                      TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
    try:
        p = ctx.Process(target=_child, args=(fn_name, args, threads, q))
        p.start()
        res = q.get()
        p.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return res


def _installed(lib: str) -> bool:
    import importlib.util

    name = {"hf": "tokenizers", "rustbpe": "rustbpe", "tiktoken": "tiktoken"}.get(lib)
    return name is None or importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------- driver
def bench_tokenizer(
    data: str | os.PathLike, gpt2_dir: str | os.PathLike | None, mb: float = 100, vocab_size: int = 32768,
    threads: tuple[int, ...] = (1, 2), train_libs: tuple[str, ...] = ("kiln", "hf", "rustbpe"),
    encode_libs: tuple[str, ...] = ("kiln", "tiktoken", "hf"), work_dir: str | os.PathLike = "/tmp/kiln-bench-tokenizer",
    encode_mb: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run the benchmark; returns one row per (task, library, threads)."""
    sample = prepare_sample(data, Path(work_dir) / f"sample_{int(mb * 1e6)}.txt", int(mb * 1e6))
    size_mb = sample.stat().st_size / 1e6
    rows: list[dict[str, Any]] = []
    kiln_merges = None
    for t in threads:
        for lib in train_libs:
            if not _installed(lib):
                continue
            res = run_job("_job_train", (lib, str(sample), vocab_size, t), t)
            row = {"task": f"train {vocab_size}", "lib": lib, "threads": t, **{k: v for k, v in res.items() if k in ("seconds", "cpu_s", "max_rss_mb", "error")}}
            if "seconds" in res:
                row["MB/s"] = size_mb / res["seconds"]
            if lib == "kiln" and "merges" in res:
                kiln_merges = res["merges"]
            if lib == "kiln-python" and kiln_merges is not None:
                row["same merges as kiln"] = res["merges"] == kiln_merges
            if lib == "rustbpe" and kiln_merges is not None and "tokens" in res:
                ours = [bytes.fromhex(a) + bytes.fromhex(b) for a, b in kiln_merges]
                theirs = [bytes.fromhex(x) for x in res["tokens"]]
                same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
                row["same merges as kiln"] = f"first {same} of {len(ours)}"
            rows.append(row)
            print(_format_row(row), flush=True)
    if gpt2_dir is not None:
        for t in threads:
            for lib in encode_libs:
                if not _installed(lib):
                    continue
                cap = (encode_mb or {}).get(lib)
                res = run_job("_job_encode", (lib, str(sample), str(gpt2_dir), t, cap), t)
                row = {"task": "encode gpt2" + (f" (first {cap:g} MB)" if cap else ""), "lib": lib, "threads": t, **{k: v for k, v in res.items() if k != "bytes"}}
                if "seconds" in res:
                    row["MB/s"] = res["bytes"] / 1e6 / res["seconds"]
                    row["bytes/token"] = res["bytes"] / max(res["tokens"], 1)
                rows.append(row)
                print(_format_row(row), flush=True)
    for row in rows:  # ratios to Kiln at the same task and thread count
        task = row["task"].split(" (")[0]
        ref = next((r for r in rows if r["lib"] == "kiln" and r["task"] == task and r["threads"] == row["threads"]), None)
        if ref and "MB/s" in ref and "MB/s" in row:
            row["time / kiln"] = ref["MB/s"] / row["MB/s"]  # per byte, so a capped sample compares fairly
        if row["task"] == task and task.startswith("encode") and ref and "digest" in row:
            row["ids == kiln"] = row["digest"] == ref.get("digest")
    return rows


COLUMNS = ["task", "lib", "threads", "seconds", "cpu_s", "MB/s", "bytes/token", "max_rss_mb", "time / kiln", "ids == kiln", "same merges as kiln", "error"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def _format_row(row: dict[str, Any]) -> str:
    return " | ".join(f"{c}={_fmt(row[c])}" for c in COLUMNS if c in row)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _default_data() -> Path | None:
    env = os.environ.get("KILN_SHARED_DATA")
    for base in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[3].parent / "shared" / "data"]:
        if base.is_dir():
            return base
    return None


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``kiln bench tokenizer``."""
    p = bench_subparsers.add_parser(
        "tokenizer", help="BPE training and encoding: Kiln vs HF tokenizers, rustbpe, tiktoken",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=None,
                   help="corpus: a .tar.gz of text files or a text file (default: $KILN_SHARED_DATA or "
                        "../shared/data, pretrain/gutenberg_books.tar.gz)")
    p.add_argument("--gpt2-dir", default=None, help="folder with GPT-2 vocab.json and merges.txt for the encode "
                                                    "benchmark (default: <shared data>/tokenizers/gpt2)")
    p.add_argument("--mb", type=float, default=100, help="megabytes of the corpus to use (default 100)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size to train (default 32768)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to run (default 1 2)")
    p.add_argument("--train-libs", nargs="*", default=["kiln", "hf", "rustbpe"],
                   help="trainers: kiln, kiln-python (the slow reference), hf, rustbpe (default kiln hf rustbpe)")
    p.add_argument("--encode-libs", nargs="*", default=["kiln", "tiktoken", "hf"],
                   help="encoders: kiln, tiktoken, hf (default all)")
    p.add_argument("--encode-mb", nargs="*", default=["hf=20"], metavar="LIB=MB",
                   help="encode only the first MB megabytes with LIB (slow libraries; ratios are per byte)")
    p.add_argument("--work-dir", default="/tmp/kiln-bench-tokenizer", help="where the corpus sample is cached")
    p.add_argument("--out", default=None, help="also write the table as markdown to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """CLI entry: resolve paths, run, print (and write) the table."""
    shared = _default_data()
    data = args.data or (shared / "pretrain" / "gutenberg_books.tar.gz" if shared else None)
    if data is None:
        raise FileNotFoundError("no corpus: pass --data FILE (../shared/data is absent)")
    gpt2 = args.gpt2_dir or (shared / "tokenizers" / "gpt2" if shared else None)
    if gpt2 is not None and not (Path(gpt2) / "vocab.json").is_file():
        gpt2 = None
    from kiln.tokenizer import native

    header = (f"kiln bench tokenizer | {platform.machine()} {os.cpu_count()} cores | python {platform.python_version()} "
              f"| kiln core: {'C' if native.available() else 'pure Python'} | {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(header, flush=True)
    rows = bench_tokenizer(data, gpt2, args.mb, args.vocab_size, tuple(args.threads), tuple(args.train_libs),
                           tuple(args.encode_libs), args.work_dir,
                           {k: float(v) for k, v in (x.split("=") for x in args.encode_mb)})
    table = to_markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(header + "\n\n" + table + "\n")
    return 0
