"""OpenAI-compatible server against the official `openai` client on a real localhost uvicorn."""

import concurrent.futures
import dataclasses
import json
import socket
import time

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest
from helpers import model_config, serving

from solo.agent.chat import CHAT_STOP_IDS, ChatSession
from solo.agent.guards import NO_LIMITS, Guards
from solo.agent.sampler import Sampler
from solo.agent.server import make_app
from solo.data.tokenizer import Tokenizer
from solo.data.world import World
from solo.model.transformer import Transformer

QUESTION = [{"role": "user", "content": "Where does Anya live?"}]


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer.train([World.generate(seed=0, num_people=10).corpus_text()], str(d / "c"),
                          kind="char", vocab_size=0)
    cfg = model_config(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2,
                       d_ff=64, max_len=96, scan_layers=True)
    model = Transformer(cfg)
    # key 2: the random model's replies to the test questions are non-empty, some shorter than
    # their budget (a reply may stop at once: the tests need text to stream and cut)
    params = model.init(jax.random.key(2), {"tokens": jnp.zeros((1, 4), jnp.int32)})["params"]
    return Sampler(model, params, tok, cache_len=96, stop_ids=CHAT_STOP_IDS)


@pytest.fixture(scope="module")
def base_url(sampler):
    app = make_app(sampler, model_name="tiny", max_new_tokens=12,
                   guards=Guards(dataclasses.replace(NO_LIMITS, blocked_patterns=("forbidden",),
                                                     refusal="No.")))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_non_streaming_matches_chat_session(client, sampler):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12,
                                       temperature=0)
    expected = ChatSession(sampler, max_new_tokens=12).reply(QUESTION[0]["content"])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", messages=QUESTION, max_tokens=12, temperature=0.8, top_p=0.9,
              seed=7)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full


def test_stream_and_answer_are_one_guarded_decision(sampler):
    """Under every output guard (a character limit, a role marker the reply spells, a blocked
    pattern, together) the streamed text is the non-streamed answer, which is the guard's
    decision on the unguarded reply, and usage counts the tokens whose decode is that text."""
    import re

    from solo.data.chat import chat_template

    template = chat_template(sampler.tokenizer)
    ids, _ = template.encode(QUESTION, add_generation_prompt=True)
    ref = sampler.generate([ids], max_new_tokens=12, stop_ids=template.stop_ids,
                           prefix=template.reply_prefix)[0]
    reply, toks = ref.text, ref.tokens
    assert len(reply) >= 6  # (key 2's reply: enough text to cut)

    def shown(k):  # the reply text of its first k tokens (the template's prefix dropped)
        text, prefix = sampler.tokenizer.decode(toks[:k]), template.reply_prefix
        return text.removeprefix(prefix) if not prefix.startswith(text) else ""

    limit = dataclasses.replace(NO_LIMITS, max_output_chars=3)
    block = dataclasses.replace(NO_LIMITS, blocked_patterns=(re.escape(reply[3:5]),),
                                refusal="No.")
    configs = [Guards(limit), Guards(NO_LIMITS, markers=(reply[2:4],)), Guards(block),
               Guards(dataclasses.replace(block, max_output_chars=4), markers=(reply[4:],))]
    app = make_app(sampler, model_name="tiny", max_new_tokens=12)
    body = dict(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    with serving(app) as url:
        c = httpx.Client(base_url=url, timeout=60)
        for guards in configs:
            app.state.worker.guards = guards
            want = guards.check_output(reply)
            r = c.post("/v1/chat/completions", json=body).json()
            streamed = ""
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        streamed += json.loads(line[6:])["choices"][0]["delta"].get(
                            "content") or ""
            assert streamed == r["choices"][0]["message"]["content"] == want.text, guards.cfg
            k = r["usage"]["completion_tokens"]
            if want.allowed:
                assert shown(k).startswith(want.text) and not shown(k - 1).startswith(want.text)


def test_input_guard_refusal(client):
    r = client.chat.completions.create(model="tiny", messages=[
        {"role": "user", "content": "the forbidden word"}])
    assert r.choices[0].message.content == "No."


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}',
     "unknown_field"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}', None),
    (b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', None),
])
def test_bad_requests_are_400(base_url, body, code):
    r = httpx.post(base_url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if code:
        assert err["code"] == code


def test_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "Anya " * 40}], max_tokens=10)
    assert "context" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=90)


def test_context_error_names_what_the_client_sent(client):
    """A prompt that fills the whole context, with no max_tokens: the error says no room is left
    for the reply (not a negative max_tokens the client never sent)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "Anya " * 40}])
    assert "none left for the reply" in str(e.value) and "max_tokens=-" not in str(e.value)


def test_deep_or_huge_bodies_are_refused_and_the_connection_stays_usable(base_url):
    """100k nested brackets are a 400 before Python's parser could recurse, a 2 MB body a 413;
    after each, the same keep-alive connection answers a normal request."""
    import http.client
    import json as json_lib

    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    ok = json_lib.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 3})

    def post(body):
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json_lib.loads(r.read())

    status, body = post("[" * 100_000)
    assert status == 400 and "nested deeper" in body["error"]["message"]
    assert post(ok)[0] == 200
    status, body = post(json_lib.dumps({"model": "tiny", "messages": QUESTION,
                                        "user": "x" * (2 << 20)}))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert post(ok)[0] == 200
    conn.close()


def test_a_half_sent_request_is_one_warning_line(base_url, caplog):
    """A client that hangs up in the middle of its request body: one warning, no traceback, and
    the server goes on answering."""
    host, port = base_url.removeprefix("http://").split(":")
    with caplog.at_level("WARNING"):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                      b'{"model": "tiny", "mess')
        deadline = time.time() + 10
        while "disconnected" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
    assert "client disconnected before its request was complete" in caplog.text
    assert "Traceback" not in caplog.text and not [r for r in caplog.records
                                                  if r.levelname == "ERROR"]
    openai_client = openai.OpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0)
    assert openai_client.models.list().data[0].id == "tiny"


def test_concurrent_requests_all_answered(client):
    ask = lambda i: client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
        stream=bool(i % 2))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    texts = [r.choices[0].message.content if i % 2 == 0 else
             "".join(c.choices[0].delta.content or "" for c in r)
             for i, r in enumerate(results)]
    assert len(set(texts)) == 1  # greedy: every request gets the same answer


def test_client_disconnect_mid_stream_keeps_serving(base_url, client):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 60, "stream": True,
            "temperature": 1.0}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # first event, then hang up
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4)
    assert r.choices[0].message.content is not None


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(sampler):
    """Requests decoded in one batch, each with its own messages, budget, stop strings and
    stream, get exactly the answer they get one at a time; a seeded sampled request is never
    batched (its seed alone decides it); a client hanging up mid-stream leaves its batch going."""
    greedy = [dict(messages=[{"role": "user", "content": q}], max_tokens=m, stop=stop,
                   stream=stream, temperature=0)
              for q, m, stop, stream in [("Where does Anya live?", 12, None, False),
                                         ("What is Bruno's job?", 5, None, True),
                                         ("Who was born in 1950?", 20, ["e"], True),
                                         ("Hi", 9, ["zz"], False)]]
    seeded = [dict(messages=QUESTION, max_tokens=15, temperature=1.0, seed=seed)
              for seed in (11, 12)]

    def ask(url, kw):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", **kw)
        if kw.get("stream"):
            chunks = list(r)
            return ("".join(c.choices[0].delta.content or "" for c in chunks),
                    chunks[-1].choices[0].finish_reason)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def hang_up(url):  # greedy, so it joins the batch; leaves once its answer has begun
        body = {"model": "tiny", "messages": QUESTION, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    return line

    one_by_one = make_app(sampler, model_name="tiny", max_new_tokens=12, max_batch=1)
    with serving(one_by_one) as url:
        alone = [ask(url, kw) for kw in greedy + seeded]
    # a batch waits up to 3 s after its first request's arrival for the others (or 8 requests)
    app = make_app(sampler, model_name="tiny", max_new_tokens=12, batch_window_s=3.0)
    with serving(app) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        hung = pool.submit(hang_up, url)
        together = list(pool.map(lambda kw: ask(url, kw), greedy + seeded))
        assert hung.result()  # it got part of an answer, then went away mid-batch
    assert together == alone and alone[4] != alone[5]
    sizes = app.state.worker.batch_sizes
    assert sizes[5] == 1 and sizes[1] == 2, sizes  # 4 greedy + the hang-up; seeded ones alone
    assert one_by_one.state.worker.batch_sizes == {1: 6}
    assert alone[2][0] and "e" not in alone[2][0] and alone[1][1] in ("stop", "length")
