"""Ablation sweeps: one experiment over a grid of overrides, one workdir per point, one table.

  solo sweep CONFIG --workdir runs/lr --sweep.optim.lr=1e-3,3e-3 --sweep.model.num_layers=2,4
  solo compare runs/lr/*            # the same table for any workdirs

Every point's config is built and validated before anything trains, so a typo in the last point
fails at once. Points run one after the other in `<workdir>/<key=value,...>/`, each an ordinary
workdir (resumable, `solo eval`-able). Running the sweep again skips finished points and resumes
a stopped one, so a preempted sweep continues where it stopped. After each point the table of
every point so far (its final eval metrics, best eval loss first) is printed and written to
`<workdir>/summary.json`.

A `--sweep.KEY=` list is split on commas; to sweep values that contain commas (data mixtures),
repeat the flag once per value.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from solo import multihost
from solo.config import ConfigError, RunConfig
from solo.experiments import load_config
from solo.files import join, path, write_atomic
from solo.train import workdir as wd_lib

SUMMARY_FILE = "summary.json"


def parse_grid(flags: list[str]) -> list[tuple[str, list[str]]]:
    """['--sweep.a.b=1,2', ...] -> [('a.b', ['1', '2']), ...] in first-seen key order."""
    grid: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for flag in flags:
        key, sep, value = flag.removeprefix("--sweep.").partition("=")
        if not sep or not key:
            raise ConfigError(f"sweep flag {flag!r}: expected --sweep.KEY=VALUE[,VALUE...]")
        grid.setdefault(key, []).append(value)
        counts[key] = counts.get(key, 0) + 1
    # one flag: a comma-separated list; repeated flags: one value each (values with commas)
    return [(k, v[0].split(",") if counts[k] == 1 else v) for k, v in grid.items()]


def points(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product as override lists, the last key varying fastest."""
    keys = [k for k, _ in grid]
    return [[f"--config.{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(values for _, values in grid))]


def point_name(overrides: list[str]) -> str:
    """Directory name of a point: 'optim.lr=1e-3,model.num_layers=2' ('/' -> '_')."""
    return ",".join(o.removeprefix("--config.") for o in overrides).replace("/", "_")


def run_sweep(config_name: str, grid: list[tuple[str, list[str]]], workdir: str,
              base_overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Trains every point of the grid (see module docstring); returns the summary rows."""
    from solo.train import parallel
    from solo.train.loop import train_and_evaluate, validate_config

    if not grid:
        raise ConfigError("a sweep needs at least one --sweep.KEY=VALUE[,VALUE...]")
    runs = []
    for overrides in points(grid):  # validate every point before training any
        config = RunConfig.from_config(load_config(config_name, list(base_overrides) + overrides))
        multihost.initialize(config.dist)  # before the mesh uses devices (multi-host sweeps)
        validate_config(config, parallel.make_mesh(config.train.mesh))
        runs.append((join(workdir, point_name(overrides)), config))
    rows = []
    for i, (run_dir, config) in enumerate(runs, 1):
        name = path(run_dir).name
        if (wd_lib.latest_step(run_dir) or 0) >= config.train.steps:
            print(f"sweep {i}/{len(runs)}: {name} finished earlier", flush=True)
        else:
            print(f"sweep {i}/{len(runs)}: {name}", flush=True)
            train_and_evaluate(config, run_dir)
        rows = summarize([r for r, _ in runs[:i]])
        if multihost.is_primary():
            write_atomic(join(workdir, SUMMARY_FILE), json.dumps(rows, indent=1))
        print(format_table(rows), flush=True)
    return rows


def summarize(workdirs: list[str]) -> list[dict[str, Any]]:
    """Per workdir: {'run', 'step', eval metrics ('eval/...'), 'tokens_per_sec'} from its
    metrics.jsonl (the last eval and train rows), best eval loss first."""
    rows = []
    for wd in workdirs:
        metrics = path(join(wd, "metrics.jsonl"))  # local or gs:// (solo.files)
        if not metrics.exists():
            raise FileNotFoundError(f"{wd} has no metrics.jsonl; is it a solo workdir?")
        last: dict[str, dict] = {}
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            last[rec["split"]] = rec
        ev, tr = last.get("eval", {}), last.get("train", {})
        row = {"run": path(wd).name, "step": ev.get("step", 0)}
        row.update({f"eval/{k}": v for k, v in sorted(ev.items()) if k not in ("step", "split")})
        row["tokens_per_sec"] = tr.get("tokens_per_sec")
        rows.append(row)
    key = lambda r: (r.get("eval/loss") is None or not math.isfinite(r["eval/loss"]),
                     r.get("eval/loss") or 0.0)
    return sorted(rows, key=key)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: one line per run, the columns every row may have."""
    if not rows:
        return "(no runs)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)
