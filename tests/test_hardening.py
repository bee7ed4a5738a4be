"""Faults an operator meets, each reproduced: a diverging run, a damaged tokenizer or config,
unrestorable checkpoints, a full disk, a crash that leaves metrics rows behind. Each must end in
one clear line (and a documented exit code) and lose nothing already written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_checkpoint import small_config

from solo import cli
from solo.train import checkpoint as ckpt_lib
from solo.train.inference import load
from solo.train.loop import Diverged, train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


def diverging_config(steps=6, **train):
    c = small_config(steps)
    c.optim.update(dict(lr=1e9, warmup_steps=1))  # the second step's loss overflows
    c.train.update(dict(ckpt_every=1, log_every=1, eval_every=0, keep=100, **train))
    return c


def saved_state(wd, step):
    with ocp.PyTreeCheckpointer() as ckptr:  # the saved state as it is on disk (numpy)
        return ckptr.restore(str(wd / "checkpoints" / str(step) / "state"))


def saved_params(wd, step):
    return saved_state(wd, step)["params"]


def test_a_nonfinite_loss_stops_the_run_and_nothing_nonfinite_is_saved(tmp_path):
    wd = tmp_path / "nan"
    with pytest.raises(Diverged) as e:
        train_and_evaluate(diverging_config(), str(wd))
    bad = e.value.step
    assert bad >= 2  # the first step starts from the finite init
    assert e.value.last_checkpoint == bad - 1 and f"step {bad}" in str(e.value)
    c = ckpt_lib.Checkpointer(str(wd), read_only=True)
    assert c.all_steps() == list(range(1, bad))  # every step before it, none after
    c.close()
    for s in range(1, bad):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(wd, s))), s
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, bad))
    assert all(r["loss"] is not None and np.isfinite(r["loss"]) for r in rows)


def test_skipped_steps_change_nothing_and_are_counted(tmp_path):
    wd = tmp_path / "skip"
    with pytest.raises(Diverged) as e:  # every step after the first is non-finite here
        train_and_evaluate(diverging_config(steps=8, max_skipped_steps=2), str(wd))
    first_bad = e.value.step - 2
    assert "after 2 skipped" in str(e.value)
    before = saved_params(wd, first_bad - 1)
    moments = lambda st: [x for x in jax.tree.leaves(st["opt_state"])
                          if not np.issubdtype(np.asarray(x).dtype, np.integer)]
    for s in (first_bad, first_bad + 1):  # skipped: saved, and exactly the state before them
        jax.tree.map(np.testing.assert_array_equal, saved_params(wd, s), before)
        jax.tree.map(np.testing.assert_array_equal, moments(saved_state(wd, s)),
                     moments(saved_state(wd, first_bad - 1)))
        # Adam's count stays at the updates applied (its bias correction); the lr schedule's
        # count follows the step (on disk: (clip, (adam, weight decay mask, schedule)))
        adam, _, schedule = saved_state(wd, s)["opt_state"][1]
        assert (int(adam["count"]), int(schedule["count"])) == (first_bad - 1, s)
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["step"] >= first_bad]
    assert [r["skipped_steps"] for r in skipped] == [1.0, 2.0]
    assert all("loss" not in r for r in skipped)  # no data in those windows: no (null) loss
    assert all(v is not None for r in rows for v in r.values())


def test_divergence_exit_code_and_one_line(tmp_path, capsys):
    rc = cli.main(["train", "tiny", "--workdir", str(tmp_path / "w"), "--config.optim.lr=1e9",
                   "--config.optim.warmup_steps=1", "--config.train.steps=5",
                   "--config.data.world.num_people=10"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("solo train:")]
    assert rc == 3 and len(err) == 1 and "not finite at step" in err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4 (copied by the tests that damage it)."""
    wd = tmp_path_factory.mktemp("finished") / "wd"
    c = small_config(4)
    c.train.update(dict(ckpt_every=2, log_every=1, eval_every=2))
    train_and_evaluate(c, str(wd))
    return wd, c


def test_a_damaged_tokenizer_is_one_line_naming_it(finished, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(finished[0], wd)
    data = (wd / "tokenizer.model").read_bytes()
    (wd / "tokenizer.model").write_bytes(data[: len(data) // 3])
    rc = cli.main(["sample", str(wd), "--prompt", "Anya"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "tokenizer.model is damaged" in err[0] and "copy it back" in err[0]


def test_a_damaged_config_is_one_line_naming_it(finished, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(finished[0], wd)
    (wd / "config.json").write_text('{"model": {')
    rc = cli.main(["eval", str(wd)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "config.json is damaged" in err[0], err


def test_no_restorable_checkpoint_is_one_quiet_line(finished, tmp_path):
    """Every checkpoint damaged (data files deleted): one warning per step tried, one error line,
    exit 2, and none of the closed-event-loop tracebacks tensorstore would print (they come
    during interpreter exit too, hence a subprocess)."""
    wd = tmp_path / "wd"
    shutil.copytree(finished[0], wd)
    for step in (2, 4):
        for part in ("d", "ocdbt.process_0"):
            shutil.rmtree(wd / "checkpoints" / str(step) / "state" / part)
    r = subprocess.run([sys.executable, "-m", "solo", "eval", str(wd)], capture_output=True,
                       text=True, timeout=600)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) < 5, r.stderr[-3000:]
    assert "no restorable checkpoint" in err[-1]


def test_a_resumed_run_repeats_no_metrics_row(finished, tmp_path):
    """A crash after step 4 was logged but before it was checkpointed: its rows (and a torn
    last line) go when the run resumes from step 2 and redoes steps 3 and 4."""
    wd = tmp_path / "wd"
    shutil.copytree(finished[0], wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # the crash tore the last line
    train_and_evaluate(finished[1], str(wd))
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert keys == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"),
                    (4, "eval")]
    assert len(list(wd.glob("events.out.tfevents.*"))) >= 1
    assert all(p.stat().st_size > 0 for p in wd.glob("events.out.tfevents.*"))


DISK_FULL = """
set -u
mount -t tmpfs -o size=3m tmpfs "$MNT" || exit 77
trap 'umount "$MNT" 2>/dev/null' EXIT
run() {{ {python} -m solo train tiny --workdir "$MNT/wd" --config.train.steps=20 \\
      --config.train.ckpt_every=5 --config.train.log_every=5 --config.train.eval_every=10 \\
      --config.data.world.num_people=10; }}
run 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"
mount -o remount,size=64m "$MNT"
run 2> "$OUT/resumed.err"; echo $? > "$OUT/resumed.rc"
ls "$MNT/wd/checkpoints" > "$OUT/steps"
"""


def test_a_full_disk_is_a_few_lines_and_the_run_resumes(tmp_path):
    """The workdir on a 3 MB tmpfs: the second checkpoint does not fit. The run ends with one
    error line (exit 2), keeps its last complete checkpoint, and resumes once there is room.
    Needs a tmpfs mount: as root, or in a user namespace (unshare -rm); else skipped."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = DISK_FULL.format(python=sys.executable)
    env = dict(os.environ, MNT=str(mnt), OUT=str(out))
    runner = [] if os.geteuid() == 0 else ["unshare", "-rm"]
    if runner and not shutil.which("unshare"):
        pytest.skip("no tmpfs: not root and no unshare to make a user namespace")
    r = subprocess.run([*runner, "sh", "-c", script], env=env, capture_output=True, text=True,
                       timeout=900)
    if r.returncode == 77 or not (out / "full.rc").exists():
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:200]})")
    progress = ("step ", "eval step ", "resumed from ", "attention: ")  # + the start line
    full = [ln for ln in (out / "full.err").read_text().splitlines()
            if not ln.startswith(progress)]
    assert (out / "full.rc").read_text().strip() == "2", full
    assert len(full) == 1 and "no space left on device" in full[0], full
    resumed = (out / "resumed.err").read_text()
    assert (out / "resumed.rc").read_text().strip() == "0", resumed[-2000:]
    assert "resumed from" in resumed
    assert (out / "steps").read_text().split() == ["10", "15", "20"]


TEARDOWN = """
import sys, threading
from solo import cli

left = []

def failing(args):
    async def write_fragment():
        pass
    left.append(write_fragment())  # never awaited, as Orbax leaves its writes on a full disk
    raise OSError(28, "No space left on device")

cli._sample = failing
sys.argv = ["solo", "sample", "wd", "--prompt", "x"]
rc = cli.main()  # the `solo` command
left.clear()  # the coroutine is collected: Python warns that it was never awaited
worker = threading.Thread(target=lambda: 1 / 0)  # a writer thread failing at teardown
worker.start()
worker.join()
sys.exit(rc)
"""


def test_after_the_one_line_error_the_teardown_prints_nothing():
    """What the `solo` process does after it reported a failure as one line (a never-awaited
    write coroutine collected, a writer thread raising) adds nothing to stderr."""
    env = {k: v for k, v in os.environ.items() if k != "SOLO_DEBUG"}
    r = subprocess.run([sys.executable, "-c", TEARDOWN], env=env, capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("solo sample: error: no space left on device (writing wd)")


def test_main_called_in_process_leaves_the_callers_logging_and_warnings(tmp_path, capsys):
    """cli.main([...]) from a notebook: its failure is the same one line, and the caller's
    logging, warnings filters and thread exception hook are as they were."""
    import logging
    import threading
    import warnings

    before = logging.root.manager.disable, list(warnings.filters), threading.excepthook
    rc = cli.main(["sample", str(tmp_path / "absent"), "--prompt", "Anya"])
    assert rc == 2 and len(capsys.readouterr().err.splitlines()) == 1
    assert (logging.root.manager.disable, warnings.filters, threading.excepthook) == before


def test_load_still_works_after_the_faults(finished):
    assert load(str(finished[0])).step == 4


def test_a_config_from_an_older_solo_still_loads(finished, tmp_path, caplog):
    """Keys base.py gained since a run was written take their defaults (which keep the old
    behaviour), keys it no longer has are dropped, each said once; the run's objectives stay
    its own (no entry is added)."""
    from solo.train.workdir import read_config

    wd = tmp_path / "wd"
    shutil.copytree(finished[0], wd)
    saved = json.loads((wd / "config.json").read_text())
    del saved["data"]["world"]["withheld_frac"]
    saved["data"]["world"]["answer_prefix"] = " "  # an option that no longer exists
    saved["objectives"] = {"causal_lm": {"weight": 1.0}}  # written before z_loss existed
    (wd / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING", logger="solo.train.workdir"):
        config = read_config(str(wd))
    assert config.data.world.withheld_frac == 0.0 and "answer_prefix" not in config.data.world
    assert set(config.objectives) == {"causal_lm"} and config.objectives.causal_lm.z_loss == 0.0
    assert "data.world.withheld_frac" in caplog.text and "data.world.answer_prefix" in caplog.text
    assert load(str(wd)).step == 4


def test_atomic_writes_get_ordinary_modes_and_a_failed_staged_dir_leaves_nothing(tmp_path):
    """mkstemp's and mkdtemp's modes are 0600/0700; what solo writes gets the umask's usual
    modes. A staged directory whose writer fails is gone, and its target never appears."""
    from solo.files import staged_dir, write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(str(tmp_path / "f"), "x")
        with staged_dir(str(tmp_path / "d")) as tmp:
            write_atomic(os.path.join(tmp, "g"), "y")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d" / "g").read_text() == "y"
    with pytest.raises(RuntimeError), staged_dir(str(tmp_path / "e")) as tmp:
        write_atomic(os.path.join(tmp, "g"), "y")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
