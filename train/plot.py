"""`train plot RUN_DIR`: a run's metrics.jsonl drawn to one PNG (matplotlib, no display).

Six panels against the step: the positive loss terms (total, velocity, manifold; log
scale), the REPA term (negative cosine similarity, linear), the gradient norm, the
learning rate, throughput (images/s) and the fraction of step time spent waiting for data. Lines a crash cut short
and non-finite values (written as strings) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from cache.format import atomic_file

LOSS_TERMS = ("loss", "loss_v", "loss_ml")


class PlotError(ValueError):
    """No metrics to draw."""


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} a run directory of `train run`?")
    rows = read_metrics(path)
    if not rows:
        raise PlotError(f"{path} holds no metrics yet (one line per log_every steps)")
    out = Path(out) if out else run_dir / "metrics.png"

    fig, axes = plt.subplots(2, 3, figsize=(15, 7), constrained_layout=True)
    ax = axes[0, 0]
    for key in LOSS_TERMS:
        steps, vals = _series(rows, key)
        if vals:
            ax.plot(steps, vals, label=key, lw=1.2 if key == "loss" else 0.9)
    ax.set_yscale("log")
    ax.set_title("loss terms")
    ax.legend(fontsize=8)
    panels = [(axes[0, 1], "loss_repa", "REPA term (-cos similarity)", 1.0),
              (axes[0, 2], "grad_norm", "gradient norm (before clipping)", 1.0),
              (axes[1, 0], "lr", "learning rate", 1.0),
              (axes[1, 1], "img_per_s", "throughput (images/s, all processes)", 1.0),
              (axes[1, 2], "data_wait", "data wait (% of step time)", 100.0)]
    for ax, key, title, mult in panels:
        steps, vals = _series(rows, key)
        ax.plot(steps, [v * mult for v in vals], lw=1)
        ax.set_title(title)
    if _series(rows, "data_wait")[1]:
        axes[1, 2].set_ylim(bottom=0)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    last = rows[-1]
    fig.suptitle(f"{run_dir.name}: step {last['step']:,}, loss {last.get('loss', float('nan')):.4g}"
                 if isinstance(last.get("loss"), (int, float)) else run_dir.name)
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out
