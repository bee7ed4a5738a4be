"""The harness endpoints (/v1/completions with logprobs and echo, chat logprobs, /v1/embeddings,
/health, the tokenizer endpoints) against the official `openai` client on a real localhost
server; every log-probability and embedding is compared with the model's own forward pass."""


import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from helpers import llama_style_tokenizer, model_config, serving

from solo.agent.chat import CHAT_STOP_IDS
from solo.agent.sampler import Sampler
from solo.agent.scoring import Scorer
from solo.agent.server import make_app
from solo.data.chat import chat_template
from solo.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from solo.data.world import World
from solo.model.transformer import Transformer

# float32 log-softmax over V ~ 100 classes of logits from a 1-layer, 32-wide model: each logit is a
# sum of 32 products (error <= 32 * eps * sum|terms| ~ 1e-5 here), and the padded, bucketed batch
# the server scores may sum in another order than the reference's exact-length row
TOL = 1e-4
PROMPT = "Anya Dorsey lives in"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return Tokenizer.train([World.generate(seed=0, num_people=10).corpus_text()], str(d / "c"),
                           kind="char", vocab_size=0)


@pytest.fixture(scope="module")
def decoder(tok):
    cfg = model_config(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2,
                       d_ff=64, max_len=96)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(2),
                                 {"tokens": jnp.zeros((1, 4), jnp.int32)})["params"]
    return model, params


def log_softmax(model, params, ids):
    """The reference: the model's float32 log-softmax over one exact-length row [L, V]."""
    out = jax.jit(model.apply)({"params": params}, {"tokens": jnp.asarray([ids], jnp.int32)})
    return np.asarray(jax.nn.log_softmax(out["logits"][0].astype(jnp.float32), -1))


@pytest.fixture(scope="module")
def sampler(decoder, tok):
    model, params = decoder
    return Sampler(model, params, tok, cache_len=96, stop_ids=CHAT_STOP_IDS)


@pytest.fixture(scope="module")
def base_url(sampler):
    with serving(make_app(sampler, model_name="tiny", max_new_tokens=8)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def generated(sampler, ids, n):
    """Greedy continuation ids of a raw prompt, with the stop id that ended it (if one did)."""
    rows, reasons = sampler.generate_ids([ids], max_new_tokens=n)
    logits = log_softmax(sampler.model, sampler.variables["params"], ids + rows[0])
    stop = [int(np.argmax(logits[-1]))] if reasons[0] == "stop" else []
    return rows[0] + stop


def test_completion_echo_logprobs_are_the_models_log_softmax(client, sampler, tok):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, echo=True,
                                  logprobs=3, temperature=0)
    c = r.choices[0]
    ids = [BOS_ID] + tok.encode(PROMPT)
    full = ids + generated(sampler, ids, 4)
    ref = log_softmax(sampler.model, sampler.variables["params"], full)
    lp = c.logprobs
    # every token after BOS: the prompt's (echo) and the completion's, stop token included
    assert len(lp.token_logprobs) == len(full) - 1 == len(lp.tokens) == len(lp.top_logprobs)
    want = [ref[t - 1, full[t]] for t in range(1, len(full))]
    np.testing.assert_allclose(lp.token_logprobs, want, atol=TOL)
    for t, top in zip(range(1, len(full)), lp.top_logprobs, strict=True):
        best = np.sort(ref[t - 1])[::-1][:3]  # the 3 most likely, by value (names may collide)
        assert 1 <= len(top) <= 3
        assert all(np.abs(best - v).min() < TOL for v in top.values())
        assert max(top.values()) == pytest.approx(best[0], abs=TOL)
    assert c.text.startswith(PROMPT) and "".join(lp.tokens[: len(ids) - 1]) == PROMPT
    assert lp.text_offset[: 3] == [0, 1, 2]
    assert r.usage.prompt_tokens == len(ids)


def test_max_tokens_zero_scores_the_prompt_only(client, sampler, tok):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                  logprobs=1)
    c = r.choices[0]
    ids = [BOS_ID] + tok.encode(PROMPT)
    ref = log_softmax(sampler.model, sampler.variables["params"], ids)
    assert c.text == PROMPT and r.usage.completion_tokens == 0
    np.testing.assert_allclose(c.logprobs.token_logprobs,
                               [ref[t - 1, ids[t]] for t in range(1, len(ids))], atol=TOL)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert plain.choices[0].text == "" and plain.choices[0].logprobs is None


def test_token_id_prompts_are_scored_as_given(client, sampler, tok):
    ids = tok.encode(PROMPT)[:10]  # no BOS: the first token has no context, so no logprob
    r = client.completions.create(model="tiny", prompt=[ids, [BOS_ID] + ids], max_tokens=0,
                                  echo=True, logprobs=0)
    a, b = (c.logprobs.token_logprobs for c in r.choices)
    assert a[0] is None and b[0] is None and len(a) == 10 and len(b) == 11
    ref = log_softmax(sampler.model, sampler.variables["params"], ids)
    np.testing.assert_allclose(a[1:], [ref[t - 1, ids[t]] for t in range(1, 10)], atol=TOL)


def test_completion_text_n_and_stop(client, sampler, tok):
    ids = [BOS_ID] + tok.encode(PROMPT)
    new = sampler.generate_ids([ids], max_new_tokens=6, stop_ids=tok.stop_ids)[0][0]
    want = tok.decode(ids + new)[len(tok.decode(ids)):]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    kw = dict(model="tiny", prompt=[PROMPT, "Hiro Galindo was born in"], max_tokens=5, n=2,
              temperature=1.0, seed=3)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == list(range(4))  # prompt i, choice j: i * n + j
    texts = [c.text for c in r.choices]
    assert texts == [c.text for c in client.completions.create(**kw).choices]  # seeded
    assert texts[0] != texts[1]  # choice j samples with seed + j
    if len(want) > 2:  # a stop string cuts the text before it
        cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                        stop=[want[2]])
        assert cut.choices[0].text == want[: want.index(want[2])]
        assert cut.choices[0].finish_reason == "stop"


def test_stop_string_usage_and_logprobs_count_the_texts_tokens(client, sampler, tok):
    """A stop string cuts the text inside a decode chunk: usage.completion_tokens and the
    logprobs are the tokens whose decode is the returned text, not the chunk's tokens past it."""
    ids = [BOS_ID] + tok.encode(PROMPT)
    new = sampler.generate_ids([ids], max_new_tokens=12, stop_ids=tok.stop_ids)[0][0]
    after = lambda k: tok.decode(ids + new[:k])[len(tok.decode(ids)):]  # noqa: E731
    full = after(len(new))
    assert len(full) >= 6
    stop = full[2:4]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                  logprobs=0, stop=[stop])
    text, k = r.choices[0].text, r.usage.completion_tokens
    assert text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert after(k).startswith(text) and not (k and after(k - 1).startswith(text))
    assert len(r.choices[0].logprobs.tokens) == k


def test_completion_is_decoded_after_the_prompt_with_a_metaspace_tokenizer():
    """Llama 2's decoder strips a text's first space: the completion is the full decode less the
    prompt's (its leading space kept), and a stop string is found in that text, so a stop at
    the first word's space ends the row there (finish 'stop', no tokens counted)."""
    tok = llama_style_tokenizer()
    cfg = model_config(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2,
                       d_ff=64, max_len=64)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(3),
                                 {"tokens": jnp.zeros((1, 4), jnp.int32)})["params"]
    sampler = Sampler(model, params, tok, cache_len=64, stop_ids=tok.stop_ids)
    ids = [tok.bos_id, *tok.encode("the king")]
    new = sampler.generate_ids([ids], max_new_tokens=6, stop_ids=tok.stop_ids)[0][0]
    want = tok.decode(ids + new)[len(tok.decode(ids)):]
    assert want.startswith(" ") and not tok.decode(new).startswith(" ")
    with serving(make_app(sampler, model_name="llama", max_new_tokens=6)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="llama", prompt="the king", max_tokens=6,
                                      temperature=0)
        assert r.choices[0].text == want and r.usage.completion_tokens == len(new)
        first = want.split(" ")[1]
        cut = client.completions.create(model="llama", prompt="the king", max_tokens=6,
                                        temperature=0, stop=[" " + first])
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == 0


def test_chat_logprobs_are_the_models_log_softmax(client, sampler, tok):
    messages = [{"role": "user", "content": "Where does Anya live?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                       logprobs=True, top_logprobs=2)
    template = chat_template(tok)
    ids, _ = template.encode(messages, add_generation_prompt=True)
    reply = sampler.generate_ids([ids], max_new_tokens=6, stop_ids=template.stop_ids)[0][0]
    ref = log_softmax(sampler.model, sampler.variables["params"], ids + reply)
    content = r.choices[0].logprobs.content  # the reply's tokens (not its end-of-turn)
    assert reply and len(content) == len(reply)
    np.testing.assert_allclose([e.logprob for e in content],
                               [ref[len(ids) + i - 1, t] for i, t in enumerate(reply)], atol=TOL)
    assert all(len(e.top_logprobs) == 2 for e in content)


def test_bad_completion_requests_are_400(base_url, client):
    def post(path, body):
        r = httpx.post(base_url + path, json=body, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert post("/v1/completions", {"model": "tiny"})["param"] == "prompt"
    assert post("/v1/completions", {"prompt": [1, 10**9]})["param"] == "prompt"
    assert post("/v1/completions", {"prompt": "a", "logprobs": 99})["param"] == "logprobs"
    assert post("/v1/completions", {"prompt": "a", "best_of": 3})["param"] == "best_of"
    assert post("/v1/completions", {"prompt": "a" * 200, "max_tokens": 1})["code"] == \
        "context_length_exceeded"
    # a decoder without an embedding head (and the server not told to mean-pool) has none
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="Anya")
    assert e.value.code == "no_embedding_head" and "--embeddings mean" in str(e.value)


def test_chat_only_server_refuses_completions(sampler):
    with serving(make_app(sampler, model_name="tiny", chat_only=True)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                      logprobs=1)
        assert e.value.code == "chat_only"
        assert client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "hi"}], max_tokens=2).choices[0].message is not None
        h = httpx.get(url + "/health", timeout=60)
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["chat_only"]


def test_embeddings_equal_the_encoders_embedding_head(tok):
    cfg = model_config(vocab_size=tok.vocab_size, kind="encoder", d_model=32, num_layers=1,
                       num_heads=2, d_ff=64, max_len=64, embed_dim=16)
    model = Transformer(cfg)
    params = jax.jit(model.init, static_argnames="heads")(
        jax.random.key(0), {"tokens": jnp.zeros((1, 4), jnp.int32)}, heads=("embed",))["params"]
    scorer = Scorer(model, params, tok)
    texts = ["Anya Dorsey lives in Oslo.", "Hiro"]
    with serving(make_app(None, scorer=scorer, model_name="enc")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.embeddings.create(model="enc", input=texts)  # base64 by default
        f = client.embeddings.create(model="enc", input=texts, encoding_format="float")
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="enc", prompt="a", max_tokens=1)
        assert e.value.code == "unsupported_model"
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, np.array([d.embedding for d in f.data]), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    for text, e in zip(texts, got, strict=True):
        ids = [BOS_ID] + tok.encode(text) + [EOS_ID]  # as training frames a contrastive view
        want = jax.jit(model.apply, static_argnames="heads")(
            {"params": params}, {"tokens": jnp.asarray([ids])}, heads=("embed",))["embedding"][0]
        np.testing.assert_allclose(e, np.asarray(want), atol=1e-5)


def test_mean_pooled_embeddings_of_a_decoder(decoder, tok):
    model, params = decoder
    scorer = Scorer(model, params, tok, pooling="mean")
    ids = scorer.text_ids("Hiro Galindo")
    (e,) = scorer.embed([ids])
    hidden = np.asarray(jax.jit(model.apply)({"params": params},
                                             {"tokens": jnp.asarray([ids])})["hidden"][0],
                        np.float64)
    want = hidden.mean(0) / np.linalg.norm(hidden.mean(0))
    np.testing.assert_allclose(e, want, atol=1e-5)


def test_tokenizer_endpoints(base_url, tok):
    info = httpx.get(base_url + "/tokenizer_info", timeout=60).json()
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 96
    ids = httpx.post(base_url + "/tokenize", json={"prompt": PROMPT,
                                                    "add_special_tokens": False}, timeout=60).json()
    assert ids["tokens"] == tok.encode(PROMPT)
    text = httpx.post(base_url + "/detokenize", json={"tokens": ids["tokens"]}, timeout=60).json()
    assert text["prompt"] == PROMPT


def test_logits_chunk_model_scores_as_without_it(decoder, tok):
    """A run trained with model.logits_chunk (its forward returns lm_hidden/lm_kernel, no logits)
    scores the same log-probabilities as the same params with logits_chunk=0."""
    model, params = decoder
    chunked = Transformer(model.cfg.replace(logits_chunk=8))
    ids = [BOS_ID, *tok.encode(PROMPT)]
    got = Scorer(chunked, params, tok).score([ids], top_k=2)[0]
    ref = log_softmax(model, params, ids)
    assert np.allclose(got.logprobs[1:], [ref[t - 1, ids[t]] for t in range(1, len(ids))],
                       atol=TOL)
    plain = Scorer(model, params, tok).score([ids], top_k=2)[0]
    assert [[i for i, _ in t] for t in got.top[1:]] == [[i for i, _ in t] for t in plain.top[1:]]
    # the sampler decodes through Transformer.decode, which always gives logits
    greedy = Sampler(chunked, params, tok, cache_len=32).generate_ids([ids], max_new_tokens=4)
    assert greedy == Sampler(model, params, tok, cache_len=32).generate_ids([ids],
                                                                          max_new_tokens=4)


def test_raw_completions_stop_only_at_the_tokenizers_stop_ids(tok):
    """A model that always writes USER_ID, one of the chat template's stop ids but not the
    tokenizer's: a raw completion runs to its budget (as `solo sample` does), a chat reply ends
    at once."""
    import flax.linen as nn

    from solo.data.tokenizer import USER_ID

    assert USER_ID in CHAT_STOP_IDS and USER_ID not in tok.stop_ids
    cfg = model_config(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2,
                       d_ff=64, max_len=32, norm="layernorm", tie_embeddings=False)
    model = Transformer(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), {
        "tokens": jnp.zeros((1, 4), jnp.int32)})["params"])
    # final norm output = e_0 at every position; logits = lm_head row 0: USER_ID wins
    params["decoder"]["final_norm"] = dict(scale=jnp.zeros(32), bias=jnp.eye(32)[0])
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = jnp.zeros_like(kernel).at[0, USER_ID].set(10.0)
    app = make_app(Sampler(model, params, tok, cache_len=32, stop_ids=CHAT_STOP_IDS),
                   model_name="tiny", max_new_tokens=4)
    with serving(app) as url:
        raw = httpx.post(url + "/v1/completions", timeout=60, json=dict(
            model="tiny", prompt="Anya", max_tokens=4, temperature=0)).json()
        chat = httpx.post(url + "/v1/chat/completions", timeout=60, json=dict(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            temperature=0)).json()
    assert (raw["choices"][0]["finish_reason"], raw["usage"]["completion_tokens"]) == (
        "length", 4)
    assert (chat["choices"][0]["finish_reason"], chat["usage"]["completion_tokens"]) == (
        "stop", 0)
