"""lm-eval-harness against `solo serve`: a loglikelihood task and a generation task, scored by
EleutherAI's `lm_eval` through its `local-completions` model (OpenAI /v1/completions with
`echo`, `logprobs`, `max_tokens`), and every loglikelihood it got checked against solo's own.

  pip install -e '.[harness]'      # lm_eval[api]==0.4.13; no harness dataset is downloaded
  python benchmarks/lm_eval_harness.py [--workdir runs/tiny] [--limit 40]

The workdir (default runs/tiny; `solo train tiny` into it first if it has no checkpoint) is
served in-process on a free localhost port with solo's own server (agent/server.py).
The tasks are written to a temporary directory as lm_eval YAML files over local JSONL data made
from the run's synthetic world (harness datasets cannot be downloaded here):

  solo_world_city_mc   multiple choice (loglikelihood): "<Name> hails from the city of" with the
                       person's birth city and 3 other people's as choices; metric acc.
  solo_world_city_gen  generation until "." : the same prompt; exact match of the city.

lm_eval uses the server's tokenizer (`tokenizer_backend=remote`: GET /tokenizer_info, POST
/tokenize) and sends strings (`tokenized_requests=False`), which the server encodes after BOS as
training documents start. Then every (context, continuation) loglikelihood lm_eval logged is
recomputed from the model's logits directly (BOS + context + continuation, the continuation's
token log-probabilities summed) and the largest difference printed: it must be float32 noise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("solo_world_city_mc", "solo_world_city_gen")


def write_tasks(directory: str, config, limit: int) -> None:
    """The two task YAMLs and their JSONL data (the world's training people's birth cities)."""
    from solo.data.world import World

    world = World.from_config(config.data.world)
    people = world.split_people("train")[:limit]
    cities = sorted({p.attributes["birth_city"] for p in world.people})
    rng = random.Random(0)
    rows = []
    for p in people:
        city = p.attributes["birth_city"]
        others = rng.sample([c for c in cities if c != city], 3)
        choices = others + [city]
        rng.shuffle(choices)
        rows.append({"context": f"{p.first} {p.last} hails from the city of", "city": city,
                     "choices": choices, "label": choices.index(city)})
    data = os.path.join(directory, "cities.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: \"{{context}}\"\n")
    with open(os.path.join(directory, "mc.yaml"), "w") as f:
        f.write(f"task: {TASKS[0]}\noutput_type: multiple_choice\n{common}"
                "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n"
                "    higher_is_better: true\n")
    with open(os.path.join(directory, "gen.yaml"), "w") as f:
        f.write(f"task: {TASKS[1]}\noutput_type: generate_until\n{common}"
                "doc_to_target: \" {{city}}\"\ntarget_delimiter: \"\"\n"
                "generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 12\n"
                "  do_sample: false\n  temperature: 0\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                "    higher_is_better: true\n")


def serve_in_thread(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def own_loglikelihoods(loaded, pairs: list[tuple[str, str]]) -> list[float]:
    """log p(continuation | [BOS] + context) per pair from the model's logits, tokenized as lm_eval
    does (the whole string encoded; the continuation = the tokens after the context's). Rows
    are right-padded to the model's length (causal: padding is never attended to)."""
    from solo.data import framing
    from solo.model import Transformer

    tok, cfg = loaded.tokenizer, loaded.model.cfg
    start = framing.start(tok)  # the prompt framing the server uses ([BOS] only where add_bos)
    model = Transformer(cfg.replace(logits_chunk=0))  # logits even for a logits_chunk run
    apply = jax.jit(lambda p, x, seg: model.apply(
        {"params": p}, {"tokens": x, "segment_ids": seg})["logits"])
    out = []
    for lo in range(0, len(pairs), 16):
        rows = [(len(start) + len(tok.encode(ctx)), start + tok.encode(ctx + cont))
                for ctx, cont in pairs[lo:lo + 16]]
        x = np.zeros((16, cfg.max_len), np.int32)
        seg = np.zeros((16, cfg.max_len), np.int32)
        for i, (_, ids) in enumerate(rows):
            x[i, : len(ids)], seg[i, : len(ids)] = ids, 1
        logits = apply(loaded.params, jnp.asarray(x), jnp.asarray(seg))
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
        out += [float(sum(logp[i, t - 1, ids[t]] for t in range(max(n_ctx, 1), len(ids))))
                for i, (n_ctx, ids) in enumerate(rows)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/tiny")
    ap.add_argument("--limit", type=int, default=40, help="people (documents) per task")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from solo.agent.server import app_from_loaded
    from solo.experiments import load_config
    from solo.train import workdir as wd_lib
    from solo.train.inference import load
    from solo.train.loop import train_and_evaluate

    if wd_lib.latest_step(args.workdir) is None:
        print(f"{args.workdir} has no checkpoint: training `tiny` into it first", flush=True)
        train_and_evaluate(load_config("tiny"), args.workdir)
    loaded = load(args.workdir)
    server, url = serve_in_thread(app_from_loaded(loaded))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(tmp, loaded.config, args.limit)
        out = evaluator.simple_evaluate(
            model="local-completions",
            model_args=(f"model={loaded.config.name},base_url={url}/v1/completions,"
                        "tokenizer_backend=remote,tokenized_requests=False,"
                        f"max_length={loaded.model.cfg.max_len},max_retries=1"),
            tasks=list(TASKS), task_manager=TaskManager(include_path=tmp), log_samples=True,
            batch_size=1)
    elapsed = time.time() - t0
    server.should_exit = True
    print(make_table(out))
    pairs, got = [], []
    for s in out["samples"][TASKS[0]]:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            pairs.append((context, continuation))
            got.append(resp[0][0])
    own = own_loglikelihoods(loaded, pairs)
    worst, n = float(np.max(np.abs(np.subtract(got, own)))), len(pairs)
    for s in out["samples"][TASKS[1]][:3]:
        print(f"generated: {s['arguments'][0][0]!r} -> {s['resps'][0][0]!r} "
              f"(target {s['target']!r})")
    print(f"{n} loglikelihoods from lm_eval vs solo's own (model logits): max |difference| "
          f"{worst:.2e}; lm_eval took {elapsed:.0f} s for {args.limit} documents per task")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
