"""`solo prepare` and `solo tokenizer train`: the data commands (registered by solo/cli.py).

  prepare          solo.data.prepare.prepare(source, tokenizer, out, data config)
  tokenizer train  solo.data.tokenizer.Tokenizer.train(texts of the source's train split)

Data options (data.txt_split, data.text_field, data.world.*, data.data_dir, ...) come from
experiments/base.py with --config.data.* overrides, as `solo train` reads them.
"""

from __future__ import annotations

import argparse


def _data_config(overrides: list[str], source: str):
    from solo.data.config import DataConfig
    from solo.experiments import apply_overrides, base

    config = apply_overrides(base.get_config(), overrides)
    config.data.source = source
    config.data.task = "lm"
    return DataConfig.from_config(config)


def _prepare(args: argparse.Namespace) -> int:
    from solo.data.prepare import prepare

    m = prepare(args.source, args.tokenizer, args.out, _data_config(args.overrides, args.source),
                workers=args.workers, unit_bytes=int(args.shard_mb * (1 << 20)),
                records=args.records)
    counts = ", ".join(f"{k}: {s['docs']:,} documents, {s['tokens']:,} tokens in "
                       f"{len(s['shards'])} shard(s)" for k, s in sorted(m["splits"].items()))
    print(f"prepared {args.out} ({counts}); train on it with "
          f"--config.data.source=prepared:{args.out}"
          + (" --config.data.task=sft" if args.records == "chats" else ""))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    import os

    from solo.data import sources
    from solo.data.tokenizer import Tokenizer

    d = _data_config(args.overrides, args.source)
    texts = (t for comp in sources.load_records(d, "train", "documents") for r in comp
             for t in sources.record_texts(r))
    out = args.out[:-len(".model")] if args.out.endswith(".model") else args.out
    if os.path.exists(out + ".model"):
        raise FileExistsError(f"{out}.model exists; choose another --out (it is not replaced)")
    tok = Tokenizer.train(texts, out, kind=args.kind, vocab_size=args.vocab,
                          sample_size=args.sample_size)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces); use it with --tokenizer {tok.path} "
          f"(solo prepare) or --config.data.tokenizer.path={tok.path} (solo train)")
    return 0


def register(sub) -> None:
    """Adds `prepare` and `tokenizer` to the `solo` command's subparsers."""
    p = sub.add_parser(
        "prepare",
        help="tokenize a source once into shards a run streams (data.source=prepared:DIR)",
        description="Tokenize SOURCE (text/JSONL files or a glob, synthetic:world, tfds:NAME) "
        "with TOKENIZER (--records chats: conversations and their loss weights, for sft) "
        "into per-split ArrayRecord shards in --out, in worker processes. "
        "Interrupted runs resume (finished shards are kept); a finished --out is left as it "
        "is. Data options: --config.data.txt_split=..., --config.data.text_field=...",
    )
    p.add_argument("source")
    p.add_argument("--tokenizer", required=True,
                   help="a solo .model file, a tokenizer.json or GPT-2 (encoder.json + "
                   "vocab.bpe) directory, a .gguf file, or a workdir")
    p.add_argument("--out", required=True, help="the prepared corpus's directory")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes (default 2; 0: tokenize in this process)")
    p.add_argument("--records", choices=("documents", "chats"), default="documents",
                   help="documents (lm, mlm), or chats with their loss weights (sft too): JSONL "
                   "'messages' lines or data.prompt_field/response_field, synthetic:world")
    p.add_argument("--shard-mb", type=float, default=64.0,
                   help="input MiB of a large .txt/.jsonl file per shard (default 64)")
    p.set_defaults(fn=_prepare, takes_overrides=True)

    p = sub.add_parser("tokenizer", help="train a tokenizer once, for many runs to share")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser(
        "train",
        help="train solo's sentencepiece tokenizer on a source's train split",
        description="Train a sentencepiece tokenizer (solo's special ids 0..9, byte fallback) "
        "on SOURCE's train split and write it to --out (.model, with its .json settings).",
    )
    t.add_argument("source")
    t.add_argument("--kind", choices=("bpe", "unigram", "char"), default="bpe")
    t.add_argument("--vocab", type=int, required=True, help="total vocabulary size")
    t.add_argument("--out", required=True, help="the .model file to write")
    t.add_argument("--sample-size", type=int, default=1_000_000,
                   help="training lines sampled (sentencepiece's input_sentence_size)")
    t.set_defaults(fn=_tokenizer_train, takes_overrides=True)
