"""`solo compare --plot` draws exactly the workdirs' metrics (`solo sweep --parallel` is tested
in test_sweep.py, beside the serial sweep it must equal)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from solo.cli import main
from solo.train import plots


def fake_workdir(root: Path, name: str, rows: list[dict]) -> str:
    wd = root / name
    wd.mkdir(parents=True)
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(wd)


def rows_for(train_losses, eval_losses, acc):
    out = [dict(step=10 * (i + 1), split="train", loss=v) for i, v in enumerate(train_losses)]
    out += [dict(step=20 * (i + 1), split="eval", loss=v, **{"causal_lm/accuracy": a})
            for i, (v, a) in enumerate(zip(eval_losses, acc, strict=True))]
    return sorted(out, key=lambda r: (r["step"], r["split"] == "eval"))


def test_plot_draws_the_metrics_of_each_workdir(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_workdir(tmp_path, "lr=1e-3", rows_for([3.0, 2.5, 2.2, 2.0], [2.6, 2.1], [0.3, 0.4]))
    b = fake_workdir(tmp_path, "lr=1e-2", rows_for([3.1, 2.9, 2.8, 2.7], [2.95, 2.75], [0.2, .25]))
    assert plots.series(a) == {"train": ([10, 20, 30, 40], [3.0, 2.5, 2.2, 2.0]),
                               "eval": ([20, 40], [2.6, 2.1])}
    assert plots.final(b, "causal_lm/accuracy") == 0.25 and plots.final(a, "nope") is None

    out = tmp_path / "cmp.png"
    data = plots.save_plot([a, b], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["bars"] == {"lr=1e-3": 2.1, "lr=1e-2": 2.75}
    # what matplotlib draws is those numbers: each curve's points and each bar's length
    fig = plots.figure(data)
    curves, bars = fig.axes
    drawn = [line.get_xydata().tolist() for line in curves.lines]
    assert drawn == [[[10, 3.0], [20, 2.5], [30, 2.2], [40, 2.0]], [[20, 2.6], [40, 2.1]],
                     [[10, 3.1], [20, 2.9], [30, 2.8], [40, 2.7]], [[20, 2.95], [40, 2.75]]]
    assert [p.get_width() for p in bars.patches] == [2.1, 2.75]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["lr=1e-3", "lr=1e-2"]


def test_compare_plot_cli_and_its_errors(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    a = fake_workdir(tmp_path, "a", rows_for([3.0, 2.0], [2.5], [0.5]))
    out = tmp_path / "acc.png"
    assert main(["compare", a, "--plot", str(out), "--metric", "causal_lm/accuracy"]) == 0
    assert out.exists() and f"plot: {out}" in capsys.readouterr().out
    assert main(["compare", a, "--plot", str(tmp_path / "x.png"), "--metric", "nope"]) == 2
    assert "has metric 'nope'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert main(["compare", a, "--plot", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'solo[plot]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "y.png").exists()
