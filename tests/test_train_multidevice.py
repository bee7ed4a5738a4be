"""8 fake CPU devices (in a subprocess, so the rest of the suite keeps 1 device).

Checks that the jit step on an 8-device mesh (data x fsdp), the pmap step on 8 devices and the
1-device step give the same numbers (incl. InfoNCE, whose negatives pmap must all-gather), and that
a checkpoint written on 8 devices (params sharded over fsdp) restores on 1 device, and that
`solo eval` (and train.loop.evaluate) on 8 devices reports a 1-device InfoNCE run's eval metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from solo.train.inference import load
from solo.train.loop import evaluate

HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_train import tiny_config, lm_batch, run_steps, infonce_config, pair_batch, setup
    from test_checkpoint import small_config
    from solo.train.loop import train_and_evaluate
    assert jax.device_count() == 8, jax.devices()
    out = {}
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]

    def compare(name, p0, a, b):
        (pa, ma), (pb, mb) = a, b
        diff = np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(leaves(pa), leaves(pb))))
        update = np.sqrt(sum(((x - x0) ** 2).sum() for x, x0 in zip(leaves(pa), p0)))
        smooth = [k for k in ma[0] if not k.endswith("accuracy")]  # argmax is not smooth
        mdiff = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-30)
                    for x, y in zip(ma, mb) for k in smooth)
        out[name] = dict(update_rel_diff=float(diff / update), metric_rel_diff=float(mdiff))

    # causal LM: 1 device vs 8-device mesh (data=4, fsdp=2) vs pmap over 8 vs grad_accum=2 on 8.
    # optim.eps=1: AdamW's update g/(sqrt(v)+eps) is then 1/eps-Lipschitz in the gradients, so
    # the runs' float32 differences stay proportional to their gradient differences (with eps
    # 1e-8 an entry whose gradient is at rounding level may flip its whole +-lr update).
    c = tiny_config()
    c.optim.eps = 1.0
    batches = [lm_batch(0, pad_rows=2), lm_batch(1)]
    p0 = leaves(setup(c, jax.devices()[:1])[-1].params)  # the (deterministic) init
    one = run_steps(c, batches, devices=jax.devices()[:1])
    c.train.mesh.update(dict(data=4, fsdp=2, tensor=1))
    compare("lm_jit8", p0, one, run_steps(c, batches))
    c.optim.grad_accum = 2
    compare("lm_jit8_accum2", p0, one, run_steps(c, batches))
    c.optim.grad_accum = 1
    c.train.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.train.parallel = "pmap"
    compare("lm_pmap8", p0, one, run_steps(c, batches))

    # InfoNCE (in-batch negatives): 1-device jit vs pmap over 8 (gathered negatives), and with
    # gradient caching (grad_accum=2) on the 8-device mesh and under pmap
    c = infonce_config()
    c.optim.eps = 1.0
    pb = [pair_batch(0, b=16), pair_batch(1, b=16)]
    p0 = leaves(setup(c, jax.devices()[:1])[-1].params)
    one = run_steps(c, pb, devices=jax.devices()[:1])
    c.train.parallel = "pmap"
    compare("infonce_pmap8", p0, one, run_steps(c, pb))
    c.optim.grad_accum = 2
    compare("infonce_pmap8_accum2", p0, one, run_steps(c, pb))
    c.train.parallel = "jit"
    c.train.mesh.update(dict(data=4, fsdp=2, tensor=1))
    compare("infonce_jit8_accum2", p0, one, run_steps(c, pb))

    # dropout under pmap: the state is replicated, so each device must fold in its own index.
    # Two devices given the same rows: with shared draws their loss equals the 1-device loss of
    # those rows (same rng, same masks); with their own draws it does not
    for p in (0.5, 0.0):
        c = tiny_config(dropout=p)
        b = lm_batch(0)
        two = {k: np.concatenate([v, v]) for k, v in b.items()}
        single = run_steps(c, [b], devices=jax.devices()[:1])[1][0]["causal_lm/loss"]
        c.train.parallel = "pmap"
        pm = run_steps(c, [two], devices=jax.devices()[:2])[1][0]["causal_lm/loss"]
        out[f"dropout_{p}"] = dict(single=single, pmap=pm)

    # a real run on 8 devices with fsdp-sharded params, for the restore-on-1-device check
    c = small_config(steps=3)
    c.train.mesh.update(dict(data=4, fsdp=2, tensor=1))
    summary = train_and_evaluate(c, sys.argv[2])
    from solo.train.inference import load
    loaded = load(sys.argv[2])
    np.savez(sys.argv[2] + "/../ref_params.npz",
             **{jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(loaded.params)[0]})
    out["eval8"] = summary["eval"]
    # a 1-device InfoNCE run (eval batches of 6 pairs) evaluated here, on 8 devices, by `solo
    # eval` (agent.evaluate.eval_command) and by train.loop.evaluate
    from solo.agent.evaluate import eval_command
    from solo.train.loop import evaluate
    out["infonce_eval8"] = json.load(open(eval_command(sys.argv[3], name="eight")[1]))["metrics"]
    out["infonce_loop_eval8"] = evaluate(sys.argv[3])["eval"]
    print("RESULT" + json.dumps(out))
""")


def infonce_run(wd: Path) -> None:
    """A 2-step sentence-encoder run on 1 device whose eval batches (6 pairs) do not fill 8."""
    from test_checkpoint import small_config

    from solo.train.loop import train_and_evaluate

    c = small_config(steps=2)
    c.model.update(kind="encoder", pooling="mean")
    c.data.update(task="pairs", eval_batch_size=6)
    c.objectives.causal_lm.weight = 0.0
    c.objectives.infonce.update(weight=1.0, temperature=0.1)
    c.train.update(eval_every=2, eval_batches=3)
    train_and_evaluate(c, str(wd))


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eight")
    infonce_run(tmp / "infonce")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE), str(tmp / "wd"),
                           str(tmp / "infonce")],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT"):]), tmp


# The runs differ only in the order float32 sums are taken (sharded, accumulated or gathered).
# A float32 sum of n terms is off by at most n * eps * sum|terms| (Higham, Accuracy and
# Stability of Numerical Algorithms, 2.2); the step's longest reductions run over the batch's
# tokens times the MLP width, so relative differences of the loss, the gradient norm and the
# AdamW (eps=1, see SCRIPT) parameter update are bounded by N * eps. A real bug (a wrong
# normalisation, an ungathered negative, a mis-sharded moment) is a relative error >= 1/8.
F32_EPS = float(np.finfo(np.float32).eps)
BOUND = {  # N = batch rows * sequence length * MLP width (tiny_config: 16 x 64; pairs: 16 rows)
    "lm": 8 * 16 * 64 * F32_EPS,
    "infonce": 16 * 16 * 64 * F32_EPS,
}


@pytest.mark.parametrize("name", ["lm_jit8", "lm_jit8_accum2", "lm_pmap8", "infonce_pmap8",
                                  "infonce_pmap8_accum2", "infonce_jit8_accum2"])
def test_eight_devices_match_one(eight_device_run, name):
    result = eight_device_run[0][name]
    print(name, result)  # visible with -s: the measured agreement
    bound = BOUND[name.split("_")[0]]
    assert result["update_rel_diff"] < bound, result
    assert result["metric_rel_diff"] < bound, result


def test_pmap_devices_draw_their_own_dropout(eight_device_run):
    out, _ = eight_device_run
    drop, control = out["dropout_0.5"], out["dropout_0.0"]
    # no dropout: the same rows on two devices give the 1-device loss (float32 sums in another
    # order: within 8 * 16 * 64 eps, as BOUND["lm"]); with dropout each device masks its own way
    assert abs(control["pmap"] - control["single"]) <= BOUND["lm"] * control["single"]
    assert abs(drop["pmap"] - drop["single"]) > 2 * BOUND["lm"] * drop["single"], drop


def test_checkpoint_from_eight_devices_restores_on_one(eight_device_run):
    result, tmp = eight_device_run
    assert jax.device_count() == 1
    ref = np.load(tmp / "ref_params.npz")
    loaded = load(str(tmp / "wd"))
    flat = {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}
    assert sorted(flat) == sorted(ref.files)
    for k, x in flat.items():
        assert len(x.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(x), ref[k])
    again = evaluate(str(tmp / "wd"))["eval"]
    # the same params evaluated on 1 device instead of 8: only the summation order differs; the
    # eval reduces over <= 2 batches of 8 x 32 tokens times the 64-wide MLP (see BOUND)
    for k, v in result["eval8"].items():
        np.testing.assert_allclose(again[k], v, rtol=2 * 8 * 32 * 64 * F32_EPS, err_msg=k)


def test_infonce_eval_is_the_same_on_eight_devices(eight_device_run):
    """In-batch negatives make InfoNCE's eval depend on which pairs share a batch: on 8 devices
    an eval batch still holds the run's 6 pairs (padded with zero-weight rows), so `solo eval`
    there reports what 1 device reports (with 8-pair batches its top-1 accuracy was 17% off)."""
    from solo.agent.evaluate import eval_command

    result, tmp = eight_device_run
    one = json.loads(Path(eval_command(str(tmp / "infonce"), name="one")[1]).read_text())
    # solo eval scores the whole split; train.loop.evaluate the run's train.eval_batches (3)
    for name, ref in [("infonce_eval8", one["metrics"]),
                      ("infonce_loop_eval8", evaluate(str(tmp / "infonce"))["eval"])]:
        assert "infonce/loss" in ref and result[name].keys() == ref.keys()
        for k, v in result[name].items():
            np.testing.assert_allclose(ref[k], v, rtol=1e-4, err_msg=(name, k))
