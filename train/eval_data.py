"""A checkpoint's metrics on any data (`solo eval WORKDIR --config.data.*=...`): every objective of
the run, on the splits asked for, plus bits per byte where it is defined.

The run's config is read from the workdir and only its `data` section may be overridden (another
file or glob, a TFDS split, a JSONL of chats, another task or sequence length...); the model, its
objectives and its tokenizer stay the run's (`data.tokenizer.*` cannot change: the params only
mean something with their own tokenizer). Metrics are the eval step's (sum, count) pairs summed
over every batch of every split named, so they are exact and independent of the batch size.

Bits per byte (tokenizer-independent: comparable between models with different vocabularies):

    bits_per_byte = (sum over scored tokens of -ln p(token)) / bytes / ln 2

where the scored tokens are exactly the ones the causal_lm loss counts and `bytes` is the number
of UTF-8 bytes of the raw text they encode:
  - task `lm`: every document's tokens after BOS, and the EOS that ends it (predicting where a
    document ends is part of the score; a document longer than data.seq_len is scored in chunks,
    each token once); bytes = the documents' UTF-8 bytes as read from the source, before
    tokenization (SentencePiece's dummy-prefix space is not counted). A tokenizer without BOS
    (GPT-2's) leaves each document's first token unscored: its bytes are not counted either.
  - task `sft`: the assistant turns' tokens and their end-of-turn marker; bytes = the assistant
    messages' content bytes.
Anywhere else (masked LM, pairs, chat transcripts mixed into an lm corpus, an SFT conversation cut
at data.seq_len, a prepared corpus of token ids) the byte count of the scored tokens is not
known and no bits_per_byte is given.
perplexity is exp(the token-weighted causal_lm loss) over the same tokens.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
from ml_collections import ConfigDict

from solo.config import ConfigError, RunConfig
from solo.data import framing, pipeline, sources
from solo.data.tasks import get_task
from solo.experiments import apply_overrides
from solo.train import parallel
from solo.train.loop import _add, _summary, mesh_eval_fn, validate_config

SPLITS = ("train", "validation", "test")


def data_overrides(overrides: Sequence[str]) -> list[str]:
    """Checks that every override is a --config.data.* key other than the tokenizer's."""
    for o in overrides:
        key = o.removeprefix("--").removeprefix("config.").split("=", 1)[0]
        if not key.startswith("data.") or key.startswith("data.tokenizer."):
            raise ConfigError(
                f"solo eval: {o!r}: only --config.data.* overrides apply (the model, its "
                "objectives and its tokenizer are the run's); data.tokenizer.* cannot change")
    return list(overrides)


def eval_config(saved: ConfigDict, overrides: Sequence[str]) -> RunConfig:
    """The run's config with the data overrides applied and checked."""
    config = RunConfig.from_config(apply_overrides(saved, data_overrides(overrides)))
    validate_config(config, parallel.data_mesh(), batches=False)  # eval pads its batches
    if config.data.seq_len > config.model.max_len and config.model.positions == "learned":
        raise ConfigError(f"data.seq_len={config.data.seq_len} > model.max_len="
                          f"{config.model.max_len} (learned positions)")
    return config


def check_splits(splits: Sequence[str]) -> list[str]:
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"--split {','.join(splits)}: valid splits are {', '.join(SPLITS)} "
                          "(comma-separated to sum several)")
    return list(splits)


PREPARED = "prepared:"  # token-id corpora (`solo prepare`): no records, no text to count


def check_data(config: RunConfig, split: str) -> list[dict] | None:
    """The records of `split` (None if a component is a prepared corpus of token ids, whose
    directory must exist): a missing file or split is its one-line error here, before anything
    is loaded or compiled."""
    d, records, prepared = config.data, [], False
    kind = get_task(d.task).records
    for c in sources.parse_source(d.source):
        if c.spec.startswith(PREPARED):
            prepared = True
            if not os.path.isdir(os.path.expanduser(c.spec[len(PREPARED):])):
                raise sources.SourceError(f"{c.spec}: no such prepared corpus directory")
        else:
            records += sources.load_component(c.spec, d, kind, split)
    return None if prepared else records


def scored_bytes(config: RunConfig, tokenizer, split: str) -> int | None:
    """UTF-8 bytes of the text whose tokens the causal_lm loss scores on `split` (see the module
    docstring), or None where that is not defined (also for a prepared corpus: it keeps token
    ids, not the text's bytes)."""
    d = config.data
    records = check_data(config, split)
    if records is None or "causal_lm" not in config.objectives:
        return None
    if d.task == "lm":
        if any("text" not in r for r in records):
            return None  # chat transcripts as documents: role markers have no bytes
        if framing.start(tokenizer):
            return sum(len(r["text"].encode("utf-8")) for r in records)
        # no BOS (byte-level BPE imports: GPT-2, SmolLM2): a document's first token is context,
        # never a target, so its bytes are not scored either (its raw bytes: it may be part of a
        # character, which decoding the rest would count as U+FFFD)
        def first(ids: list[int]) -> int:
            if not ids:
                return 0
            if hasattr(tokenizer, "token_bytes"):
                return len(tokenizer.token_bytes(ids[0]))
            return len(tokenizer.decode(ids[:1]).encode("utf-8"))

        return sum(len(r["text"].encode("utf-8")) - first(tokenizer.encode(r["text"]))
                   for r in records)
    if d.task == "sft":
        from solo.data.chat import chat_template

        template = chat_template(tokenizer)
        total = 0
        for r in records:
            if len(template.encode(r["messages"], add_generation_prompt=False)[0]) > d.seq_len + 1:
                return None  # cut at seq_len: part of its text is not scored
            total += sum(len(m["content"].encode("utf-8")) for m in r["messages"]
                         if m["role"] == "assistant")
        return total
    return None


def evaluate_data(loaded, config: RunConfig, splits: Sequence[str] = ("validation",)
                  ) -> dict[str, Any]:
    """Metrics of `loaded` (train.inference.load) on config.data's `splits`, summed; with
    'tokens', 'bytes' and 'bits_per_byte' where defined."""
    splits = check_splits(splits)
    nbytes = [scored_bytes(config, loaded.tokenizer, s) for s in splits]
    eval_fn = mesh_eval_fn(loaded, config)
    acc = None
    for split in splits:
        for batch in pipeline.eval_batches(config.data, loaded.tokenizer, split,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count()):
            acc = _add(acc, eval_fn(loaded.params, batch))
    if acc is None:
        raise ValueError(f"no examples in split(s) {', '.join(splits)} of "
                         f"data.source={config.data.source!r}")
    acc = jax.device_get(acc)
    out: dict[str, Any] = {"metrics": _summary(acc, config)}
    if "causal_lm/loss" in acc:
        nll, count = (float(x) for x in acc["causal_lm/loss"])
        out["tokens"] = int(round(count))
        if None not in nbytes and sum(nbytes):
            out["bytes"] = int(sum(nbytes))
            out["bits_per_byte"] = nll / out["bytes"] / math.log(2)
    return out


def result_name(config: RunConfig, splits: Sequence[str], overridden: bool) -> str:
    """A file name for a result: 'validation' for the run's own data, else the source's file
    names (or dataset) and the splits, e.g. 'tinyshakespeare.txt-validation'."""
    if not overridden:
        return "-".join(splits)
    specs = [c.spec if c.spec.startswith(("tfds:", "synthetic:"))
             else c.spec.rstrip("/").rsplit("/", 1)[-1]
             for c in sources.parse_source(config.data.source)]
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") for s in specs]
    return "+".join(p for p in parts if p)[:80] + "-" + "-".join(splits)
