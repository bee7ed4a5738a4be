"""Sampler: cached decoding vs full recomputation, batching invariance, sampling distributions,
stops, overflow errors, streaming, encoder-decoder. Tiny random models (d_model 32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import llama_style_tokenizer, model_config

from solo.agent.sampler import (
    Compose,
    Greedy,
    Sampler,
    Sampling,
    Temperature,
    TopK,
    TopP,
)
from solo.agent.streaming import RowText
from solo.data.tokenizer import BOS_ID, Tokenizer
from solo.data.world import World
from solo.model.transformer import Transformer

jax.config.update("jax_default_matmul_precision", "highest")


def tiny(kind="decoder", vocab=48, positions="rope", **kw):
    kw = dict(dict(scan_layers=True), **kw)
    cfg = model_config(kind=kind, vocab_size=vocab, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, d_ff=64, max_len=64, positions=positions, **kw)
    model = Transformer(cfg)
    batch = {"tokens": jnp.zeros((1, 4), jnp.int32)}
    if kind == "encoder_decoder":
        batch["src_tokens"] = jnp.zeros((1, 4), jnp.int32)
    return model, model.init(jax.random.key(1), batch)["params"]


@pytest.fixture(scope="module")
def dec():
    """One tiny decoder + Sampler shared by tests (its compiled buckets are reused)."""
    model, params = tiny()
    return model, params, Sampler(model, params, cache_len=64, stop_ids=())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = World.generate(seed=0, num_people=10).corpus_text()
    return Tokenizer.train([text], str(d / "char"), kind="char", vocab_size=0)


def full_logits(model, params, tokens, src=None, pad_to=24):
    """Full (uncached) forward; right-padded to pad_to so one compilation serves every length
    (causal attention: padding after the sequence cannot change its logits)."""
    padded = jnp.asarray([list(tokens) + [0] * (pad_to - len(tokens))])
    batch = {"tokens": padded}
    if src is not None:
        batch["src_tokens"] = jnp.asarray([src])
    return _forward(params, batch, model.cfg)[0, : len(tokens)]


@functools.partial(jax.jit, static_argnums=2)
def _forward(params, batch, cfg):
    return Transformer(cfg).apply({"params": params}, batch)["logits"]


F32_EPS = float(np.finfo(np.float32).eps)


def assert_greedy(model, params, prompt, out, src=None, pad_to=128):
    """`out` is a greedy continuation of `prompt`: at every step the sampled token's logit, from
    one full forward pass over the prompt and the tokens before it, is the largest up to float32
    rounding. The sampler's cached decode and the full pass compute the same logits with other
    reduction orders, each within K eps of their scale (K: the summed reduction lengths of the
    model, as tests/test_model.py's chain_length), so a near-tie may break either way; anything
    else (a leaked pad, a wrong position, a stale cache slot) picks a clearly worse token."""
    cfg = model.cfg
    layer = 3 * cfg.d_model + cfg.head_dim + 2 * pad_to + 2 * cfg.d_model + cfg.d_ff
    k = (cfg.num_decoder_layers if cfg.kind == "encoder_decoder" else cfg.num_layers) * layer
    k += 2 * cfg.d_model + (cfg.num_layers * layer if cfg.kind == "encoder_decoder" else 0)
    seq = list(prompt) + list(out)
    logits = np.asarray(full_logits(model, params, seq[:-1] if out else seq, src, pad_to))
    for t, tok in enumerate(out):
        row = logits[len(prompt) - 1 + t]
        atol = 2 * k * F32_EPS * float(np.abs(row).max())
        assert row[tok] >= row.max() - atol, (t, tok, int(row.argmax()), row.max() - row[tok])


def test_long_decodes_grow_the_cache_and_equal_the_full_recompute_reference():
    """A 90-token decode grows the cache between loop calls (sampler._windows): every token
    equals greedy decoding by full forward passes, non-streaming and in chunks that cross a
    growth."""
    from solo.agent.sampler import _windows

    assert _windows(16, 112) == (80, 112)  # the case below: two segments
    model, params = tiny()
    prompts = [[BOS_ID, 30], [BOS_ID] + list(range(10, 21))]
    sampler = Sampler(model, params, cache_len=128, stop_ids=())
    got, _ = sampler.generate_ids(prompts, max_new_tokens=90)
    for p, row in zip(prompts, got, strict=True):
        assert len(row) == 90
        assert_greedy(model, params, p, row)
    parts = [new for new, _, _ in sampler.iterate(prompts, max_new_tokens=90, chunk=7)]
    assert np.concatenate(parts, axis=1).tolist() == got


def test_greedy_equals_full_recompute_reference(dec):
    model, params, sampler = dec
    prompt = [BOS_ID, 20, 21, 22]
    (out,), (reason,) = sampler.generate_ids([prompt], max_new_tokens=10)
    assert len(out) == 10 and reason == "length"
    assert_greedy(model, params, prompt, out)  # reference: a full forward pass


def test_batch_of_mixed_lengths_matches_alone(dec):
    """Each row of a left-padded batch, and each prompt alone, is the greedy continuation of
    its own prompt (other batch shapes change reduction orders, so only a near-tie could make
    the two differ: assert_greedy)."""
    model, params, sampler = dec
    prompts = [[BOS_ID, 30], [BOS_ID] + list(range(10, 27)), [BOS_ID, 5 + 10, 40, 41, 42]]
    batch, _ = sampler.generate_ids(prompts, max_new_tokens=9)
    for p, got in zip(prompts, batch, strict=True):
        alone, _ = sampler.generate_ids([p], max_new_tokens=9)
        assert len(got) == len(alone[0]) == 9
        assert_greedy(model, params, p, got)
        assert_greedy(model, params, p, alone[0])


def test_per_row_budgets_match_each_row_alone(dec):
    model, params, sampler = dec
    prompts = [[BOS_ID, 30], [BOS_ID] + list(range(10, 27)), [BOS_ID, 15, 40]]
    budgets = [3, 11, 6]
    batch, reasons = sampler.generate_ids(prompts, max_new_tokens=budgets)
    for p, m, got in zip(prompts, budgets, batch, strict=True):
        assert len(got) == m
        assert_greedy(model, params, p, got)
    assert reasons == ["length"] * 3
    with pytest.raises(ValueError, match="2 budgets for 3 prompts"):
        sampler.generate_ids(prompts, max_new_tokens=[3, 4])


class _Bytes:  # id -> one byte; decode like sentencepiece's byte fallback
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_row_text_holds_back_what_a_stop_string_or_utf8_could_still_change():
    row = RowText(_Bytes(), max_new=20, stop=["END"])
    assert row.feed(b"abE", {0}) == "ab"  # "E" could still begin "END"
    assert row.feed(b"Nx", {0}) == "ENx"  # no end of "abENx" begins "END": all final
    assert row.feed("é".encode()[:1], {0}) == ""  # half a UTF-8 character: held
    assert row.feed("é".encode()[1:] + b"zEND!", {0}) == "éz"  # cut before the stop
    assert row.finish == "stop" and row.text == "abENxéz"
    gen, rest = row.close()
    assert rest == "" and gen.text == "abENxéz" and gen.finish_reason == "stop"
    row = RowText(_Bytes(), max_new=3, incremental=False)
    row.feed(b"hi", {0})
    assert row.finish is None
    row.feed([0, 33], {0})  # stop id 0 ends the row; the id after it is ignored
    gen, rest = row.close()
    assert (gen.tokens, gen.text, gen.finish_reason, rest) == ([104, 105], "hi", "stop", "hi")


@pytest.mark.parametrize("limit, patterns, stop", [
    (0, (), ()), (6, (), ()), (0, ("secret",), ()), (0, (), ("\n",)), (4, ("is",), ("\n",)),
    (0, ("secret$",), ()), (0, (r"\bsecre\b",), ()),  # a match the text's growth undoes
    (0, ("nice", "is"), ()), (0, ("secret$", "is"), ()),  # the first match to end is the one
    (0, ("is", r"\bth"), ()), (0, ("!", r"s\b"), ("\n",)),
])
def test_row_text_guards_give_one_text_to_stream_and_answer(limit, patterns, stop):
    """Every chunking of a row (and no streaming at all) gives the same text, streamed exactly
    as answered: the output guard's decision on the whole reply (Guards.check_output after the
    stop strings' cut), and the tokens kept are exactly those whose decode is that text."""
    import re

    from solo.agent.guards import NO_LIMITS, GuardConfig, Guards

    guards = Guards(GuardConfig(**{**NO_LIMITS.__dict__, "max_output_chars": limit,
                                   "blocked_patterns": patterns, "refusal": "No."}))
    for full in ["Oslo<|user|>more", "Paris is nice\nQ: what", "the secret is 42\n",
                 "abcdefghij", "no<|us", "ok", "<|end|>x", "Cé\nsecret"]:
        cut = min((full.find(s) for s in stop if s in full), default=len(full))
        want = guards.check_output(full[:cut])
        ids = list(full.encode()) + [0]  # stop id 0 ends the row
        results = set()
        for chunk in [1, 2, 3, 5, len(ids)]:
            for incremental in (True, False):
                row = RowText(_Bytes(), 64, stop, guards=guards, incremental=incremental)
                streamed = "".join(row.feed(ids[i:i + chunk], {0})
                                   for i in range(0, len(ids), chunk))
                gen, rest = row.close()
                assert streamed + rest == gen.text == want.text, (full, chunk)
                assert (gen.guard.action, gen.guard.reason) == (want.action, want.reason)
                if want.allowed:  # the kept tokens decode to the text, one more would not
                    assert bytes(gen.tokens).decode() == gen.text
                results.add((gen.text, gen.finish_reason, tuple(gen.tokens)))
        assert len(results) == 1, (full, results)  # one decision, however it was chunked
        if want.action == "refuse":  # the same pattern, matched at the end of the kept tokens
            assert gen.guard.pattern == want.pattern
            assert re.search(want.pattern, bytes(gen.tokens).decode())


def test_row_text_stop_string_trims_the_tokens_past_it():
    """The review's repro: a stop string cuts the text; usage and log-probs count the tokens
    of the text returned, not the chunk's tokens past the stop."""
    row = RowText(_Bytes(), 64, stop=["\n"], incremental=False)
    row.feed(list(b"Paris.\nQ: what"), {0})
    gen, _ = row.close()
    assert (gen.text, gen.finish_reason, bytes(gen.tokens)) == ("Paris.", "stop", b"Paris.")
    row = RowText(_Bytes(), 64, stop=["\n"])
    assert row.feed(list(b"Paris.\nQ"), {0}) == "Paris." and row.finish == "stop"
    assert bytes(row.close()[0].tokens) == b"Paris."


def test_row_text_of_a_continuation_keeps_the_leading_space_a_metaspace_decode_strips():
    """Llama 2's decoder strips a text's first space, so "▁sat" decoded alone is "sat"; after
    "the king" the continuation is " sat on his throne" (transformers' text-generation pipeline:
    the full decode less the prompt's), streamed in every chunking as answered, cut at a stop
    string. A chat reply (no context) is its tokens' own decode."""
    tok = llama_style_tokenizer()
    prompt, new = tok.encode("the king"), tok.encode("sat on his throne")
    assert tok.decode(new) == "sat on his throne"  # what the row said before it had a context
    for stop, want in [((), " sat on his throne"), ((" his",), " sat on")]:
        for chunk in (1, 2, len(new)):
            for incremental in (True, False):
                row = RowText(tok, 64, stop, incremental=incremental,
                              context=[tok.bos_id, *prompt])
                streamed = "".join(row.feed(new[i:i + chunk], set())
                                   for i in range(0, len(new), chunk))
                gen, rest = row.close()
                assert streamed + rest == gen.text == want, (stop, chunk, incremental)
                assert gen.tokens == new[: len(want.split())]  # the tokens of the text kept
    row = RowText(tok, 64)  # a chat reply
    row.feed(new, set())
    assert row.close()[0].text == "sat on his throne"


def test_generate_continues_a_text_prompt_in_context():
    """Sampler.generate's text is the full decode less the prompt's, streamed or not; a chat
    reply (continuation=False) is the tokens' own decode."""
    tok = llama_style_tokenizer()
    model, params = tiny(vocab=tok.vocab_size)
    sampler = Sampler(model, params, tok, cache_len=64, stop_ids=())
    prompts = ["the king", "he spoke to"]
    free = sampler.generate(prompts, max_new_tokens=6)
    deltas = {0: [], 1: []}
    streamed = sampler.generate(prompts, max_new_tokens=6, chunk=2,
                                stream_cb=lambda i, d: deltas[i].append(d))
    alone = sampler.generate(prompts, max_new_tokens=6, continuation=False)
    for i, p in enumerate(prompts):
        ids = [tok.bos_id, *tok.encode(p)]
        want = tok.decode(ids + free[i].tokens)[len(tok.decode(ids)):]
        assert free[i].text == streamed[i].text == "".join(deltas[i]) == want
        assert alone[i].text == tok.decode(free[i].tokens)
    assert any(g.text.startswith(" ") for g in free)  # the case the context decides


def test_seeded_sampling_reproducible(dec):
    model, params, sampler = dec
    m = Sampling(temperature=1.0, top_k=20, top_p=0.95)
    a, _ = sampler.generate_ids([[BOS_ID, 11]] * 2, max_new_tokens=12, method=m, seed=3)
    b, _ = sampler.generate_ids([[BOS_ID, 11]] * 2, max_new_tokens=12, method=m, seed=3)
    c, _ = sampler.generate_ids([[BOS_ID, 11]] * 2, max_new_tokens=12, method=m, seed=4)
    assert a == b and a != c
    assert a[0] != a[1]  # rows draw independently


def _frequencies(method, logits, n=6000, seed=0):
    logits_BV = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    toks = np.asarray(method(logits_BV, jax.random.key(seed)))
    return np.bincount(toks, minlength=len(logits))


def _chi2_ok(counts, probs):
    """Pearson's chi-square test of the counts against probs: a correct sampler fails it with
    probability 1e-6 (the p-value is uniform). Power: with n = 6000 draws, two probabilities off
    by 0.05 (a wrong temperature or kept set) add >= 2 n 0.05^2 / 0.47 = 64 to the statistic
    (the largest probability below is 0.47), beyond its 1e-6 quantile (28 for 2 degrees of
    freedom, 41 for 7)."""
    from scipy.stats import chisquare

    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the kept set"
    expected = probs[support] * counts.sum()
    return chisquare(counts[support], expected).pvalue > 1e-6


LOGITS = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01]))


def test_topk_frequencies_match_renormalised():
    ref = np.exp(LOGITS)
    ref[3:] = 0
    assert _chi2_ok(_frequencies(TopK(3), LOGITS), ref / ref.sum())


def test_topp_frequencies_match_renormalised():
    # mass before each token: 0, .3, .55, .75, ... -> p=0.7 keeps 3 tokens (the 3rd crosses .7)
    ref = np.exp(LOGITS)
    ref[3:] = 0
    assert _chi2_ok(_frequencies(TopP(0.7), LOGITS), ref / ref.sum())


def test_composition_temperature_then_topk_topp():
    t = 0.5
    tempered = np.exp(LOGITS / t) / np.exp(LOGITS / t).sum()
    # tempered probs ~ [.41,.28,.18,.045,...]: top-k 5 then top-p .8 keeps the first 3
    ref = tempered.copy()
    ref[3:] = 0
    method = Compose(Temperature(t), TopK(5), TopP(0.8))
    assert _chi2_ok(_frequencies(method, LOGITS), ref / ref.sum())
    plain = _frequencies(Temperature(1.0), LOGITS)
    assert _chi2_ok(plain, np.exp(LOGITS) / np.exp(LOGITS).sum())


def test_topp_keeps_crossing_token_hand_example():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: np.flatnonzero(np.asarray(TopP(p).transform(logits))[0] > -1e29).tolist()
    assert kept(0.6) == [0, 1]  # 0.5 < 0.6 so 0.3 (the crossing token) is kept
    assert kept(0.5) == [0]  # mass reaches 0.5 exactly with the first token
    assert kept(0.81) == [0, 1, 2]  # 0.15 crosses 0.81 (mass before it is 0.8)
    assert kept(0.96) == [0, 1, 2, 3]
    assert kept(1e-6) == [0]  # always at least one token


def test_sampling_factory_and_greedy():
    assert isinstance(Sampling(0.0, 40, 0.5).method(), Greedy)
    assert Sampling(0.7).method() == Temperature(0.7)
    logits = jnp.asarray([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert Greedy()(logits, None).tolist() == [1, 0]
    with pytest.raises(ValueError):
        Sampling(temperature=-1.0).method()


def test_stop_tokens_end_rows_independently(dec):
    model, params, sampler = dec
    prompts = [[BOS_ID, 11, 12], [BOS_ID, 30, 31, 32, 33], [BOS_ID, 44]]
    free, _ = sampler.generate_ids(prompts, max_new_tokens=16)
    stop = free[0][4]  # a token row 0 emits at step 4 (maybe earlier too)
    got, reasons = sampler.generate_ids(prompts, max_new_tokens=16, stop_ids=(stop,))
    for row, g, r in zip(free, got, reasons, strict=True):
        expected = row[: row.index(stop)] if stop in row else row
        assert g == expected and r == ("stop" if stop in row else "length")


def test_stop_strings_and_streaming(tok):
    model, params = tiny(vocab=tok.vocab_size)
    sampler = Sampler(model, params, tok, cache_len=64, stop_ids=())
    prompts = ["Anya was born", "Where does Bruno live?"]
    free = sampler.generate(prompts, max_new_tokens=20)
    text0 = free[0].text
    assert text0, "model produced no text"
    stop = text0[len(text0) // 2: len(text0) // 2 + 2]
    for chunk in (1, 3):
        deltas = {0: [], 1: []}
        got = sampler.generate(prompts, max_new_tokens=20, stop=[stop], chunk=chunk,
                               stream_cb=lambda i, d, deltas=deltas: deltas[i].append(d))
        for i, (f, g) in enumerate(zip(free, got, strict=True)):
            cut = f.text.find(stop)
            assert g.text == (f.text[:cut] if cut >= 0 else f.text)
            assert g.finish_reason == ("stop" if cut >= 0 else "length")
            assert "".join(deltas[i]) == g.text  # streamed text == final text
            assert stop not in g.text


def test_overlong_prompt_is_a_clear_error():
    model, params = tiny()
    sampler = Sampler(model, params, cache_len=32)
    with pytest.raises(ValueError, match="cache_len=32"):
        sampler.generate_ids([[BOS_ID] + [11] * 25], max_new_tokens=8)
    sampler.generate_ids([[BOS_ID] + [11] * 23], max_new_tokens=8)  # exactly fits
    trunc = Sampler(model, params, cache_len=32, overflow="truncate_left", stop_ids=())
    long = [BOS_ID] + list(range(10, 40))
    a, _ = trunc.generate_ids([long], max_new_tokens=8)
    b, _ = trunc.generate_ids([long[-24:]], max_new_tokens=8)
    assert a == b
    with pytest.raises(ValueError):
        trunc.generate_ids([[BOS_ID]], max_new_tokens=0)


def test_learned_positions_cache_len_bounded():
    model, params = tiny(positions="learned", norm="layernorm", mlp="gelu")
    with pytest.raises(ValueError, match="max_len"):
        Sampler(model, params, cache_len=128)


def test_encoder_decoder_encodes_once_then_decodes():
    model, params = tiny(kind="encoder_decoder")
    sampler = Sampler(model, params, cache_len=32, stop_ids=())
    src = [12, 13, 14, 15, 16]
    (out,), _ = sampler.generate_ids([src], max_new_tokens=6)
    assert len(out) == 6
    assert_greedy(model, params, [BOS_ID], out, src=src)  # reference: full teacher-forced pass
