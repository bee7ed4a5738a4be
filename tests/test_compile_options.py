"""solo.compile_options: per-jit XLA:CPU library-fusion choices, with a safe fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solo import compile_options as co

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _mlp(x, w):
    return jnp.tanh(x @ w).sum(-1)


F32_EPS = float(np.finfo(np.float32).eps)


def _mlp_atol(x, w):
    """Bound on |float32 _mlp - exact| per row (float64 reference on the same inputs): an entry
    z of x @ w errs by <= K eps sum|x w| (a K-term dot, Higham), which tanh damps by
    tanh'(z) = 1 - tanh(z)^2, and tanh adds <= 4 eps (a few ulp); the sum of the F tanh values
    adds F eps of their absolute sum. A wrong fusion or operand is an O(1) error."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    t = np.tanh(x @ w)
    dot = x.shape[-1] * F32_EPS * (np.abs(x) @ np.abs(w))
    return ((1 - t**2) * dot + 4 * F32_EPS).sum(-1) + t.shape[-1] * F32_EPS * np.abs(t).sum(-1)


def _compiled_text(opts):
    x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
    return jax.jit(_mlp, compiler_options=opts).lower(x, w).compile().as_text()


def test_train_turns_library_fusions_off_and_decode_keeps_dots_only():
    train, decode = co.compiler_options("train"), co.compiler_options("decode")
    assert train == {co._KEY: ""}
    assert "ynn_fusion" in _compiled_text(None)  # jaxlib's default: YNNPACK fusions
    assert "ynn_fusion" not in _compiled_text(train)
    assert " dot(" in _compiled_text(train).split("ENTRY")[1]  # XLA's own dot instead
    assert "ynn_fusion" in _compiled_text(decode)  # the dot stays a YNNPACK call


def test_same_numbers_with_and_without_options():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    ref = np.tanh(np.asarray(x, np.float64) @ np.asarray(w, np.float64)).sum(-1)
    for opts in (None, co.compiler_options("train"), co.compiler_options("decode")):
        got = np.asarray(jax.jit(_mlp, compiler_options=opts)(x, w), np.float64)
        np.testing.assert_array_less(np.abs(got - ref), _mlp_atol(x, w))


def test_defaults_off_cpu_or_on_request():
    assert co.compiler_options("train", xla_defaults=True) is None
    assert co.compiler_options("train", backend="gpu") is None
    with pytest.raises(KeyError):
        co.compiler_options("nonsense")


def test_unknown_option_value_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(co.YNN_FUSIONS, "train", "NOT_A_FUSION_TYPE")
    with caplog.at_level(logging.WARNING, logger="solo.compile"):
        assert co.compiler_options("train") is None
    assert "unsupported by this jaxlib" in caplog.text


def test_pmap_steps_compile_with_the_options_once_per_signature():
    """jax.pmap takes no compiler_options: PmapWithOptions lowers + compiles with them."""
    from solo.train.step import PmapWithOptions

    f = jax.pmap(_mlp)
    wrapped = PmapWithOptions(f, co.compiler_options("train"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 64, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 32, 48)), jnp.float32)
    assert "ynn_fusion" in f.lower(x, w).compile().as_text()  # what plain pmap would run
    ref = np.tanh(np.asarray(x[0], np.float64) @ np.asarray(w[0], np.float64)).sum(-1)
    got = np.asarray(wrapped(x, w)[0], np.float64)
    np.testing.assert_array_less(np.abs(got - ref), _mlp_atol(x[0], w[0]))
    wrapped(x + 1, w)  # same signature: reuses the executable
    assert len(wrapped._compiled) == 1
    (exe,) = wrapped._compiled.values()
    assert "ynn_fusion" not in exe.as_text() and " dot(" in exe.as_text()
    wrapped(x[:, :8], w)  # a new shape compiles once more
    assert len(wrapped._compiled) == 2
    assert PmapWithOptions(f, None)(x, w).shape == (1, 64)  # no options: plain pmap
