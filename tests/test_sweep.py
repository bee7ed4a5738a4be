"""`solo sweep` / `solo compare`: grid expansion, up-front validation, one workdir per point,
the summary table against each workdir's own metrics, skipping finished points, --parallel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solo.cli import main
from solo.experiments import ConfigError
from solo.train import plots
from solo.train.sweep import format_table, parse_grid, point_name, points, run_sweep, summarize

FAST = ["--config.train.steps=6", "--config.train.eval_every=3", "--config.train.log_every=3",
        "--config.train.ckpt_every=3", "--config.train.eval_batches=2"]


def last_eval(workdir: Path) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"][-1]


def test_grid_parsing_and_expansion():
    grid = parse_grid(["--sweep.optim.lr=1e-3,3e-3", "--sweep.data.source=a:0.5,b:0.5",
                       "--sweep.data.source=c", "--sweep.model.num_layers=2"])
    assert grid == [("optim.lr", ["1e-3", "3e-3"]), ("data.source", ["a:0.5,b:0.5", "c"]),
                    ("model.num_layers", ["2"])]
    pts = points(grid)
    assert len(pts) == 4 and pts[1] == ["--config.optim.lr=1e-3", "--config.data.source=c",
                                        "--config.model.num_layers=2"]
    assert point_name(["--config.data.source=x/y.txt", "--config.seed=1"]) == (
        "data.source=x_y.txt,seed=1")
    with pytest.raises(ConfigError, match="--sweep.KEY=VALUE"):
        parse_grid(["--sweep.optim.lr"])


def test_every_point_is_validated_before_any_trains(tmp_path):
    with pytest.raises(ConfigError, match="num_layers"):
        run_sweep("tiny", parse_grid(["--sweep.model.num_layers=1,two"]), str(tmp_path / "s"),
                  FAST)
    with pytest.raises(ConfigError, match="model.num_layer"):  # unknown key: nearest named
        run_sweep("tiny", parse_grid(["--sweep.model.num_layer=1"]), str(tmp_path / "s"), FAST)
    assert not (tmp_path / "s").exists()


def test_sweep_trains_each_point_tabulates_and_skips_finished(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["sweep", "tiny", "--workdir", str(root), "--sweep.optim.lr=1e-3,1e-2", *FAST]
    assert main(argv) == 0
    dirs = {p.name for p in root.iterdir() if p.is_dir()}
    assert dirs == {"optim.lr=1e-3", "optim.lr=1e-2"}
    for d in dirs:  # each point is a complete workdir with its override applied
        cfg = json.loads((root / d / "config.json").read_text())
        assert cfg["optim"]["lr"] == float(d.split("=")[1]) and cfg["train"]["steps"] == 6
    rows = json.loads((root / "summary.json").read_text())
    assert [r["run"] for r in rows] == sorted(dirs, key=lambda d: last_eval(root / d)["loss"])
    for r in rows:  # the table is each workdir's own last eval, not a recomputation
        ev = last_eval(root / r["run"])
        assert r["step"] == ev["step"] == 6 and r["eval/loss"] == ev["loss"]
    out = capsys.readouterr().out
    assert format_table(rows) in out and "eval/causal_lm/accuracy" in out

    before = {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")}
    assert main(argv) == 0  # everything finished: nothing trains again
    assert {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")} == before
    assert "finished earlier" in capsys.readouterr().out

    assert main(["compare", *(str(root / d) for d in sorted(dirs))]) == 0
    assert capsys.readouterr().out.strip() == format_table(summarize(
        [str(root / d) for d in dirs]))
    assert main(["compare", str(tmp_path)]) == 2  # not a workdir: one-line error
    assert "no metrics.jsonl" in capsys.readouterr().err

    # --parallel 2: one `solo train` process per point, the same results as the serial sweep
    par = tmp_path / "par"
    assert main(["sweep", "tiny", "--workdir", str(par), "--sweep.optim.lr=1e-3,1e-2", *FAST,
                 "--parallel", "2"]) == 0
    assert (par / "optim.lr=1e-2" / "sweep.log").exists()
    drop = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rs]
    assert drop(json.loads((par / "summary.json").read_text())) == drop(rows)
    for d in dirs:  # every logged metric, not only the last eval
        assert plots.series(str(par / d)) == plots.series(str(root / d))
