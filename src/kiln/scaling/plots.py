"""PNG plots of a fit: IsoFLOP curves with their parabolas and approach 3's curves, the power laws
N_opt(C) and D_opt(C) of the three approaches, and approach 3's residuals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.scaling.fit import (
    FitReport,
    Parametric,
    PowerLaw,
    Run,
    compute_optimal,
    group_budgets,
)

COLORS = {"approach1": "tab:blue", "approach2": "tab:orange", "approach3": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _p3(rep: FitReport) -> Parametric | None:
    if rep.approach3 is None:
        return None
    return Parametric(**{k: rep.approach3[k] for k in ("E", "A", "B", "alpha", "beta")})


def plot_isoflops(runs: Sequence[Run], rep: FitReport, path: Path) -> Path:
    """Loss against N per budget: the runs, approach 2's parabolas, approach 3's curve along C = const."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = group_budgets(runs)
    cmap = plt.get_cmap("viridis")
    p3 = _p3(rep)
    flops = PowerLaw(**rep.flops)
    curves = {round(math.log(c["budget"]), 6): c for c in (rep.approach2 or {}).get("detail", {}).get("curves", [])}
    for i, g in enumerate(groups):
        col = cmap(i / max(len(groups) - 1, 1))
        ns = np.array([r.n for r in g])
        ax.scatter(ns, [r.loss for r in g], color=col, s=18, zorder=3)
        budget = g[0].budget if g[0].budget is not None else float(np.exp(np.mean(np.log([r.c for r in g]))))
        grid = np.exp(np.linspace(np.log(ns.min()) - 0.3, np.log(ns.max()) + 0.3, 60))
        c2 = curves.get(round(math.log(budget), 6))
        if c2 is not None:
            p0, p1, p2 = c2["coef"]
            ax.plot(grid, p0 * np.log(grid) ** 2 + p1 * np.log(grid) + p2, color=col, lw=1)
            ax.scatter([c2["n_star"]], [c2["loss_star"]], color=col, marker="x", s=40)
        if p3 is not None:
            ax.plot(grid, p3.loss(grid, budget / flops(grid)), color=col, lw=1, ls="--")
        ax.annotate(f"{budget:.1e}", (ns.min(), g[int(np.argmin(ns))].loss), fontsize=7, color=col)
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("IsoFLOP curves: runs, approach 2 parabolas (solid), approach 3 (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_power_laws(rep: FitReport, path: Path, c_range: tuple[float, float]) -> Path:
    """N_opt(C) and D_opt(C) of every approach over ``c_range`` (FLOPs), with approach 2's vertices."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    cs = np.exp(np.linspace(math.log(c_range[0]), math.log(c_range[1]), 50))
    flops = PowerLaw(**rep.flops)
    for name in ("approach1", "approach2", "approach3"):
        params = getattr(rep, name)
        if params is None:
            continue
        if name == "approach3":
            pts = np.array([compute_optimal(_p3(rep), c, flops)[:2] for c in cs])
            n, d = pts[:, 0], pts[:, 1]
        else:
            n, d = PowerLaw(**params["n_opt"])(cs), PowerLaw(**params["d_opt"])(cs)
        for ax, y in zip(axes, (n, d)):
            ax.plot(cs, y, color=COLORS[name], label=name)
    if rep.approach2:
        cv = rep.approach2["detail"]["curves"]
        axes[0].scatter([c["budget"] for c in cv], [c["n_star"] for c in cv], color=COLORS["approach2"], s=15)
        axes[1].scatter([c["budget"] for c in cv], [c["d_star"] for c in cv], color=COLORS["approach2"], s=15)
    if rep.approach1:
        det = rep.approach1["detail"]
        axes[0].scatter(det["c"], det["n"], color=COLORS["approach1"], s=6)
    for ax, what in zip(axes, ("N_opt (parameters)", "D_opt (tokens)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (FLOPs)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_residuals(runs: Sequence[Run], rep: FitReport, path: Path) -> Path | None:
    """Approach 3's log-residuals (log predicted - log observed) against C."""
    p3 = _p3(rep)
    if p3 is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    res = [math.log(p3.loss(r.n, r.d)) - math.log(r.loss) for r in runs]
    ax.scatter([r.c for r in runs], res, s=12, c=np.log([r.n for r in runs]), cmap="viridis")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("C (FLOPs)")
    ax.set_ylabel("log L_fit - log L")
    ax.set_title(f"approach 3 residuals (RMS {float(np.sqrt(np.mean(np.square(res)))):.4f}); colour: ln N")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(runs: Sequence[Run], rep: FitReport, out_dir: Path, target: float | None = None) -> list[Path]:
    """The three PNGs into ``out_dir``; the power-law panel reaches ``target`` FLOPs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cs = [r.c for r in runs]
    hi = max(max(cs), target or 0.0)
    paths = [plot_isoflops(runs, rep, out_dir / "isoflops.png"),
             plot_power_laws(rep, out_dir / "power_laws.png", (min(cs), hi))]
    r = plot_residuals(runs, rep, out_dir / "residuals.png")
    return paths + ([r] if r else [])
