"""``kiln scaling run``: a sweep, its fits, a prediction, the run that checks it, and a report.

Folder ``OUT``::

    plan.json  plan.md              the grid (written first)
    points/<id>/                    one kiln.train run each (+ spec.json, result.json last)
    runs.csv                        the rows the fits read (N of every kind, D, C, loss)
    fit.json  isoflops.png  power_laws.png  residuals.png
    report.md  report.json          predictions at the check budget; the check's loss and errors
    manifest.json                   last: the study is complete

Run the same command again after a kill or a pause: finished points are reused, a paused point
resumes from its checkpoint, and the fits and report are redone from the rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.artifacts import (
    MANIFEST,
    code_version,
    config_to_dict,
    write_json_atomic,
    write_text_atomic,
)
from kiln.scaling.executors import DONE, Job, LocalExecutor
from kiln.scaling.fit import FitReport, Run, fit_all, predict
from kiln.scaling.shapes import N_KINDS, shape_for_params
from kiln.scaling.sweep import (
    Point,
    ScalingConfig,
    collect,
    data_info,
    make_point,
    plan,
    point_dir,
    result_run,
    table,
)


@dataclass(frozen=True)
class StudyConfig:
    """What to do with a sweep besides running it."""

    check_multiple: float = 0.0
    """Train one check run at this many times the largest budget, at approach 3's (else 2's, else
    1's) predicted optimal N, and compare each approach's predicted loss with it; 0: no check."""
    bootstrap: int = 100
    """Bootstrap refits per approach (intervals)."""
    interval: float = 0.9
    """Central probability of the reported intervals."""
    seed: int = 0
    """Seed of the bootstrap."""


def _jobs(cfg: ScalingConfig, points: list[Point], tokens_dir: Path, out: Path) -> list[Job]:
    jobs = []
    for p in points:
        d = point_dir(out, p)
        if (d / "result.json").is_file():
            r = json.loads((d / "result.json").read_text())
            if r.get("point") == asdict(p):
                continue  # finished: reused
        d.mkdir(parents=True, exist_ok=True)
        spec = {"config": config_to_dict(cfg), "point": asdict(p), "tokens": os.fspath(tokens_dir), "out": os.fspath(d)}
        write_json_atomic(d / "spec.json", spec)
        jobs.append(Job(id=p.id, spec=os.fspath(d / "spec.json"), out=os.fspath(d)))
    return jobs


def execute(cfg: ScalingConfig, points: list[Point], tokens_dir: Path, out: Path, executor: Any) -> dict[str, str]:
    """Run the points not finished yet; ``{id: status}`` for those run (failures raise)."""
    jobs = _jobs(cfg, points, tokens_dir, out)
    if not jobs:
        return {}
    status = executor.run(jobs)
    failed = {k: v for k, v in status.items() if v not in (DONE, "paused")}
    if failed:
        raise RuntimeError(f"{len(failed)} point(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return status


def rows_csv(results: list[dict]) -> str:
    """The fit rows as CSV: every N kind, tokens, FLOPs (exact and 6N), budget, losses, seconds."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "budget", *[f"n_{k}" for k in N_KINDS], "tokens", "flops", "epochs", "loss", "train_loss", "seconds"])
    for r in results:
        p = r["point"]
        w.writerow([p["id"], p["budget"], *[p["n"][k] for k in N_KINDS], r["tokens"],
                    p["flops_per_token"] * r["tokens"], r["epochs"], r["val_loss"], r["train_loss"], r["seconds"]])
    return buf.getvalue()


def run_study(cfg: ScalingConfig, tokens_dir: str | os.PathLike, out_dir: str | os.PathLike,
              study: StudyConfig = StudyConfig(), executor: Any = None) -> dict:
    """Plan, run (resuming), fit, predict, check, report (see the module docstring). Returns the
    report dict; ``report["status"]`` is ``"paused"`` when the executor's time limit cut it short."""
    t0 = time.time()
    executor = executor or LocalExecutor()
    tokens_dir, out = Path(tokens_dir), Path(out_dir)
    vocab, train_tokens = data_info(tokens_dir)
    skipped: list[str] = []
    points = plan(cfg, vocab, train_tokens, skipped)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    write_json_atomic(out / "plan.json", {"config": config_to_dict(cfg), "points": [asdict(p) for p in points],
                                          "skipped": skipped})
    write_text_atomic(out / "plan.md", table(points, train_tokens, cfg.n_kind) + "\n")
    status = execute(cfg, points, tokens_dir, out, executor)
    if "paused" in status.values():
        return {"status": "paused", "points": status}
    results = [r for r in collect(out) if r["point"]["id"] in {p.id for p in points}]
    write_text_atomic(out / "runs.csv", rows_csv(results))
    runs = [result_run(r, cfg.n_kind) for r in results]
    rep = fit_all(runs, bootstrap=study.bootstrap, seed=study.seed, interval=study.interval)
    write_json_atomic(out / "fit.json", rep.to_dict())
    report: dict[str, Any] = {"status": "done", "n_kind": cfg.n_kind, "flops_rule": cfg.flops_rule,
                              "points": len(results), "sweep_seconds": sum(r["seconds"] for r in results),
                              "errors": rep.errors}
    target = study.check_multiple * max(cfg.budgets) if study.check_multiple else None
    report["stability_budget"] = target or max(cfg.budgets)
    report["stability"] = stability(runs, report["stability_budget"])
    if target:
        check = _check(cfg, rep, target, vocab, train_tokens, tokens_dir, out, executor)
        if check.get("status") == "paused":
            return {"status": "paused", "points": {"check": "paused"}}
        report["check"] = check
    from kiln.scaling.plots import plot_all

    plot_all(runs, rep, out, target)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_report(cfg, rep, report, results, train_tokens))
    write_json_atomic(out / MANIFEST, {"manifest_version": 1, "stage": "scaling", "config": config_to_dict(cfg),
                                       "study": config_to_dict(study), "inputs": {os.fspath(tokens_dir): "shards"},
                                       "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "seconds": round(time.time() - t0, 3), "stats": report})
    return report


def _check(cfg: ScalingConfig, rep: FitReport, target: float, vocab: int, train_tokens: int,
           tokens_dir: Path, out: Path, executor: Any) -> dict:
    """Train the predicted-optimal model at ``target`` FLOPs; each approach's predicted loss beside it."""
    preds = {p.approach: p for p in predict(rep, target)}
    pick = next((preds[a] for a in ("approach3", "approach2", "approach1") if a in preds), None)
    if pick is None:
        return {"error": "no approach fitted, nothing to check: " + json.dumps(rep.errors)}
    rule = cfg.shape_rule(vocab)
    model = shape_for_params(pick.n, rule, cfg.n_kind)
    p = make_point(cfg, model, target, role="check")
    moved = None
    if p.tokens > cfg.max_epochs * train_tokens:  # data-bound: the next wider rungs until it fits
        wider = [m for m in rule.ladder() if m.d_model > model.d_model]
        fits = [q for q in (make_point(cfg, m, target, role="check") for m in wider[:16])
                if q.tokens <= cfg.max_epochs * train_tokens]
        if not fits:
            return {"error": f"the check run would see the training tokens {p.tokens / train_tokens:.1f} times "
                             f"(> {cfg.max_epochs:g}); lower check_multiple or the budgets"}
        moved, p = f"{p.id} would pass over the data {p.tokens / train_tokens:.1f} times", fits[0]
    status = execute(cfg, [p], tokens_dir, out, executor)
    if status.get(p.id) == "paused":
        return {"status": "paused"}
    r = json.loads((point_dir(out, p) / "result.json").read_text())
    actual = r["val_loss"]
    row = result_run(r, cfg.n_kind)
    from kiln.scaling.fit import Parametric

    at_run = None
    if rep.approach3 is not None:
        p3 = Parametric(**{k: rep.approach3[k] for k in ("E", "A", "B", "alpha", "beta")})
        at_run = float(p3.loss(row.n, row.d))
    return {
        "budget": target, "chosen_by": pick.approach, "moved": moved, "point": p.id, "n": row.n, "tokens": r["tokens"],
        "epochs": r["epochs"], "loss": actual, "seconds": r["seconds"],
        "approach3_at_run": at_run,
        "predictions": {k: asdict(v) | {"error": v.loss - actual} for k, v in preds.items()},
    }


def stability(runs: list[Run], target: float) -> list[dict]:
    """How many sizes per budget the fits need: refit with only the k runs of each budget nearest
    its best (lowest loss), k = 3 .. all, and predict at ``target`` (no bootstrap)."""
    from kiln.scaling.fit import group_budgets

    groups = group_budgets(runs)
    most = max(len(g) for g in groups)
    rows = []
    for k in range(3, most + 1):
        sub = []
        for g in groups:
            g_sorted = sorted(g, key=lambda r: r.n)
            best = min(range(len(g_sorted)), key=lambda i: g_sorted[i].loss)
            order = sorted(range(len(g_sorted)), key=lambda i: (abs(i - best), i))  # nearest the best, in N order
            sub += [g_sorted[i] for i in order[:k]]
        rep = fit_all(sub, bootstrap=0)
        row = {"sizes_per_budget": k, "runs": len(sub), "errors": sorted(rep.errors)}
        for p in predict(rep, target):
            row[p.approach] = {"n": p.n, "loss": p.loss}
        rows.append(row)
    return rows


def _fmt_ci(ci: Any, fmt: str) -> str:
    return f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else ""


def render_report(cfg: ScalingConfig, rep: FitReport, report: dict, results: list[dict], train_tokens: int) -> str:
    """The Markdown report: the sweep's rows, the fits, predictions side by side, the check."""
    lines = [f"# Scaling study ({len(results)} points, N = {cfg.n_kind}, FLOPs = {cfg.flops_rule})", "",
             f"Sweep time: {report['sweep_seconds']:.0f} s of training steps; training tokens {train_tokens:,}.", "",
             "| point | N | tokens | epochs | C (FLOPs) | held-out loss | s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["point"]
        lines.append(f"| {p['id']} | {p['n'][cfg.n_kind]:,} | {r['tokens']:,} | {r['epochs']:.2f} | "
                     f"{p['flops_per_token'] * r['tokens']:.3e} | {r['val_loss']:.4f} | {r['seconds']:.0f} |")
    lines += ["", "## Fits", ""]
    for name in ("approach1", "approach2"):
        f = getattr(rep, name)
        if f is None:
            lines.append(f"- {name}: not fitted: {rep.errors.get(name)}")
            continue
        lines.append(f"- {name}: N_opt = {f['n_opt']['k']:.3g} C^{f['n_opt']['s']:.3f}, D_opt = "
                     f"{f['d_opt']['k']:.3g} C^{f['d_opt']['s']:.3f}, L_opt = {f['loss_opt'].get('E', 0.0):.3f} + {f['loss_opt']['k']:.3g} C^{f['loss_opt']['s']:.4f}")
    if rep.approach3 is not None:
        a = rep.approach3
        from kiln.scaling.fit import param_intervals

        ci = param_intervals(rep)
        parts = [f"{k} = {a[k]:.4g}{_fmt_ci(ci.get(k), '.4g')}" for k in ("E", "A", "B", "alpha", "beta")]
        lines.append("- approach3: L(N, D) = E + A/N^alpha + B/D^beta with " + ", ".join(parts) +
                     f"; N_opt ~ C^{a['beta'] / (a['alpha'] + a['beta']):.3f}")
    else:
        lines.append(f"- approach3: not fitted: {rep.errors.get('approach3')}")
    check = report.get("check")
    if check and "error" not in check:
        lines += ["", f"## Check at C = {check['budget']:.3e} FLOPs ({check['point']}, chosen by {check['chosen_by']})", "",
                  (f"Moved up the ladder: {check['moved']}, so the check trains a wider model than "
                   "predicted; approach 3's loss at the trained (N, D) is the fair comparison.\n\n" if check.get("moved") else "") +
                  f"Trained: N = {check['n']:,.0f}, {check['tokens']:,} tokens ({check['epochs']:.2f} epochs), "
                  f"held-out loss **{check['loss']:.4f}** ({check['seconds']:.0f} s).", "",
                  "| approach | N_opt | D_opt | predicted optimal loss | error (pred - actual) |", "|---|---|---|---|---|"]
        for k, v in check["predictions"].items():
            lines.append(f"| {k} | {v['n']:,.0f}{_fmt_ci(v['n_ci'], ',.0f')} | {v['d']:,.0f}{_fmt_ci(v['d_ci'], ',.0f')} | "
                         f"{v['loss']:.4f}{_fmt_ci(v['loss_ci'], '.4f')} | {v['error']:+.4f} |")
        if check.get("approach3_at_run") is not None:
            lines.append(f"\nApproach 3 at the trained (N, D) itself: {check['approach3_at_run']:.4f} "
                         f"(error {check['approach3_at_run'] - check['loss']:+.4f}).")
    elif check:
        lines += ["", f"Check: {check['error']}"]
    if report.get("stability"):
        head = (f"## Stability: predictions at {report['stability_budget']:.3e} FLOPs "
                "from the k sizes per budget nearest each budget's best run")
        lines += ["", head, "",
                  "| k | runs | approach 1 N / loss | approach 2 N / loss | approach 3 N / loss |", "|---|---|---|---|---|"]
        for row in report["stability"]:
            cells = [f"{row[a]['n']:,.0f} / {row[a]['loss']:.4f}" if a in row else "-" for a in
                     ("approach1", "approach2", "approach3")]
            lines.append(f"| {row['sizes_per_budget']} | {row['runs']} | " + " | ".join(cells) + " |")
    lines += ["", "![isoflops](isoflops.png)", "![power laws](power_laws.png)", "![residuals](residuals.png)", ""]
    return "\n".join(lines)


def fit_report_text(rep: FitReport, target: float | None) -> str:
    """Fits and predictions as plain text (``kiln scaling fit`` / ``predict``)."""
    out = []
    for name in ("approach1", "approach2"):
        f = getattr(rep, name)
        out.append(f"{name}: " + (f"N_opt = {f['n_opt']['k']:.4g} C^{f['n_opt']['s']:.4f}, "
                                  f"D_opt = {f['d_opt']['k']:.4g} C^{f['d_opt']['s']:.4f}"
                                  if f else f"not fitted: {rep.errors.get(name)}"))
    if rep.approach3:
        from kiln.scaling.fit import param_intervals

        a, ci = rep.approach3, param_intervals(rep)
        out.append("approach3: " + ", ".join(f"{k} {a[k]:.4g}{_fmt_ci(ci.get(k), '.4g')}"
                                               for k in ("E", "A", "B", "alpha", "beta")))
    else:
        out.append(f"approach3: not fitted: {rep.errors.get('approach3')}")
    if rep.dropped:
        out.append(f"rows left out: {rep.dropped}")
    if target:
        out.append(f"\nat C = {target:.3e} FLOPs:")
        out.append(f"{'approach':<10} {'N_opt':>28} {'D_opt':>28} {'loss':>24}")
        for p in predict(rep, target):
            out.append(f"{p.approach:<10} {p.n:>10.4g}{_fmt_ci(p.n_ci, '.3g'):>18} {p.d:>10.4g}{_fmt_ci(p.d_ci, '.3g'):>18} "
                       f"{p.loss:>7.4f}{_fmt_ci(p.loss_ci, '.4f'):>17}")
    return "\n".join(out)


def sweep_runs(out_dir: str | os.PathLike, n_kind: str = "compute", flops_rule: str | None = None) -> list[Run]:
    """The fit rows of a sweep folder's finished points (``kiln scaling fit SWEEP_DIR``)."""
    results = collect(out_dir)
    if not results:
        raise FileNotFoundError(f"{out_dir}: no finished sweep points (points/*/result.json)")
    return [result_run(r, n_kind, flops_rule) for r in results]


