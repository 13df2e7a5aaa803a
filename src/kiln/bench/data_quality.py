"""`kiln bench data --what quality`: the shipped quality classifier's effect on the funnel and on a
small downstream training run.

1. **Classifier**: held-out accuracy of the shipped model's own split is in its build metrics; here,
   transfer: the share of unseen Wikipedia windows (``pretrain/wiki_demo.txt``) and of C4 web
   documents (``pretrain/c4_demo.jsonl``) it calls high quality, and their ranking AUC.
2. **Funnel**: the ``web_en`` pipeline on the trafilatura evaluation pages (one WARC), without and
   with ``quality.classifier="default"``: kept documents and ``quality_classifier`` drops.
3. **Downstream**: a pool of web documents (C4 less 60 held out, plus the English pages that
   ``web_en`` keeps), split by the classifier. Two tiny byte-level Kiln models (0.1M parameters)
   train for the same budget (``--steps`` of 512 tokens, default 300; a fixed step count, since a
   shared CPU's wall clock is not a fair budget) on equal numbers of bytes: a random sample of the
   pool, and the documents the classifier keeps. Both are scored on held-out
   Wikipedia (the reference genre) and on the 60 held-out C4 documents (the web genre).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

EOT = 256  # byte-level tokens 0-255, then end-of-text


def _auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    p, n = np.asarray(pos), np.asarray(neg)
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n)))


def _byte_tokens(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level tokens of documents, each followed by end-of-text; (tokens, document starts)."""
    parts, starts, n = [], [], 0
    for d in docs:
        b = np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        starts.append(n)
        parts += [b, np.array([EOT], dtype=np.uint16)]
        n += len(b) + 1
    return np.concatenate(parts), np.asarray(starts)


def _train_and_score(docs: list[str], heldout: dict[str, np.ndarray], steps: int, seconds: float, out: Path, seed: int) -> dict[str, Any]:
    import torch

    from kiln.eval.heldout import evaluate_heldout
    from kiln.model import ModelConfig, load_pretrained
    from kiln.shards.format import write_shard
    from kiln.train import tiny, train

    tokens_dir = out / "tokens"
    tokens_dir.mkdir(parents=True, exist_ok=True)
    toks, starts = _byte_tokens(docs)
    write_shard(tokens_dir / "train_00000.bin", toks, starts, vocab_size=EOT + 1)
    base = tiny()
    # A 0.1M-parameter byte-level model: small enough for a fixed step budget on a shared 2-core CPU.
    model = ModelConfig(vocab_size=320, context_length=64, d_model=64, n_layers=2, n_heads=2, d_ff=192, tie_embeddings=True)
    cfg = replace(base, model=model, batch_size=8, max_steps=steps, max_seconds=seconds, seed=seed, warmup_steps=max(steps // 20, 1),
                  eval_every=0, sample_every=0, save_every=0, device="cpu")
    t0 = time.perf_counter()
    run = train(cfg, tokens_dir, out / "run", resume=False)
    wall = time.perf_counter() - t0
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    net = load_pretrained(run / "model", device="cpu").eval()
    token_bytes = np.ones(320, dtype=np.int64)
    token_bytes[EOT:] = 0
    row: dict[str, Any] = {"train_bytes": int(len(toks)), "steps": stats["steps"], "tokens_seen": stats["tokens_seen"],
                           "train_wall_s": round(wall, 1)}
    with torch.no_grad():
        for name, arr in heldout.items():
            r = evaluate_heldout(net, arr, token_bytes, cfg.model.context_length, 16, max_batches=None, device="cpu")
            row[f"{name}_bpb"] = r["bpb"]
    return row


def bench_quality(shared: Path, work: Path, steps: int = 300, seconds: float = 0.0, seed: int = 0,
                  limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """The three tables of the module doc (``limit``: use only that many evaluation pages). Each
    downstream run trains ``steps`` steps of 512 tokens (``seconds`` > 0 also caps its time)."""
    from kiln.data.extract import load_trafilatura_eval
    from kiln.data.pipeline import run_pipeline, web_en
    from kiln.data.quality import QualityConfig
    from kiln.data.quality_default import load_default_quality_classifier, windows
    from kiln.data.warc import write_warc

    clf = load_default_quality_classifier()
    wiki_text = (shared / "pretrain" / "wiki_demo.txt").read_text(encoding="utf-8")
    c4 = [json.loads(line)["text"] for line in (shared / "pretrain" / "c4_demo.jsonl").read_text().splitlines() if line.strip()]
    wiki_w = windows(wiki_text, 120, 40)
    ws, cs = [clf.score(t) for t in wiki_w], [clf.score(t) for t in c4]
    transfer = [{"texts": "wiki_demo windows (unseen Wikipedia)", "n": len(ws), "share_high": float(np.mean(np.array(ws) >= 0.5))},
                {"texts": "c4_demo documents (web)", "n": len(cs), "share_high": float(np.mean(np.array(cs) >= 0.5))},
                {"texts": "AUC wiki vs c4", "n": len(ws) * len(cs), "share_high": _auc(ws, cs)}]

    pages = load_trafilatura_eval(str(shared / "web" / "trafilatura_eval_html.tar.gz"))[:limit]
    work.mkdir(parents=True, exist_ok=True)
    warc = work / "pages.warc.gz"
    n = write_warc(pages, warc)
    funnel = []
    kept_pages: list[str] = []
    for name, quality in (("web_en", QualityConfig()), ("web_en + quality default", QualityConfig(classifier="default"))):
        cfg = replace(web_en(), workers=1, report=False, quality=quality)
        t0 = time.perf_counter()
        out = work / name.replace(" ", "_").replace("+", "plus")
        stats = run_pipeline(cfg, [str(warc)], out, force=True)
        funnel.append({"pipeline": name, "docs_in": n, "kept": stats.kept, "quality_classifier_drops": stats.dropped.get("quality_classifier", 0),
                       "docs_per_s": n / (time.perf_counter() - t0)})
        if not kept_pages:
            from kiln.data.readers import read_documents

            kept_pages = [d.text for d in read_documents([str(p) for p in sorted(out.glob("train_*"))])]

    rng = random.Random(seed)
    c4_order = list(range(len(c4)))
    rng.shuffle(c4_order)
    held_c4 = [c4[i] for i in c4_order[:60]]
    pool = [c4[i] for i in c4_order[60:]] + kept_pages
    good = [d for d in pool if clf.score(d) >= 0.5]
    budget = sum(len(d.encode()) for d in good)
    shuffled = pool[:]
    rng.shuffle(shuffled)
    rand, size = [], 0
    for d in shuffled:
        if size >= budget:
            break
        rand.append(d)
        size += len(d.encode())
    heldout = {"wiki": _byte_tokens([wiki_text[-64_000:]])[0], "c4_heldout": _byte_tokens(held_c4)[0][:64_000]}
    down = []
    for name, docs in (("random sample of the pool", rand), ("classifier keeps (p >= 0.5)", good)):
        row = _train_and_score(docs, heldout, steps, seconds, work / f"train_{len(down)}", seed)
        down.append({"training set": name, "docs": len(docs), **row})
    return {"quality_transfer": transfer, "quality_funnel": funnel, "quality_downstream": down}
