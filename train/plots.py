"""Plots of workdirs' metrics: loss curves and a bar chart of one final metric across runs.

  solo compare runs/lr/* --plot lr.png               # curves of 'loss', bars of eval 'loss'
  solo compare runs/lr/* --plot lr.png --metric causal_lm/accuracy

The plotted numbers are read from each workdir's metrics.jsonl and nothing else: `series` gives
the curves (train and eval rows, by step) and `final` the bars (the last eval row's value), so a
notebook can tabulate exactly what the figure shows. matplotlib is optional (the `plot` extra);
without it only the drawing fails, with one line naming the fix.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from solo.files import write_atomic

Series = dict[str, tuple[list[int], list[float]]]  # split -> (steps, values)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of a workdir's metrics.jsonl, in file order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl; is it a solo workdir?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(workdir: str, metric: str = "loss") -> Series:
    """{'train': (steps, values), 'eval': (steps, values)}: every row that has `metric`."""
    out: Series = {}
    for row in read_metrics(workdir):
        if metric in row:
            steps, values = out.setdefault(row["split"], ([], []))
            steps.append(int(row["step"]))
            values.append(float(row[metric]))
    return out


def final(workdir: str, metric: str = "loss") -> float | None:
    """`metric` of the workdir's last eval row (None if no eval row has it)."""
    pts = series(workdir, metric).get("eval")
    return pts[1][-1] if pts else None


def run_name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def plot_data(workdirs: list[str], metric: str = "loss") -> dict[str, Any]:
    """Everything the figure draws: {'curves': {run: Series}, 'bars': {run: final value},
    'metric': metric}."""
    names = [run_name(w) for w in workdirs]
    if len(set(names)) != len(names):  # e.g. a/run and b/run: prefix the parent folder
        names = [os.path.join(*os.path.normpath(w).split(os.sep)[-2:]) for w in workdirs]
    return {"metric": metric,
            "curves": {n: series(w, metric) for n, w in zip(names, workdirs, strict=True)},
            "bars": {n: final(w, metric) for n, w in zip(names, workdirs, strict=True)}}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'solo[plot]' "
                          "(or pip install matplotlib)") from None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; a notebook's own backend stays if loaded
    import matplotlib.pyplot as plt

    return plt


def figure(data: dict[str, Any]):
    """A matplotlib figure: curves (train solid, eval dashed with markers) left, bars right."""
    plt = _pyplot()
    fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5),
                                     gridspec_kw={"width_ratios": [3, 2]})
    metric = data["metric"]
    for i, (name, curves) in enumerate(data["curves"].items()):
        color = f"C{i % 10}"
        if "train" in curves:
            ax_c.plot(*curves["train"], color=color, alpha=0.8, label=name)
        if "eval" in curves:
            ax_c.plot(*curves["eval"], color=color, linestyle="--", marker="o", markersize=3,
                      label=None if "train" in curves else name)
    ax_c.set_xlabel("step")
    ax_c.set_ylabel(metric)
    ax_c.set_title(f"{metric}: train (solid), eval (dashed)")
    if data["curves"]:
        ax_c.legend(fontsize=7)
    bars = {k: v for k, v in data["bars"].items() if v is not None and math.isfinite(v)}
    names = list(bars)
    ax_b.barh(range(len(names)), [bars[n] for n in names],
              color=[f"C{list(data['curves']).index(n) % 10}" for n in names])
    ax_b.set_yticks(range(len(names)), names, fontsize=7)
    ax_b.invert_yaxis()
    for y, n in enumerate(names):
        ax_b.text(bars[n], y, f" {bars[n]:.4g}", va="center", fontsize=7)
    ax_b.set_xlabel(f"final eval {metric}")
    fig.tight_layout()
    return fig


def save_plot(workdirs: list[str], path: str, metric: str = "loss") -> dict[str, Any]:
    """Draws `plot_data(workdirs, metric)` into `path` (format from its suffix: .png, .svg,
    .pdf), written atomically; returns the plotted data."""
    import io

    data = plot_data(workdirs, metric)
    if not any(data["curves"].values()):
        raise ValueError(f"no row of {', '.join(workdirs)} has metric {metric!r}; "
                         "pick one their metrics.jsonl holds (e.g. loss)")
    fig = figure(data)
    buf = io.BytesIO()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=110)
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())
    return data
