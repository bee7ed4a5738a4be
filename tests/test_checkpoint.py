"""Checkpointing, resume and workdir safety, end to end on the real synthetic:world pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from solo.config import ConfigError, RunConfig
from solo.experiments.base import get_config
from solo.train import checkpoint as ckpt_lib
from solo.train.inference import load
from solo.train.loop import TrainConfigError, train_and_evaluate
from solo.train.preemption import Stopped, StopSignals
from solo.train.step import Stepper
from solo.train.workdir import WorkdirError, write_config


def small_config(steps: int = 8):
    c = get_config()
    c.model.update(dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=64, embed_dim=32))
    c.data.update(dict(seq_len=32, batch_size=8, eval_batch_size=8))
    c.data.tokenizer.update(dict(kind="bpe", vocab_size=400, sample_size=100_000))
    c.data.world.update(dict(num_people=20, bios_per_person=2))
    c.train.update(dict(steps=steps, log_every=4, eval_every=4, ckpt_every=4, keep=2,
                        eval_batches=2))
    c.optim.update(dict(warmup_steps=2, decay_steps=8))  # fixed: resumed runs share the schedule
    return c


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_mtime_ns, digest)
    return out


def flat_params(workdir) -> dict[str, np.ndarray]:
    loaded = load(str(workdir))
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """wd_a: 8 steps straight; wd_b: 4 steps, then a fresh call resumes to 8."""
    tmp = tmp_path_factory.mktemp("ckpt")
    summary_a = train_and_evaluate(small_config(8), str(tmp / "a"))
    first = train_and_evaluate(small_config(4), str(tmp / "b"))
    summary_b = train_and_evaluate(small_config(8), str(tmp / "b"))
    return tmp, summary_a, first, summary_b


def test_resume_is_bit_identical(runs):
    tmp, a, first, b = runs
    assert first["step"] == 4 and a["step"] == b["step"] == 8
    pa, pb = flat_params(tmp / "a"), flat_params(tmp / "b")
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    assert a["eval"] == b["eval"]
    assert a["train"]["causal_lm/loss"] == b["train"]["causal_lm/loss"]


def test_sigterm_checkpoints_that_step_and_the_resume_is_bit_identical(runs, tmp_path,
                                                                       monkeypatch):
    """SIGTERM (a preemption) during step 3 of 8: the run saves step 3 (not a ckpt_every
    multiple), raises Stopped and restores the signal handlers; rerunning the same call resumes
    at step 3 and ends with the params of the run that never stopped."""
    tmp, *_ = runs
    wd = tmp_path / "stopped"
    real, calls = Stepper.train, []

    def train_then_signal(self, *args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args)

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever the runner set
    monkeypatch.setattr(Stepper, "train", train_then_signal)
    try:
        with pytest.raises(Stopped) as e:
            train_and_evaluate(small_config(8), str(wd))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
        monkeypatch.undo()
    assert (e.value.step, e.value.signum) == (3, signal.SIGTERM)
    assert "after step 3" in str(e.value) and "resume" in str(e.value)
    c = ckpt_lib.Checkpointer(str(wd), read_only=True)
    assert c.latest_step() == 3
    c.close()
    assert train_and_evaluate(small_config(8), str(wd))["step"] == 8
    pa, pc = flat_params(tmp / "a"), flat_params(wd)
    for k in pa:
        assert np.array_equal(pa[k], pc[k]), k
    # the stop logged its partial window (steps 1-3); the resumed run repeats no row
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [3, 4, 8]


def test_stop_signals_second_ctrl_c_interrupts_and_cli_exit_code(tmp_path, monkeypatch, capsys):
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with StopSignals() as s:
            os.kill(os.getpid(), signal.SIGINT)
            assert s.signum == signal.SIGINT  # first Ctrl-C: a request, no exception
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup / background: stays ignored
        with StopSignals() as s:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)

    from solo import cli
    from solo.train import loop

    def stopped(config, workdir):
        raise Stopped(5, signal.SIGTERM)

    monkeypatch.setattr(loop, "train_and_evaluate", stopped)
    assert cli.main(["train", "tiny", "--workdir", str(tmp_path / "w")]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 5" in err and "run the same command" in err


def test_config_json_is_the_latest_and_earlier_configs_are_kept(runs):
    tmp, *_ = runs
    read = lambda p: json.loads(p.read_text())
    # b: launched with steps=4, resumed with steps=8 -> the 4-step config is kept, named by the
    # last checkpoint it produced; config.json is the resumed launch's
    assert read(tmp / "b" / "config.json")["train"]["steps"] == 8
    kept = sorted(p.name for p in (tmp / "b").glob("config.*.json"))
    assert kept == ["config.until-step-4.json"]
    assert read(tmp / "b" / kept[0])["train"]["steps"] == 4
    # a: one launch -> nothing archived; relaunching an identical config writes nothing
    before = snapshot(tmp / "a")
    write_config(RunConfig.from_config(small_config(8)), str(tmp / "a"))
    assert not list((tmp / "a").glob("config.*.json")) and snapshot(tmp / "a") == before
    # two changed relaunches without a new checkpoint: both earlier configs survive
    wd = tmp / "cfg_only"
    wd.mkdir()
    for steps in (1, 2, 3):
        write_config(RunConfig.from_config(small_config(steps)), str(wd))
    assert read(wd / "config.json")["train"]["steps"] == 3
    assert [read(wd / n)["train"]["steps"] for n in ("config.until-step-0.json",
                                                      "config.until-step-0.1.json")] == [1, 2]


def test_workdir_layout_and_metrics(runs):
    tmp, a, _, _ = runs
    wd = tmp / "a"
    assert (wd / "config.json").is_file() and (wd / "tokenizer.model").is_file()
    assert list(wd.glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [4, 8]
    for key in ("loss", "causal_lm/loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "mfu"):
        assert key in train_rows[-1], key
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 8]
    # exact: the same float, written by json.dumps (which round-trips floats)
    assert a["eval"]["loss"] == rows[-1]["loss"]


def test_different_model_shape_is_refused_and_workdir_untouched(runs):
    wd = runs[0] / "a"
    before = snapshot(wd)
    c = small_config(8)
    c.model.d_model = 48
    c.model.num_layers = 2
    with pytest.raises(WorkdirError) as e:
        train_and_evaluate(c, str(wd))
    msg = str(e.value)
    assert "model.d_model" in msg and "model.num_layers" in msg and "--workdir" in msg
    assert "\n" not in msg
    assert snapshot(wd) == before


def test_leftover_tmp_and_corrupt_checkpoints_are_skipped(runs, tmp_path):
    wd = tmp_path / "copy"
    shutil.copytree(runs[0] / "a", wd)
    ref = flat_params(wd)
    tmp_dir = wd / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000"
    (tmp_dir / "state").mkdir(parents=True)
    (tmp_dir / "state" / "garbage").write_bytes(b"\x00partial")
    got = flat_params(wd)  # the crashed save at step 12 is invisible
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
    corrupt = wd / "checkpoints" / "16"  # a finalized-looking but truncated step dir
    shutil.copytree(wd / "checkpoints" / "8", corrupt)
    for f in (corrupt / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"")
    loaded = load(str(wd))
    assert loaded.step in (8, 16)
    got = {jax.tree_util.keystr(p): np.asarray(x)
           for p, x in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
    c = small_config(20)
    c.train.ckpt_every = 16
    summary = train_and_evaluate(c, str(wd))  # resumes from 8 past both, then saves 16 and 20
    assert summary["step"] == 20
    assert len(list((wd / "checkpoints").glob("16.unrestorable-*"))) == 1  # kept, not deleted
    assert flat_params(wd).keys() == ref.keys()
    assert load(str(wd)).step == 20


def test_best_checkpoint_is_kept(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1, keep_best=True, async_save=False)
    for step, loss in zip([1, 2, 3, 4], [3.0, 1.0, 2.0, 4.0], strict=True):
        ck.save(step, {"w": np.full((2,), step, np.float32)}, {"pos": step}, loss)
    ck.save(5, {"w": np.full((2,), 5, np.float32)}, {"pos": 5}, None)
    ck.wait()
    assert ck.all_steps() == [2, 5] and ck.best_step() == 2 and ck.latest_step() == 5
    state, data, step = ck.restore({"w": np.zeros((2,), np.float32)})
    assert step == 5 and data == {"pos": 5} and np.array_equal(state["w"], [5, 5])
    ck.close()


def test_unwritable_workdir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WorkdirError, match="not writable|not a directory"):
        train_and_evaluate(small_config(), str(blocker / "wd"))
    with pytest.raises(WorkdirError, match="not a directory"):
        train_and_evaluate(small_config(), str(blocker))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(WorkdirError, match="not writable"):
                train_and_evaluate(small_config(), str(ro))
        finally:
            ro.chmod(0o700)


def test_bad_configs_fail_before_anything_is_written(tmp_path):
    wd = tmp_path / "never"
    c = small_config()
    c.objectives = dict(causal_llm=dict(weight=1.0))
    with pytest.raises(ConfigError, match="causal_llm"):
        train_and_evaluate(c, str(wd))
    c = small_config()
    c.objectives.causal_lm.weight = 0.0
    c.objectives.mlm.weight = 1.0
    with pytest.raises(TrainConfigError, match="mlm_targets.*data.task='lm'"):
        train_and_evaluate(c, str(wd))
    c = small_config()
    c.data.batch_size = 6
    c.optim.grad_accum = 4
    with pytest.raises(TrainConfigError, match="divisible"):
        train_and_evaluate(c, str(wd))
    c = small_config()
    c.data.nsp_negatives = "same_document"
    with pytest.raises(ConfigError, match="nsp_negatives='same_document'.*same_doc"):
        train_and_evaluate(c, str(wd))
    assert not wd.exists()


def test_load_for_inference_errors(runs, tmp_path):
    with pytest.raises(WorkdirError, match="does not exist"):
        load(str(tmp_path / "nope"))
    with pytest.raises(WorkdirError, match="no config.json"):
        load(str(tmp_path))
    shutil.copy(runs[0] / "a" / "config.json", tmp_path / "config.json")
    with pytest.raises(WorkdirError, match="tokenizer.model"):
        load(str(tmp_path))
    shutil.copy(runs[0] / "a" / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(WorkdirError, match="no checkpoint"):
        load(str(tmp_path))
    best = load(str(runs[0] / "a"), checkpoint="best")
    assert best.step in (4, 8) and best.tokenizer.vocab_size == best.model.cfg.vocab_size
    with pytest.raises(WorkdirError, match=r"no checkpoint of step 5; saved steps: "
                                                     r"\[4, 8\]"):
        load(str(runs[0] / "a"), checkpoint=5)
    with pytest.raises(ValueError, match="'latest', 'best' or a step number"):
        load(str(runs[0] / "a"), checkpoint="newest")


def test_a_chosen_checkpoint_step_is_the_one_evaluated(runs, capsys):
    """`solo eval --checkpoint 4` on a run that kept steps 4 and 8 evaluates step 4: its eval
    loss is the one logged at step 4 during training, not step 8's."""
    from solo.cli import main

    wd = runs[0] / "a"
    logged = {r["step"]: r["loss"] for r in map(json.loads, (wd / "metrics.jsonl").open())
              if r["split"] == "eval"}
    assert logged[4] != logged[8]
    for step in (4, 8):
        assert main(["eval", str(wd), "--checkpoint", str(step)]) == 0
        out = capsys.readouterr().out
        assert f"step={step}" in out and f"loss={logged[step]:.4g}" in out


def test_init_from_loads_params_and_tokenizer(runs, tmp_path):
    src = runs[0] / "a"
    c = small_config(2)
    c.train.init_from = str(src)
    c.optim.lr = 0.0  # zero updates (AdamW scales decay by lr too): params stay the loaded ones
    train_and_evaluate(c, str(tmp_path / "sft"))
    assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (src /
                                                                    "tokenizer.model").read_bytes()
    ref, got = flat_params(src), flat_params(tmp_path / "sft")
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_init_from_a_stopped_run_finishes_it_first(runs, tmp_path):
    """init_from holding a run stopped at step 4 of 8 (config.json says 8): with
    init_experiment set, it is resumed to step 8 (== the uninterrupted run) before the SFT."""
    src = tmp_path / "src"
    shutil.copytree(runs[0] / "b", src)
    shutil.rmtree(src / ckpt_lib.CKPT_DIR / "8")
    c = small_config(2)
    c.train.update(init_from=str(src), init_experiment="tiny")
    c.optim.lr = 0.0
    train_and_evaluate(c, str(tmp_path / "sft"))
    ref, done, got = flat_params(runs[0] / "a"), flat_params(src), flat_params(tmp_path / "sft")
    assert all(np.array_equal(ref[k], done[k]) and np.array_equal(ref[k], got[k]) for k in ref)


def test_restore_common_params_keeps_new_leaves_and_names_misfits(tmp_path):
    import jax.numpy as jnp

    ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    saved = {"params": {"body": {"w": np.arange(4, dtype=np.float32)},
                        "old_head": {"w": np.ones(3, np.float32)}}, "step": np.int32(5)}
    ck.save(5, saved, {})
    ck.wait()
    live = {"body": {"w": jnp.zeros(4)}, "new_head": {"w": jnp.full((2,), 7.0)}}
    params, fresh = ck.restore_common_params(live, 5)
    np.testing.assert_array_equal(params["body"]["w"], np.arange(4))
    np.testing.assert_array_equal(params["new_head"]["w"], [7.0, 7.0])
    assert fresh == ["['new_head']['w']"] and "old_head" not in params
    with pytest.raises(ckpt_lib.CheckpointError, match=r"\['body'\]\['w'\] \(4,\) vs \(5,\)"):
        ck.restore_common_params({"body": {"w": jnp.zeros(5)}}, 5)
    ck.close()
