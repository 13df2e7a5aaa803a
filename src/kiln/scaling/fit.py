"""Chinchilla's three ways from (N, D, C, loss) runs to the compute-optimal N, D and loss.

The math is pure functions of numpy arrays; ``fit_all`` runs the three with bootstrap intervals and
``predict`` reads a fit back at any budget.

- **Approach 1** (``approach1``): the envelope of training curves. Every run's loss curve is placed
  on a FLOPs axis; at each compute C the lowest loss over all runs picks the best N; ``N_opt(C)``
  and ``D_opt(C)`` are then power laws fitted to the envelope (least squares in log-log). Rows
  without curves (a CSV of final losses) give one point per run, so the envelope is the best run of
  each budget.
- **Approach 2** (``approach2``): per budget (an IsoFLOP curve), a parabola of loss in ln N; its
  vertex is that budget's optimum (N*, D*, L*); power laws through the vertices. Needs three or more
  sizes per budget and two or more budgets.
- **Approach 3** (``approach3``): ``L(N, D) = E + A / N^alpha + B / D^beta`` fitted in the LSE form
  ``log L = LSE(a - alpha ln N, b - beta ln D, e)`` (A = e^a, B = e^b, E = e^e) by the Huber loss
  (delta 1e-3) of the log-residuals, minimized by L-BFGS from a grid of starts: Hoffmann et al.
  (arXiv:2203.15556, section 3.3) and Besiroglu et al.'s replication (Epoch AI, arXiv:2404.10102),
  whose grid this is (e in {-1..1.5}, a and b in {0..25}, alpha and beta in {0..2}; 4,500 starts).
  The objective is evaluated at every start at once and L-BFGS runs from the best ``top_starts``
  of them (the others end in the same or worse minima; the full grid is one flag away).

The loss of approaches 1 and 2 at the optimum is extrapolated by a saturating power law in C
fitted to the envelope or to the vertices (``L*(C) = E + k C^s``, ``fit_saturating``; a pure power
law with two budgets). Every
approach gets bootstrap intervals: runs resampled with replacement (approach 2: within each budget;
approach 1: whole curves), the fit repeated, the 5th and 95th percentiles reported.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HUBER_DELTA = 1e-3
"""Huber's delta on log-residuals (Hoffmann et al.; Besiroglu et al.)."""
EPOCH_GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
"""Besiroglu et al.'s grid of L-BFGS starts for approach 3."""


@dataclass(frozen=True)
class Run:
    """One training run: N parameters, D tokens, C FLOPs, final loss (nats/token).

    ``budget`` groups runs of one IsoFLOP curve (None: grouped by C). ``curve_c`` / ``curve_loss``:
    its loss curve on a FLOPs axis (approach 1), ascending C; empty for a final point only."""

    n: float
    d: float
    c: float
    loss: float
    budget: float | None = None
    curve_c: tuple[float, ...] = ()
    curve_loss: tuple[float, ...] = ()


# -- input --------------------------------------------------------------------------------------

_ALIASES = {
    "n": ("n", "params", "parameters", "model size", "model_size", "N"),
    "d": ("d", "tokens", "data", "D"),
    "c": ("c", "flops", "compute", "training flop", "training_flop", "C"),
    "loss": ("loss", "val_loss", "L"),
    "budget": ("budget",),
}


def _column(header: Sequence[str], key: str) -> str | None:
    low = {h.strip().lower(): h for h in header}
    for alias in _ALIASES[key]:
        if alias.lower() in low:
            return low[alias.lower()]
    return None


def load_runs(path: str | Path, skip_bad: bool = False) -> tuple[list[Run], dict[str, int]]:
    """Runs from a CSV (header row) or JSON (a list of objects, or ``{"runs": [...]}``) of
    (N, D or C, loss) rows; column names as in ``_ALIASES`` ("Model Size", "Training FLOP" and
    "loss" read Epoch's Chinchilla extraction). A missing D is C / (6N), a missing C is 6ND.

    A bad row (unparsable, NaN or infinite, N, D, C or loss <= 0) raises a ValueError naming its line
    and what is wrong; with ``skip_bad`` it is left out and counted in the returned
    ``{reason: count}`` instead."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (a CSV or JSON of N, D or C, loss rows, or a sweep folder)")
    if p.suffix.lower() == ".json":
        obj = json.loads(p.read_text())
        records = obj["runs"] if isinstance(obj, dict) else obj
        header = sorted({k for r in records for k in r})
        lines = [(i + 1, r) for i, r in enumerate(records)]
        where = "record"
    else:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            lines = [(i + 2, r) for i, r in enumerate(reader)]  # line 1 is the header
        where = "line"
    cols = {k: _column(header, k) for k in _ALIASES}
    if cols["n"] is None or cols["loss"] is None or (cols["d"] is None and cols["c"] is None):
        raise ValueError(f"{p}: needs columns for N (one of {_ALIASES['n']}), loss, and D or C "
                         f"(one of {_ALIASES['d']} / {_ALIASES['c']}); found {list(header)}")
    runs, dropped, bad = [], {}, []
    for line, rec in lines:
        try:
            vals = {k: float(rec[c]) for k, c in cols.items() if c is not None and rec.get(c) not in (None, "")}
        except (TypeError, ValueError):
            reason = "unparsable"
        else:
            reason = _bad_reason(vals)
        if reason is None:
            n, loss = vals["n"], vals["loss"]
            d = vals.get("d", vals.get("c", 0.0) / (6 * n))
            c = vals.get("c", 6 * n * d)
            runs.append(Run(n=n, d=d, c=c, loss=loss, budget=vals.get("budget")))
            continue
        dropped[reason] = dropped.get(reason, 0) + 1
        bad.append(f"{where} {line}: {reason} ({dict(rec)})")
    if bad and not skip_bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{p}: {len(bad)} bad row(s): " + "; ".join(bad[:5]) + more +
                         ". Fix them, or pass --skip-bad to leave them out (they are counted in the report)")
    return runs, dropped


def _bad_reason(vals: dict[str, float]) -> str | None:
    for k in ("n", "loss", "d", "c"):
        if k not in vals:
            if k in ("n", "loss"):
                return f"missing {k}"
            continue
        v = vals[k]
        if not math.isfinite(v):
            return f"non-finite {k}"
        if v <= 0:
            return f"non-positive {k}"
    if "d" not in vals and "c" not in vals:
        return "missing D and C"
    return None


def check_runs(runs: Sequence[Run]) -> None:
    """Refuse arrays a fit would turn into garbage (the same checks ``load_runs`` makes per row)."""
    for i, r in enumerate(runs):
        reason = _bad_reason({"n": r.n, "d": r.d, "c": r.c, "loss": r.loss})
        if reason:
            raise ValueError(f"run {i} ({r}): {reason}; every N, D, C and loss must be finite and > 0")


def group_budgets(runs: Sequence[Run], gap_decades: float = 0.1) -> list[list[Run]]:
    """IsoFLOP groups: by ``budget`` where every run has one, else runs whose C lie within
    ``gap_decades`` of the previous one (C read off a plot scatters around its budget)."""
    if runs and all(r.budget is not None for r in runs):
        keys = sorted({r.budget for r in runs})
        return [[r for r in runs if r.budget == k] for k in keys]
    order = sorted(runs, key=lambda r: r.c)
    groups: list[list[Run]] = []
    for r in order:
        if groups and math.log10(r.c) - math.log10(groups[-1][-1].c) <= gap_decades:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _budget_of(group: Sequence[Run]) -> float:
    b = group[0].budget
    return float(b) if b is not None else float(np.exp(np.mean([math.log(r.c) for r in group])))


# -- power laws ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerLaw:
    """``y = E + k * x^s`` (E = 0: a pure power law, fitted by least squares in log-log)."""

    k: float
    s: float
    E: float = 0.0

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.k * np.asarray(x, dtype=float) ** self.s


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least squares of ln y = ln k + s ln x; needs two or more distinct x."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(np.unique(lx)) < 2:
        raise ValueError("a power law needs two or more distinct budgets")
    s, lk = np.polyfit(lx, ly, 1)
    return PowerLaw(k=float(np.exp(lk)), s=float(s))


def fit_saturating(x: Sequence[float], y: Sequence[float], grid: int = 200) -> PowerLaw:
    """``y = E + k x^s`` with 0 <= E < min(y): for each E of a grid, least squares of ln(y - E) on
    ln x; the E whose curve is closest to y. Loss flattens toward the irreducible E, so a pure
    power law extrapolated in C undershoots (measured: 5% low one decade out on Hoffmann's L);
    with two points this is a pure power law (three points fit E, k, s exactly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 3:
        return fit_power_law(x, y)
    best = None
    for e in np.linspace(0.0, 0.99 * y.min(), grid):  # E below every loss
        s, lk = np.polyfit(np.log(x), np.log(y - e), 1)
        err = float(np.sum((e + np.exp(lk) * x ** s - y) ** 2))
        if best is None or err < best[0]:
            best = (err, PowerLaw(k=float(np.exp(lk)), s=float(s), E=float(e)))
    return best[1]


# -- approach 1 ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Envelope:
    """Approach 1's result: the envelope points and the power laws through them."""

    c: tuple[float, ...]
    n: tuple[float, ...]
    d: tuple[float, ...]
    loss: tuple[float, ...]
    n_opt: PowerLaw
    d_opt: PowerLaw
    loss_opt: PowerLaw


def approach1(runs: Sequence[Run], grid_points: int = 40) -> Envelope:
    """The minimum loss per FLOP across runs (see the module docstring); needs two or more budgets."""
    check_runs(runs)
    curved = [r for r in runs if len(r.curve_c) >= 2]
    if curved:
        ends = [r.c for r in curved]
        grid = np.exp(np.linspace(math.log(min(ends)), math.log(max(ends)), grid_points))
        pts = []
        for c in grid:
            best = None
            for r in curved:
                cc = np.asarray(r.curve_c)
                if not cc[0] <= c <= cc[-1] * (1 + 1e-9):
                    continue
                loss = float(np.interp(math.log(c), np.log(cc), np.asarray(r.curve_loss)))
                if best is None or loss < best[0]:
                    best = (loss, r)
            if best is not None:
                loss, r = best
                pts.append((float(c), r.n, c * r.d / r.c, loss))  # D at c: the run's tokens per FLOP
    else:
        pts = []
        for g in group_budgets(runs):
            r = min(g, key=lambda r: r.loss)
            pts.append((r.c, r.n, r.d, r.loss))
    if len({p[0] for p in pts}) < 2:
        raise ValueError("approach 1 needs runs at two or more budgets (or loss curves spanning them)")
    c, n, d, loss = (tuple(v) for v in zip(*pts))
    return Envelope(c=c, n=n, d=d, loss=loss, n_opt=fit_power_law(c, n), d_opt=fit_power_law(c, d),
                    loss_opt=fit_saturating(c, loss))


# -- approach 2 ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class IsoFlop:
    """One budget's parabola ``loss = p0 (ln N)^2 + p1 ln N + p2`` and its vertex."""

    budget: float
    coef: tuple[float, float, float]
    n_star: float
    d_star: float
    loss_star: float
    n_range: tuple[float, float]
    inside: bool  # the vertex lies within the sizes trained (else it is extrapolated)


@dataclass(frozen=True)
class Parabolas:
    """Approach 2's result."""

    curves: tuple[IsoFlop, ...]
    n_opt: PowerLaw
    d_opt: PowerLaw
    loss_opt: PowerLaw
    skipped: tuple[str, ...] = ()


def isoflop_parabola(group: Sequence[Run]) -> IsoFlop:
    """Fit one budget's parabola in ln N; D at the vertex from the line ln D ~ ln N of the group."""
    budget = _budget_of(group)
    ln_n = np.log([r.n for r in group])
    if len(np.unique(ln_n)) < 3:
        raise ValueError(f"budget {budget:.3g}: {len(np.unique(ln_n))} distinct size(s); a parabola needs "
                         "three or more sizes per budget (add sizes to this budget)")
    p0, p1, p2 = np.polyfit(ln_n, [r.loss for r in group], 2)
    if not p0 > 0:
        raise ValueError(f"budget {budget:.3g}: the losses do not curve upward in ln N (no minimum): "
                         "the sizes do not bracket the optimum; add smaller and larger models")
    x = -p1 / (2 * p0)
    s, i = np.polyfit(ln_n, np.log([r.d for r in group]), 1)
    return IsoFlop(budget=budget, coef=(float(p0), float(p1), float(p2)), n_star=float(np.exp(x)),
                   d_star=float(np.exp(i + s * x)), loss_star=float(p2 - p1 * p1 / (4 * p0)),
                   n_range=(float(np.exp(ln_n.min())), float(np.exp(ln_n.max()))),
                   inside=bool(ln_n.min() <= x <= ln_n.max()))


def approach2(runs: Sequence[Run]) -> Parabolas:
    """A parabola per budget, power laws through the vertices; budgets with fewer than three sizes or
    no minimum are skipped (said in ``skipped``); two or more usable budgets are needed."""
    check_runs(runs)
    curves, skipped = [], []
    for g in group_budgets(runs):
        try:
            curves.append(isoflop_parabola(g))
        except ValueError as e:
            skipped.append(str(e))
    if len(curves) < 2:
        why = ("; ".join(skipped) + ". ") if skipped else ""
        raise ValueError(f"approach 2 needs two or more budgets with three or more sizes each; "
                         f"{len(curves)} usable. {why}")
    b = [c.budget for c in curves]
    return Parabolas(curves=tuple(curves), n_opt=fit_power_law(b, [c.n_star for c in curves]),
                     d_opt=fit_power_law(b, [c.d_star for c in curves]),
                     loss_opt=fit_saturating(b, [c.loss_star for c in curves]), skipped=tuple(skipped))


# -- approach 3 ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parametric:
    """Approach 3's result: ``L(N, D) = E + A / N^alpha + B / D^beta`` and the fit's objective."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = 0.0
    starts: int = 0

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        """Predicted loss at N parameters and D tokens."""
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of ``r`` and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    return np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta)), np.where(quad, r, delta * np.sign(r))


def _objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of log-residuals and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])  # (3, R)
    m = t.max(0)
    w = np.exp(t - m)
    s = w.sum(0)
    lse = m + np.log(s)
    w /= s  # softmax weights: d lse / d t
    h, dh = _huber(lse - ln_l, delta)
    g = np.array([(dh * w[0]).sum(), (dh * w[1]).sum(), (dh * w[2]).sum(),
                  -(dh * w[0] * ln_n).sum(), -(dh * w[1] * ln_d).sum()])
    return float(h.sum()), g


def _grid_objective(grid: np.ndarray, ln_n, ln_d, ln_l, delta: float) -> np.ndarray:
    """The objective at every row of ``grid`` (S, 5) at once: (S,)."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    t = np.stack([a - alpha * ln_n, b - beta * ln_d, np.broadcast_to(e, (len(grid), len(ln_n)))])  # (3, S, R)
    lse = np.logaddexp.reduce(t, axis=0)
    return _huber(lse - ln_l, delta)[0].sum(1)


def epoch_grid() -> np.ndarray:
    """Besiroglu et al.'s 4,500 starts as rows (a, b, e, alpha, beta)."""
    g = EPOCH_GRID
    mesh = np.meshgrid(g["a"], g["b"], g["e"], g["alpha"], g["beta"], indexing="ij")
    return np.stack([m.ravel() for m in mesh], 1)


def _scipy_optimize():
    try:
        import scipy.optimize
    except ImportError as e:
        raise RuntimeError("the scaling-law fits need scipy: pip install 'kiln[scaling]'") from e
    return scipy.optimize


def approach3(runs: Sequence[Run], delta: float = HUBER_DELTA, top_starts: int = 16,
              starts: np.ndarray | None = None) -> Parametric:
    """Fit ``L(N, D)`` by Huber (``delta``) on log-residuals, L-BFGS from the ``top_starts`` best of
    ``starts`` (default: Besiroglu et al.'s grid); ``top_starts=0`` runs from every start."""
    minimize = _scipy_optimize().minimize

    check_runs(runs)
    if len(runs) < 6 or len({r.n for r in runs}) < 2 or len({r.d for r in runs}) < 2:
        raise ValueError(f"approach 3 fits 5 parameters: it needs six or more runs over two or more sizes and "
                         f"token counts; got {len(runs)} runs")
    ln_n = np.log([r.n for r in runs])
    ln_d = np.log([r.d for r in runs])
    ln_l = np.log([r.loss for r in runs])
    grid = epoch_grid() if starts is None else np.atleast_2d(np.asarray(starts, float))
    if top_starts and len(grid) > top_starts:
        grid = grid[np.argsort(_grid_objective(grid, ln_n, ln_d, ln_l, delta))[:top_starts]]
    best = None
    with _one_blas_thread():
        for x0 in grid:
            # Tolerances far below the defaults: the Huber sum is ~1e-3 here, and stopping at scipy's
            # defaults leaves B off by ~15% on Chinchilla's points (Besiroglu et al.'s finding).
            res = minimize(_objective, x0, args=(ln_n, ln_d, ln_l, delta), jac=True, method="L-BFGS-B",
                           options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
            if best is None or res.fun < best.fun:
                best = res
    a, b, e, alpha, beta = best.x
    return Parametric(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                      beta=float(beta), objective=float(best.fun), starts=len(grid))


def _one_blas_thread():
    """L-BFGS-B's tiny BLAS calls on many threads spin for ~15 ms each on a busy machine (measured:
    2.6 s against 0.14 s per fit on 2 shared cores); one thread, where threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def compute_optimal(p: Parametric, c: float, flops: PowerLaw | None = None) -> tuple[float, float, float]:
    """(N_opt, D_opt, loss) minimizing ``p.loss`` at compute ``c``: with ``flops`` (C/D = k N^s,
    the runs' FLOPs per token) along C = flops(N) D, else along C = 6 N D (Hoffmann et al.'s
    closed form, ``N_opt = G (C/6)^(beta/(alpha+beta))``)."""
    minimize_scalar = _scipy_optimize().minimize_scalar
    if flops is None:
        flops = PowerLaw(k=6.0, s=1.0)
    if p.alpha <= 0 or p.beta <= 0:
        raise ValueError(f"the fit has alpha={p.alpha:.3g}, beta={p.beta:.3g}: no compute-optimal point "
                         "(a non-positive exponent means loss does not fall with that resource)")

    def loss_at(ln_n: float) -> float:
        n = math.exp(ln_n)
        return float(p.loss(n, c / float(flops(n))))

    # The optimum under C = 6ND as a start: N_opt = G (C/6)^a, G = (alpha A / (beta B))^(1/(alpha+beta))
    g = (p.alpha * p.A / (p.beta * p.B)) ** (1 / (p.alpha + p.beta))
    x0 = math.log(g) + p.beta / (p.alpha + p.beta) * math.log(c / 6)
    r = minimize_scalar(loss_at, bracket=(x0 - 1, x0 + 1), tol=1e-10)
    n = math.exp(float(r.x))
    return n, c / float(flops(n)), float(r.fun)


# -- everything, with intervals ------------------------------------------------------------------

@dataclass
class FitReport:
    """The three approaches' fits, bootstrap samples and notes; JSON round-trips through ``to_dict``."""

    n_runs: int
    approach1: dict | None = None
    approach2: dict | None = None
    approach3: dict | None = None
    flops: dict | None = None  # PowerLaw of C/D against N
    errors: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # per approach: list of parameter dicts
    interval: float = 0.9

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FitReport:
        return cls(**d)


def _laws(fit: Envelope | Parabolas) -> dict:
    return {"n_opt": asdict(fit.n_opt), "d_opt": asdict(fit.d_opt), "loss_opt": asdict(fit.loss_opt)}


def fit_all(runs: Sequence[Run], bootstrap: int = 100, seed: int = 0, top_starts: int = 16,
            dropped: dict | None = None, interval: float = 0.9) -> FitReport:
    """Every approach that the runs allow, each with ``bootstrap`` resampled refits (0: none); an
    approach that cannot fit records its reason in ``errors`` instead of a number."""
    check_runs(runs)
    rep = FitReport(n_runs=len(runs), dropped=dict(dropped or {}), interval=interval)
    rep.flops = asdict(fit_power_law([r.n for r in runs], [r.c / r.d for r in runs])) \
        if len({r.n for r in runs}) > 1 else {"k": runs[0].c / runs[0].d / runs[0].n, "s": 1.0}
    rng = np.random.default_rng(seed)
    groups = group_budgets(runs)
    fits = {"approach1": (approach1, lambda: [runs[i] for i in rng.integers(0, len(runs), len(runs))]),
            "approach2": (approach2, lambda: [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]),
            "approach3": (None, lambda: [runs[i] for i in rng.integers(0, len(runs), len(runs))])}
    for name, (fn, resample) in fits.items():
        try:
            if name == "approach3":
                p = approach3(runs, top_starts=top_starts)
                rep.approach3 = asdict(p)
                # Each refit starts from the full fit and the best few grid points (a resample's optimum is near).
                refit = lambda rs, p=p: asdict(approach3(rs, top_starts=4, starts=np.vstack([p.theta, _best_grid(rs, 3)])))
            else:
                f = fn(runs)
                setattr(rep, name, _laws(f) | {"detail": _detail(f)})
                refit = lambda rs, fn=fn: _laws(fn(rs))
        except ValueError as e:
            rep.errors[name] = str(e)
            continue
        samples = []
        for _ in range(bootstrap):
            try:
                samples.append(refit(resample()))
            except ValueError:  # a resample without enough budgets or sizes: not a sample
                pass
        rep.samples[name] = samples
    return rep


def _best_grid(runs: Sequence[Run], k: int) -> np.ndarray:
    ln_n, ln_d, ln_l = (np.log([getattr(r, a) for r in runs]) for a in ("n", "d", "loss"))
    g = epoch_grid()
    return g[np.argsort(_grid_objective(g, ln_n, ln_d, ln_l, HUBER_DELTA))[:k]]


def _detail(f: Envelope | Parabolas) -> dict:
    if isinstance(f, Envelope):
        return {"c": f.c, "n": f.n, "d": f.d, "loss": f.loss}
    return {"curves": [asdict(c) for c in f.curves], "skipped": list(f.skipped)}


@dataclass(frozen=True)
class Prediction:
    """One approach's compute-optimal point at a budget, each with its (low, high) interval."""

    approach: str
    c: float
    n: float
    d: float
    loss: float
    n_ci: tuple[float, float] | None = None
    d_ci: tuple[float, float] | None = None
    loss_ci: tuple[float, float] | None = None


def _point(name: str, params: dict, c: float, flops: PowerLaw) -> tuple[float, float, float]:
    if name == "approach3":
        keys = ("E", "A", "B", "alpha", "beta")
        return compute_optimal(Parametric(**{k: params[k] for k in keys}), c, flops)
    return tuple(float(PowerLaw(**params[k])(c)) for k in ("n_opt", "d_opt", "loss_opt"))


def predict(rep: FitReport, c: float) -> list[Prediction]:
    """Compute-optimal N, D and loss at budget ``c`` (FLOPs, in the runs' units) from each approach
    that fitted, with the bootstrap's central ``rep.interval`` interval."""
    if not c > 0:
        raise ValueError(f"budget {c} must be > 0 FLOPs")
    flops = PowerLaw(**rep.flops)
    out = []
    q = (50 * (1 - rep.interval), 50 * (1 + rep.interval))
    for name in ("approach1", "approach2", "approach3"):
        params = getattr(rep, name)
        if params is None:
            continue
        n, d, loss = _point(name, params, c, flops)
        cis: list[tuple[float, float] | None] = [None, None, None]
        pts = []
        for s in rep.samples.get(name, []):
            try:
                pts.append(_point(name, s, c, flops))
            except ValueError:
                pass
        if len(pts) >= 10:
            arr = np.asarray(pts)
            cis = [tuple(float(v) for v in np.percentile(arr[:, i], q)) for i in range(3)]
        out.append(Prediction(name, c, n, d, loss, *cis))
    return out


def param_intervals(rep: FitReport) -> dict[str, tuple[float, float]]:
    """Approach 3's parameters' bootstrap intervals (central ``rep.interval``)."""
    q = (50 * (1 - rep.interval), 50 * (1 + rep.interval))
    s = rep.samples.get("approach3", [])
    if len(s) < 10:
        return {}
    return {k: tuple(float(v) for v in np.percentile([x[k] for x in s], q)) for k in ("E", "A", "B", "alpha", "beta")}
