"""Multi-host training: two processes on localhost (jax.distributed over gloo, 4 fake CPU devices
each) against one process with 8 devices, the same `tiny` config on the same data=2 x fsdp=4 mesh
(tests/multihost_worker.py runs each).

What must hold: the global batch of every step is the same rows in the same order (each process
fed its own contiguous block); the trained params and metrics are bit-identical (see
INTRA_OP_THREADS); the checkpoint the two processes wrote restores on this 1-device process
exactly as they restored it; only process 0 wrote the shared files (config.json, tokenizer,
metrics) and trained the tokenizer.

Both runs are started together (3 processes; 70 s on a 2-core Xeon while the rest of the suite
ran beside it, most of it start-up and compilation); a failure kills every child.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "multihost_worker.py"
TIMEOUT_S = 400

# Bit-identical, given two settings (each alone is not enough; measured on a 2-core Xeon):
# - The same intra-op thread count. XLA:CPU's Eigen pool has max(DefaultThreadPoolSize(), local
#   device count) threads (xla/pjrt/cpu/cpu_client.cc, GetTfrtCpuClient), and a dot's bits depend
#   on it: Eigen's threaded contraction splits the contracted dimension by the thread count, so
#   the weight-gradient sums associate differently with 4 threads (4 devices on 2 cores) than
#   with 8 (x.T @ y of [16384, 64] x [16384, 96] gives 3 different results with 1, 4 and 8 fake
#   devices). DefaultThreadPoolSize() honours the NPROC environment variable: NPROC=8 gives every
#   process 8 threads, as on an 8-core host. The pool size is also the only difference in the
#   compiled steps: the ParallelTaskAssigner splits an argmax fusion's outputs [2,2] ways with 4
#   threads, [2,4] with 8 (outputs per thread only, no sum changed). Not a fix:
#   --xla_cpu_multi_thread_eigen=false (per jit or in XLA_FLAGS: the dot's bits do not change),
#   YNNPACK fusions on or off (train.xla_defaults), taskset.
# - The same collectives. Within one process XLA:CPU all-reduces and reduce-scatters the devices'
#   partial sums in its own order, gloo (what jax.distributed uses across processes) in another:
#   with the threads equal, an in-process reference ends 1 step 479 of 156,992 params apart (the
#   loss 1 ulp), and 4 steps 17,658 apart; with gloo but 4 threads, 694 after 1 step. So the
#   reference also runs through jax.distributed, as a run of one process with 8 devices (gloo),
#   and then every param agrees after every step.
# Test-only: solo leaves the pool at XLA's default (more threads than cores costs speed).
INTRA_OP_THREADS = 8
WALL_CLOCK = {"tokens_per_sec", "step_time", "mfu"}  # train-row keys that vary run to run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args: list[str], devices: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC=str(INTRA_OP_THREADS),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    address = f"localhost:{_free_port()}"
    t0 = time.time()
    procs = {
        "one": _start([str(tmp / "one"), str(tmp / "one_out"), f"localhost:{_free_port()}", "1",
                       "0"], 8, tmp / "one.log"),
        **{f"p{i}": _start([str(tmp / "two"), str(tmp / f"p{i}_out"), address, "2", str(i)], 4,
                           tmp / f"p{i}.log") for i in range(2)},
    }
    try:
        deadline = time.time() + TIMEOUT_S
        for name, p in procs.items():
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
            assert rc == 0, f"{name} exited {rc}:\n" + (tmp / f"{name}.log").read_text()[-3000:]
    finally:
        for p in procs.values():  # one failed or timed out: end the others (no orphans)
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"1-process and 2-process runs: {time.time() - t0:.1f} s")
    out = {n: json.loads((tmp / f"{n}_out.json").read_text()) for n in procs}
    return tmp, out


def test_two_processes_form_one_run(runs):
    _, out = runs
    assert [(o["process_index"], o["process_count"], o["devices"], o["local_devices"])
            for o in (out["one"], out["p0"], out["p1"])] == [(0, 1, 8, 8), (0, 2, 8, 4),
                                                             (1, 2, 8, 4)]


def test_each_process_feeds_its_block_of_the_same_global_batch(runs):
    _, out = runs
    one, p0, p1 = out["one"]["rows"], out["p0"]["rows"], out["p1"]["rows"]
    assert len(one) == len(p0) == len(p1) == 4  # train.steps
    for step, (g, a, b) in enumerate(zip(one, p0, p1, strict=True)):
        assert len(a) == len(b) == len(g) // 2
        assert a + b == g, f"step {step + 1}: the processes' rows are not the global batch"
    assert len({r for g in one for r in g}) > len(one[0])  # the steps see different rows


def test_only_process_zero_writes_shared_files(runs):
    tmp, out = runs
    assert out["p0"]["trained_tokenizer"] and not out["p1"]["trained_tokenizer"]
    wrote = {Path(p).name for p in out["p0"]["written"]}
    assert {"config.json", "tokenizer.model", "metrics.jsonl"} <= wrote
    assert out["p1"]["written"] == []
    # what process 0 wrote is what the one-process run wrote (no dist keys: launch-neutral)
    for name in ("config.json", "tokenizer.model"):
        assert (tmp / "two" / name).read_bytes() == (tmp / "one" / name).read_bytes(), name
    rows = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(2, "train"), (4, "train"), (4, "eval")]


def test_two_processes_train_the_one_process_params(runs):
    tmp, out = runs
    one, two = np.load(tmp / "one_out.npz"), np.load(tmp / "p0_out.npz")
    finals = sorted(k for k in one.files if k.startswith("final"))
    assert finals == sorted(two.files)
    differ = {k: int((one[k] != two[k]).sum()) for k in finals}
    print(f"params: {sum(differ.values())} of {sum(one[k].size for k in finals)} entries differ")
    assert all(np.array_equal(one[k], two[k]) for k in finals), {k: n for k, n in differ.items()
                                                                 if n}
    assert all(not np.array_equal(one[k], one["init" + k[5:]]) for k in finals)  # all trained
    for split in ("train", "eval"):  # every metric but the wall-clock ones
        a, b = ({k: v for k, v in o[split].items() if k not in WALL_CLOCK}
                for o in (out["one"], out["p0"]))
        assert "loss" in a and a == b, split
    assert out["p0"]["eval"] == out["p1"]["eval"]  # both processes report the same metrics
    # `solo eval` on the two processes (a data-only mesh) is `solo eval` on the one process
    assert out["p0"]["evaluate"] == out["p1"]["evaluate"] == out["one"]["evaluate"]
    # ... and the train step's eval on the same params, summed in another order (another mesh):
    # a float32 sum of n terms is off by at most n * eps * sum|terms| (Higham 2.2), n <= the
    # tokens of a batch (16 x 64)
    for k, v in out["p0"]["eval"].items():
        rtol = 16 * 64 * float(np.finfo(np.float32).eps)
        np.testing.assert_allclose(out["p0"]["evaluate"][k], v, rtol=rtol, err_msg=k)


def test_processes_agree_on_the_step_they_restore(runs):
    """A restore that fails on process 1 alone (an injected read error at step 5): both
    processes fall back to step 4 together; one process alone restores step 5."""
    _, out = runs
    assert [out[p]["agreed_step"] for p in ("p0", "p1")] == [4, 4]
    assert out["one"]["agreed_step"] == 5


def test_two_process_checkpoint_restores_on_one_process(runs):
    from solo.train.inference import load

    tmp, _ = runs
    assert jax.process_count() == 1 and jax.device_count() == 1
    saved = np.load(tmp / "p0_out.npz")  # what the two processes restored from it
    loaded = load(str(tmp / "two"))
    assert loaded.step == 4
    flat = {f"final{jax.tree_util.keystr(p)}": np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}
    assert sorted(flat) == sorted(saved.files)
    for k, x in flat.items():
        np.testing.assert_array_equal(x, saved[k], err_msg=k)


# ----------------------------------------------------------------------------- in one process


def _dist(**kw):
    from solo.experiments.base import get_config
    from solo.multihost import DistConfig

    d = get_config().dist
    d.update(kw)
    return DistConfig.from_config(d)


def test_dist_settings_are_validated():
    from solo.config import ConfigError

    with pytest.raises(ConfigError, match="go together"):
        _dist(coordinator_address="localhost:1234")
    with pytest.raises(ConfigError, match="process_id=2 must be < dist.num_processes=2"):
        _dist(coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="valid: auto, yes, no"):
        _dist(initialize="always")
    assert _dist(coordinator_address="h:1", num_processes=2, process_id=1).explicit


def test_auto_joins_only_a_detected_cluster(monkeypatch):
    from solo import multihost

    for var in ("JAX_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_PROCID="0",
                 SLURM_LOCALID="0")
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to join (all local GPUs kept)
    assert multihost.detected_cluster() is None
    assert multihost.initialize(_dist()) is False and not multihost.is_initialized()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert multihost.detected_cluster() == "slurm"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert multihost.detected_cluster() == "JAX_COORDINATOR_ADDRESS"
    # 'no' never joins, whatever the environment says
    assert multihost.initialize(_dist(initialize="no")) is False


@pytest.mark.parametrize("process_id", [0, 1])  # 0 hosts the coordinator, 1 looks for it
def test_peers_that_never_arrive_end_in_one_line_naming_the_coordinator(process_id):
    """jax's own timeout aborts the process with a native stack dump; solo's comes first."""
    address = f"localhost:{_free_port()}"
    script = ("import sys; from solo.multihost import DistConfig, initialize; "
              f"initialize(DistConfig('auto', {address!r}, 2, {process_id}, 2)); "
              "sys.exit('joined?')")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ,
                          JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and address in errors[0] and "dist.timeout_s=2" in errors[0], errors
    assert f"process {process_id} of 2" in errors[0]


def test_workdir_files_on_gcs(fake_gcs):
    """config.json, the tokenizer and metrics.jsonl through epath on a gs:// workdir (a fake
    store); Orbax's gs:// checkpoints go through tensorstore and are not covered here."""
    from solo.config import RunConfig
    from solo.data.hf_tokenizer import load_tokenizer
    from solo.data.pipeline import workdir_tokenizer
    from solo.data.tokenizer import Tokenizer
    from solo.experiments import load_config
    from solo.files import path, write_atomic
    from solo.train import metrics as metrics_lib
    from solo.train import workdir as wd_lib

    wd = "gs://bucket/runs/tiny"
    config = RunConfig.from_config(load_config("tiny", ["--config.train.steps=9"]))
    wd_lib.check_workdir(config, wd)
    wd_lib.write_config(config, wd)
    assert wd_lib.read_config(wd).train.steps == 9
    changed = RunConfig.from_config(load_config("tiny", ["--config.train.steps=12"]))
    wd_lib.write_config(changed, wd)  # a resume with more steps: the old file is archived
    assert wd_lib.read_config(wd).train.steps == 12
    names = sorted(p.name for p in path(wd).iterdir())
    assert names == ["config.json", "config.until-step-0.json"], names  # no temporaries left
    write_atomic(f"{wd}/x.txt", "a")
    write_atomic(f"{wd}/x.txt", "b")  # replaces an existing object
    assert path(f"{wd}/x.txt").read_text() == "b"

    Tokenizer.train(["hello world"] * 20, f"{wd}/tokenizer", kind="char", vocab_size=0)
    tok = load_tokenizer(workdir_tokenizer(wd))
    assert tok.decode(tok.encode("hello")) == "hello"

    writer = metrics_lib.MetricWriter(wd)
    writer._tb_failed = True  # TensorBoard's own writer is not fsspec's
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.truncate(2)
    rows = [json.loads(line) for line in path(f"{wd}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_gcs_workdir_without_gcsfs_is_one_line():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs installed: it would try real credentials")
    except ImportError:
        pass
    from solo.config import RunConfig
    from solo.experiments import load_config
    from solo.train.workdir import WorkdirError, check_workdir

    with pytest.raises(WorkdirError, match=r"gs://b/run.*pip install gcsfs.*credentials") as e:
        check_workdir(RunConfig.from_config(load_config("tiny")), "gs://b/run")
    assert "\n" not in str(e.value)


def test_profile_steps_and_compilation_cache(tmp_path):
    """train.profile_steps writes a jax.profiler trace for TensorBoard; train.compilation_cache_dir
    receives the run's executables (every compilation cached for the test). The workdir is an
    etils.epath.Path, as a gs:// one would be."""
    from etils import epath
    from test_checkpoint import small_config

    from solo.train.loop import train_and_evaluate

    c = small_config(steps=3)
    c.train.update(profile_steps="2:3", compilation_cache_dir=str(tmp_path / "cache"),
                   eval_every=0, ckpt_every=0)
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        summary = train_and_evaluate(c, epath.Path(tmp_path / "wd"))
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
        from jax.experimental.compilation_cache import compilation_cache as cc

        cc.set_cache_dir(None)
        cc.reset_cache()
    assert summary["step"] == 3 and (tmp_path / "wd" / "checkpoints" / "3").is_dir()
    traces = list((tmp_path / "wd" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert any((tmp_path / "cache").iterdir())
