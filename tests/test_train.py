"""Train step, optimizer and parallel wrappers on a tiny model with synthetic batches (1 device).

Multi-device equivalence (8 fake CPU devices) lives in test_train_multidevice.py (a subprocess).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from solo.config import RunConfig
from solo.experiments.base import get_config
from solo.model import Transformer
from solo.objectives.core import OBJECTIVES
from solo.train import optim, parallel
from solo.train import step as step_lib
from solo.train.config import MeshConfig

VOCAB = 64

# Tolerances. float32 rounds each operation by <= eps/2, and a reduction of n terms errs by <= n eps
# of the sum of its absolute terms (Higham, Accuracy and Stability of Numerical Algorithms, 4.2).
F32_EPS = float(np.finfo(np.float32).eps)


def chain_length(c, tokens: int) -> int:
    """Summed length of the float32 reductions a training step's loss passes through (their
    errors add up along the chain), for `tokens` = rows * seq_len tokens: per layer the norm,
    q/k/v and output projections, the second norm and the MLP input over d_model (5 D), the
    scores over the head dim, softmax and values over the sequence (2 T), the MLP output over
    d_ff; then the head (final norm, unembedding and the vocabulary's logsumexp; InfoNCE's
    pooling, projection, normalisation and cosine are shorter) and the loss's sum over tokens."""
    m, t = c.model, c.data.seq_len
    layer = 5 * m.d_model + m.d_model // m.num_heads + 2 * t + m.d_ff
    return m.num_layers * layer + 2 * m.d_model + VOCAB + tokens


def step_rtol(c, tokens: int) -> float:
    """Relative bound on how far two float32 evaluations of the same training step (grad
    accumulation, pmap: other groupings of the same sums) may differ in the loss and the
    gradients: each is within K eps of the exact value, K = the forward chain, run again
    backwards, plus the weight gradients' sums over the tokens. InfoNCE's logits are cosines
    times the logit scale (20 at init, < 21 after these few steps): its errors are 20 times a
    cosine's. A real bug (a wrong normalisation, missing negatives) is a relative error >= 1/8."""
    scale = 20.0 if c.objectives.get("infonce", {}).get("weight", 0.0) else 1.0
    return 2 * scale * (2 * chain_length(c, tokens) + tokens) * F32_EPS


def assert_runs_match(c, batches, one, other, count):
    """Params and metrics of two `run_steps` of `c` on `batches` agree up to step_rtol.
    `count(batch)`: the accuracy's denominator (tokens or rows)."""
    (p1, m1), (p2, m2) = one, other
    tokens = batches[0]["tokens"].size
    rtol = step_rtol(c, tokens)
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
    p0, p1, p2 = leaves(setup(c)[-1].params), leaves(p1), leaves(p2)  # init is deterministic
    # grad_norm also sums the squares over the largest leaf, then over the leaves
    norm_rtol = rtol + 2 * (max(x.size for x in p0) + len(p0)) * F32_EPS
    for step, (a, b) in enumerate(zip(m1, m2, strict=True)):
        for k in a:
            # step t's params differ by the earlier steps' errors: t + 1 times the bound
            if k.endswith("accuracy"):  # one token's (row's) argmax may flip at a near-tie
                tol = dict(rtol=0, atol=1 / count(batches[step]))
            else:
                tol = dict(rtol=(step + 1) * (norm_rtol if k == "grad_norm" else rtol))
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
    # With optim.eps = 1 an Adam update m / (sqrt(v) + 1) errs by <= 2 times its gradient's
    # relative error (m and v), each step: per leaf, |difference| <= 2 steps rtol |update|.
    for x0, x, y in zip(p0, p1, p2, strict=True):
        update = np.linalg.norm(x - x0)
        assert np.linalg.norm(x - y) <= 2 * len(batches) * rtol * update, (x.shape, update)


def token_count(batch):
    return batch["weights"].sum()


def tiny_config(**model):
    c = get_config()
    c.model.update(dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=32, embed_dim=16,
                        **model))
    c.data.update(dict(seq_len=16, batch_size=8, eval_batch_size=8))
    c.optim.update(dict(lr=3e-3, warmup_steps=2, decay_steps=50))
    c.train.steps = 50
    return c


def lm_batch(seed=0, b=8, n=16, pad_rows=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(10, VOCAB, (b, n + 1)).astype(np.int32)
    w = np.ones((b, n), np.float32)
    w[:, : rng.integers(0, n // 2)] = 0.0  # uneven per-row counts: normalisation matters
    if pad_rows:
        w[-pad_rows:] = 0.0
    return dict(tokens=toks[:, :-1], targets=toks[:, 1:], weights=w,
                segment_ids=np.ones((b, n), np.int32),
                positions=np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy())


def infonce_config(learn_temperature=False):
    c = tiny_config(kind="encoder")
    c.data.task = "pairs"
    c.objectives = dict(infonce=dict(weight=1.0, temperature=0.1,
                                     learn_temperature=learn_temperature))
    return c


def pair_batch(seed=0, b=8):
    x, y = lm_batch(seed, b), lm_batch(seed + 100, b)
    return dict(tokens=x["tokens"], segment_ids=x["segment_ids"], positions=x["positions"],
                tokens_b=y["tokens"], segment_ids_b=y["segment_ids"], positions_b=y["positions"],
                pair_groups=np.arange(b, dtype=np.int32) % (b // 2))  # rows i, i + b/2: one fact


def setup(config, devices=None):
    config = RunConfig.from_config(config)
    model = Transformer(config.model.replace(vocab_size=VOCAB))
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    mesh = parallel.make_mesh(config.train.mesh, devices)
    init_boxed, init_state = step_lib.init_state_fns(model, config, tx)
    key = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(init_boxed, key)
    psh = parallel.param_shardings(boxed, mesh)
    ssh = parallel.state_shardings(tx, nn.meta.unbox(boxed), psh, mesh)
    state = jax.jit(init_state, out_shardings=ssh)(key)
    return model, tx, schedule, mesh, ssh, state


def run_steps(config, batches, devices=None):
    config = RunConfig.from_config(config)
    model, tx, schedule, mesh, ssh, state = setup(config, devices)
    stepper = step_lib.Stepper(model, config, tx, schedule, mesh, ssh)
    dstate = stepper.device_state(state)
    out = []
    for b in batches:
        dstate, m = stepper.train(dstate, b)
        out.append({k: float(s) / float(c) for k, (s, c) in jax.device_get(m).items()})
    return jax.device_get(stepper.params(dstate)), out


def test_schedule_matches_hand_values():
    c = tiny_config()
    c.optim.update(dict(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1))
    s = optim.learning_rate_schedule(c.optim, 100)
    # warmup: (s + 1) / 4 is exact in float32
    np.testing.assert_array_equal([float(s(i)) for i in range(4)], [0.25, 0.5, 0.75, 1.0])
    # cosine (peak 1): ~6 float32 roundings of values <= 1 (<= eps/2 each), and cos, whose
    # float32 argument pi * t is off by <= pi eps / 4 and which adds an ulp: < 8 eps absolute
    tol = dict(rtol=0, atol=8 * F32_EPS)
    np.testing.assert_allclose(float(s(4)), 1.0, **tol)
    np.testing.assert_allclose(float(s(9)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),
                               **tol)
    np.testing.assert_allclose([float(s(14)), float(s(1000))], [0.1, 0.1], **tol)


def test_weight_decay_mask_excludes_norms_biases_embeddings():
    c = tiny_config(norm="layernorm", positions="learned", type_vocab_size=2, mlp="gelu",
                    attn_bias=True, mlp_bias=True)  # q/k/v biases are rank 2 ([H, K])
    c.data.task = "bert"
    c.objectives = get_config().objectives
    c.objectives.causal_lm.weight = 0.0
    for name in ("mlm", "nsp", "infonce"):
        c.objectives[name].weight = 1.0
    for scan in (True, False):
        c.model.scan_layers = scan
        rc = RunConfig.from_config(c)
        model = Transformer(rc.model.replace(vocab_size=VOCAB))
        tx, _ = optim.make_optimizer(rc.optim, 10)
        boxed = jax.eval_shape(step_lib.init_state_fns(model, rc, tx)[0], jax.random.PRNGKey(0))
        mask = optim.decay_mask(nn.meta.unbox(boxed))
        flat = {"/".join(str(k.key) for k in p): v
                for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
        for name, decayed in flat.items():
            leaf = name.split("/")[-1]
            excluded = name.startswith("embedder/") or leaf.endswith(("scale", "bias"))
            assert decayed == (not excluded), (scan, name, decayed)
        assert any(flat.values()) and not all(flat.values())
        assert not flat["embedder/token"] and not flat["embedder/position"]
        assert any(n.endswith("attn/q_bias") for n in flat)


def test_loss_decreases_on_fixed_batch():
    c = tiny_config()
    batch = lm_batch()
    _, ms = run_steps(c, [batch] * 40)
    assert ms[-1]["causal_lm/loss"] < 0.7 * ms[0]["causal_lm/loss"], (ms[0], ms[-1])
    assert all(np.isfinite(m["grad_norm"]) for m in ms)
    # warmup step 0: lr/2, float32(3e-3) halved exactly (one rounding, <= eps/2)
    np.testing.assert_allclose(ms[0]["lr"], 3e-3 / 2, rtol=F32_EPS)


def test_grad_accum_matches_single_batch():
    c1 = tiny_config()
    c1.optim.eps = 1.0  # Adam's update is then Lipschitz in the gradients (assert_runs_match)
    c2 = tiny_config()
    c2.optim.eps = 1.0
    c2.optim.grad_accum = 4
    batches = [lm_batch(0, pad_rows=3), lm_batch(1)]  # uneven weights per microbatch
    assert_runs_match(c1, batches, run_steps(c1, batches), run_steps(c2, batches), token_count)


def test_infonce_grad_accum_sees_the_whole_batch(monkeypatch):
    """Gradient caching: with k microbatches InfoNCE still takes negatives from the whole batch,
    so loss, accuracy and the update equal one big batch's. Plain accumulation (negatives from
    each microbatch only) does not, which the last check confirms."""
    batches = [pair_batch(0), pair_batch(1)]
    c1 = infonce_config(learn_temperature=True)  # also a row-free output: the logit scale
    c1.optim.eps = 1.0  # Adam's update is then Lipschitz in the gradients (assert_runs_match)
    one = run_steps(c1, batches)
    c4 = infonce_config(learn_temperature=True)
    c4.optim.eps = 1.0
    c4.optim.grad_accum = 4
    assert_runs_match(c1, batches, one, run_steps(c4, batches), lambda b: len(b["tokens"]))
    m1 = one[1]
    plain = dataclasses.replace(OBJECTIVES["infonce"], batch_coupled=False)
    monkeypatch.setitem(OBJECTIVES, "infonce", plain)
    _, naive = run_steps(c4, batches)
    assert abs(naive[0]["infonce/loss"] - m1[0]["infonce/loss"]) > 0.1 * m1[0]["infonce/loss"]


def test_pmap_step_matches_jit_step():
    c = tiny_config()
    c.optim.eps = 1.0  # Adam's update is then Lipschitz in the gradients (assert_runs_match)
    batches = [lm_batch(0), lm_batch(1)]
    jit = run_steps(c, batches)
    c.train.parallel = "pmap"
    assert_runs_match(c, batches, jit, run_steps(c, batches), token_count)


def test_eval_step_token_weighted_independent_of_batch_split():
    c = RunConfig.from_config(tiny_config())
    model, tx, schedule, mesh, ssh, state = setup(c)
    stepper = step_lib.Stepper(model, c, tx, schedule, mesh, ssh)
    batch = lm_batch(3)
    whole = jax.device_get(stepper.eval(state.params, batch))
    halves = [jax.device_get(stepper.eval(state.params, {k: v[s] for k, v in batch.items()}))
              for s in (slice(0, 4), slice(4, 8))]
    # two float32 forwards of the same rows, each within chain_length eps of the exact loss
    rtol = 2 * chain_length(c, batch["tokens"].size) * F32_EPS
    for k, (s, n) in whole.items():
        # accuracy counts hits: one token's argmax may flip at a near-tie
        tol = dict(rtol=0, atol=1.0) if k.endswith("accuracy") else dict(rtol=rtol)
        np.testing.assert_allclose(s, halves[0][k][0] + halves[1][k][0], err_msg=k, **tol)
        # token counts: sums of 0/1 weights, exact
        np.testing.assert_array_equal(n, halves[0][k][1] + halves[1][k][1])
    # independent reference: numpy CE from the model's logits
    logits = np.asarray(model.apply({"params": state.params}, batch)["logits"], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    ref = (ce * batch["weights"]).sum() / batch["weights"].sum()
    # the reference's logits come from another (un-jitted) float32 forward: see rtol above
    np.testing.assert_allclose(whole["causal_lm/loss"][0] / whole["causal_lm/loss"][1], ref,
                               rtol=rtol)


def test_mesh_shape_resolution_and_errors():
    assert parallel.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    assert parallel.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        parallel.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        parallel.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)


@dataclasses.dataclass(frozen=True)
class _FakeDevice:  # what mesh_utils reads of a device
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v5 lite"


def test_device_grid_keeps_multislice_inner_axes_within_a_slice():
    # 2 slices x 8 devices, ids interleaved between slices so a plain reshape would mix them
    devices = [_FakeDevice(id=i, slice_index=i % 2) for i in range(16)]
    grid = parallel.device_grid((4, 2, 2), devices)
    assert grid.shape == (4, 2, 2) and sorted(d.id for d in grid.flat) == list(range(16))
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # fsdp and tensor groups never cross the data-center network; data rows 0-1 on slice 0
    assert (slice_of == np.array([0, 0, 1, 1])[:, None, None]).all()
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        parallel.device_grid((1, 8, 2), devices)
    # GPUs (whatever slices they report) and CPUs: jax.devices() order, as before
    gpu = [_FakeDevice(id=i, slice_index=i % 2, platform="gpu", device_kind="H200")
           for i in range(8)]
    np.testing.assert_array_equal(parallel.device_grid((1, 8, 1), gpu),
                                  np.array(gpu, dtype=object).reshape(1, 8, 1))
    cpu = [_FakeDevice(id=i, slice_index=0, platform="cpu", device_kind="cpu") for i in range(8)]
    np.testing.assert_array_equal(parallel.device_grid((2, 2, 2), cpu),
                                  np.array(cpu, dtype=object).reshape(2, 2, 2))


def test_mfu_formula_and_peak_table(monkeypatch):
    from solo.train import metrics, peaks

    # 1e6 FLOPs/token * 3e5 tok/s over 2 devices of 1e12 FLOP/s peak -> 15 %
    # three float64 operations (<= eps/2 each), and 0.15's own rounding
    assert metrics.mfu(1e6, 3e5, 2, peak=1e12) == pytest.approx(0.15, rel=2 * np.finfo(float).eps)
    monkeypatch.setenv("SOLO_PEAK_FLOPS", "5e11")
    assert peaks.peak_flops()[0] == 5e11
    assert metrics.mfu(5e5, 1e6, 1) == pytest.approx(1.0)  # the training log's default peak
    monkeypatch.delenv("SOLO_PEAK_FLOPS")
    cpu, how = peaks.peak_flops("float32")  # tests run on CPU: cores x clock x FLOPs a cycle
    assert cpu == peaks.cpu_peak(len(jax.devices("cpu")))[0] and "cores" in how

    class Dev:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind

    assert peaks.peak_flops("bfloat16", Dev("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert peaks.peak_flops("bfloat16", Dev("NVIDIA H100 PCIe"))[0] == 756e12
    assert peaks.peak_flops("float32", Dev("NVIDIA H200"))[0] == 494.5e12
    assert peaks.peak_flops("bfloat16", Dev("NVIDIA H200"))[0] == 989e12  # dense, not sparse
    assert peaks.peak_flops("bfloat16", Dev("NVIDIA H200 NVL"))[0] == 835e12
    assert peaks.peak_flops("float16", Dev("NVIDIA B200"))[0] == 2250e12
    assert peaks.peak_flops("bfloat16", Dev("TPU v6 lite"))[0] == 918e12
    assert peaks.peak_flops("bfloat16", Dev("TPU v5 lite"))[0] == 197e12
    assert math.isnan(peaks.peak_flops("bfloat16", Dev("mystery"))[0])


def test_progress_line_plain_and_tty():
    import io

    from solo.train import metrics

    plain = io.StringIO()
    p = metrics.Progress(100, plain)
    p.update(10, 2.5, 1000.0, 0.5)
    p.update(20, 2.0, 1000.0, 0.5)
    lines = plain.getvalue().splitlines()
    p.update(30, 9.1e-06, 1000.0, 0.5)  # a tiny fine-tuning loss keeps its digits
    lines = plain.getvalue().splitlines()
    assert lines == ["step 10/100  loss 2.5  1,000 tok/s  ETA 0:00:45",
                     "step 20/100  loss 2  1,000 tok/s  ETA 0:00:40",
                     "step 30/100  loss 9.1e-06  1,000 tok/s  ETA 0:00:35"]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = metrics.Progress(100, tty)
    p.update(10, 2.5, 1000.0, 0.5)
    p.update(20, 2.0, 1000.0, 0.5)
    p.end()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().count("\n") == 1
