"""The `solo` command: each subcommand parses its arguments and calls one plain function.

  train    solo.train.loop.train_and_evaluate(config, workdir)
  sweep    solo.train.sweep.run_sweep(config_name, grid, workdir, overrides)
  compare  solo.train.sweep.summarize(workdirs); --plot: solo.train.plots.save_plot
  eval     solo.agent.evaluate.eval_command(workdir, checkpoint, overrides, ...)
  sample   solo.agent.sampler.sample(workdir, prompts, ...)
  chat     solo.agent.repl.chat(workdir, ...)
  serve    solo.agent.server.serve(workdir, ...)
  import   solo.train.hub.import_model(src, workdir)
  export   solo.train.hub.export_model(workdir, out)
  prepare, tokenizer train   solo/data_cli.py (data.prepare.prepare, Tokenizer.train)

Exit codes: 0 done; 2 an expected failure (a bad config or input, a missing or damaged file, an
unusable workdir, no restorable checkpoint, a full disk or another OS error), printed as one line
(SOLO_DEBUG=1 adds the traceback); 3 training diverged (a non-finite loss; nothing non-finite was
saved); 128 + N stopped by signal N after checkpointing (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from pathlib import Path

DESCRIPTION = ("Train, evaluate, sample from and chat with Transformer language models "
               "(JAX/Flax). `solo COMMAND --help` describes each command.")


def _train(args: argparse.Namespace) -> int:
    from solo.config import RunConfig
    from solo.data.tasks import chat_eval
    from solo.experiments import load_config
    from solo.train.loop import train_and_evaluate

    config = RunConfig.from_config(load_config(args.config, args.overrides))
    workdir = args.workdir or str(Path("runs") / config.name)
    print(format_summary(train_and_evaluate(config, workdir)))
    if chat_eval(config.data):
        _chat_report(workdir, "latest")
    a = config.agent
    if a.sample_prompts:  # what the trained model writes now
        from solo.agent.sampler import sample

        gens = sample(workdir, a.sample_prompts, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=config.seed)
        for prompt, g in zip(a.sample_prompts, gens, strict=True):
            print(f"--- sample\n{prompt}{g.text}", flush=True)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from solo.train.sweep import parse_grid, run_sweep

    run_sweep(args.config, parse_grid(args.sweep_flags), args.workdir, args.overrides,
              parallel=args.parallel)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from solo.train.sweep import format_table, summarize

    print(format_table(summarize(args.workdirs)))
    if args.plot:  # loss curves + bars of the final metric (train/plots.py)
        from solo.train.plots import save_plot

        try:
            save_plot(args.workdirs, args.plot, args.metric)
        except ImportError as e:  # matplotlib is optional
            print(f"solo compare: error: {e}", file=sys.stderr)
            return 2
        print(f"plot: {args.plot}")
    return 0


def format_summary(summary: dict, prefix: str = "") -> str:
    """One line per group: scalars first, then nested dicts (train / eval metrics)."""
    scalars = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    lines = [f"{prefix or 'run'}: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))]
    for k, v in sorted(summary.items()):
        if isinstance(v, dict) and v:
            lines.append(format_summary(v, k))
    return "\n".join(lines)


def _chat_report(workdir: str, checkpoint: str) -> None:
    from solo.agent.evaluate import heldout_report

    print(heldout_report(workdir, checkpoint))


def _eval(args: argparse.Namespace) -> int:
    from solo import multihost
    from solo.agent.evaluate import eval_command  # issue 15: any data, QA JSONL, JSON results

    multihost.initialize(_dist_config(args))  # before any device use
    report, _ = eval_command(args.workdir, args.checkpoint, overrides=args.overrides,
                             splits=args.split.split(","), qa=args.qa, name=args.name)
    if multihost.is_primary():
        print(report)
    return 0


# --- multi-host launch flags of `solo eval` (solo/multihost.py; `solo train` takes
# --config.dist.*): a workdir's config.json never holds how a launch joined its processes
def _dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-address", default="",
                   help="multi-host: process 0's host:port (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)


def _dist_config(args: argparse.Namespace):
    from solo.experiments.base import get_config
    from solo.multihost import DistConfig

    d = get_config().dist
    d.update(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
             process_id=args.process_id)
    return DistConfig.from_config(d)


def _sample(args: argparse.Namespace) -> int:
    from solo.agent.sampler import sample

    gens = sample(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, checkpoint=args.checkpoint)
    for prompt, g in zip(args.prompt, gens, strict=True):
        print(f"{prompt}{g.text}\n[{len(g.tokens)} tokens, {g.finish_reason}]\n", flush=True)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from solo.agent.repl import chat

    chat(args.workdir, checkpoint=args.checkpoint, system=args.system,
         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
         one_shot=args.one_shot)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from solo.agent.server import serve

    serve(args.workdir, host=args.host, port=args.port, checkpoint=args.checkpoint,
          max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
          chat_only=args.chat_only, embeddings=args.embeddings)
    return 0


def _import(args: argparse.Namespace) -> int:
    from solo.train.hub import import_model

    config = import_model(args.src, args.workdir, name=args.name, dtype=args.dtype)
    m = config.model
    print(f"imported {args.src} into {args.workdir}: {m.kind} {m.num_layers}x{m.d_model}, "
          f"{m.num_heads} heads ({m.num_kv_heads} kv), vocabulary {m.vocab_size}; try: solo "
          f"chat {args.workdir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from solo.train.hub import export_model

    arch = export_model(args.workdir, args.to, args.checkpoint)
    print(f"exported {args.workdir} as a Hugging Face {arch} model to {args.to}")
    return 0


def _checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="latest",
                   help="latest (default), best (lowest eval loss) or a step number")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solo", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train an experiment config into a workdir (resumes if present)",
        description="Train CONFIG (a name in experiments/ or a path). Override any key "
        "with --config.a.b=value. Re-running on the same workdir resumes exactly.",
    )
    p.add_argument("config", help="experiment name (e.g. gpt_world) or path to a config .py")
    p.add_argument("--workdir", default="", help="output directory (default: runs/<config name>)")
    p.set_defaults(fn=_train, takes_overrides=True)

    p = sub.add_parser(
        "sweep",
        help="train a grid of overrides, one workdir each, and tabulate the results",
        description="Train CONFIG at every point of the --sweep.KEY=V1,V2 grid (cartesian "
        "product) into WORKDIR/<key=value,...>; --config.* overrides apply to every point. "
        "Every point is validated first; re-running skips finished points and resumes a "
        "stopped one. Repeat --sweep.KEY=V once per value for values containing commas.",
    )
    p.add_argument("config", help="experiment name (e.g. tiny) or path to a config .py")
    p.add_argument("--workdir", required=True, help="the sweep's directory")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train N points at a time, each in its own process (default 1)")
    p.set_defaults(fn=_sweep, takes_overrides=True)

    p = sub.add_parser(
        "compare",
        help="table of the final eval metrics of workdirs (best eval loss first)",
        description="One line per WORKDIR: its last eval metrics and train tokens/s.",
    )
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--plot", default="", metavar="FILE.png",
                   help="also draw the loss curves and a bar chart of the final eval metric")
    p.add_argument("--metric", default="loss", help="the plotted metric (default: loss)")
    p.set_defaults(fn=_compare)

    p = sub.add_parser(
        "eval",
        help="evaluate a workdir's checkpoint on its own or any other data",
        description="Every objective's metrics (perplexity and bits per byte for causal LM) "
        "on the run's validation split, or on other data with --config.data.* overrides (a "
        "file, a TFDS split, a JSONL of chats); QA exact match through the chat path on --qa "
        "FILE.jsonl (the world's held-out questions by default for world chat runs). Results "
        "go to WORKDIR/eval/step_N/NAME.json.",
    )
    p.add_argument("workdir")
    p.add_argument("--split", default="validation",
                   help="split(s) to score, comma-separated to sum: train, validation, test")
    p.add_argument("--qa", default="",
                   help='JSONL of {"question", "answer"} lines asked through the chat path; '
                   "'none' skips the default (world chat runs: the held-out questions)")
    p.add_argument("--name", default="",
                   help="the result file's name (default: from the data source and split)")
    _checkpoint_arg(p)
    _dist_args(p)
    p.set_defaults(fn=_eval, takes_overrides=True)

    p = sub.add_parser(
        "sample",
        help="complete prompts with a trained model",
        description="Sample continuations of --prompt from WORKDIR's checkpoint.",
    )
    p.add_argument("workdir")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _checkpoint_arg(p)
    p.set_defaults(fn=_sample)

    p = sub.add_parser(
        "chat",
        help="chat with a trained model in a REPL (reads pipes too)",
        description="Multi-turn chat. Commands: /reset, /system TEXT, /stats, /quit. Lines "
        "piped in are one conversation, like a typed session, unless --one-shot.",
    )
    p.add_argument("workdir")
    p.add_argument("--system", default=None, help="system prompt (default: the experiment's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--one-shot", action="store_true",
                   help="answer each input line in a fresh conversation (no history)")
    _checkpoint_arg(p)
    p.set_defaults(fn=_chat)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, embeddings)",
        description="Serve WORKDIR's model at http://HOST:PORT/v1: /v1/chat/completions, "
        "/v1/completions (logprobs, echo), /v1/embeddings, /v1/models; GET /health.",
    )
    p.add_argument("workdir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="most concurrent requests decoded together (1 = one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="how long a request waits after its arrival for others to batch with")
    # issue 15: harness endpoints (agent/endpoints.py)
    p.add_argument("--chat-only", action="store_true",
                   help="serve the model only through its chat template and guards: "
                   "/v1/completions (raw text, echo, prompt logprobs) answers 400")
    p.add_argument("--embeddings", choices=("head", "mean"), default="head",
                   help="/v1/embeddings from the embedding head only (default), or mean-pooled "
                   "hidden states for a model without one")
    _checkpoint_arg(p)
    p.set_defaults(fn=_serve)

    p = sub.add_parser(
        "import",
        help="a pretrained model (HF directory, .gguf file, hf:ID) as a workdir at step 0",
        description="Convert SRC (a Hugging Face checkpoint directory: GPT-2, BERT or a Llama-"
        "family model, safetensors or pytorch_model.bin, with its tokenizer.json; a GGUF file of "
        "a Llama-family model; or hf:ORG/NAME where the machine has internet) into an ordinary "
        "workdir: eval, sample, chat and serve it, or fine-tune it with train.init_from.",
    )
    p.add_argument("src")
    p.add_argument("--workdir", required=True)
    p.add_argument("--name", default="", help="the run's name (default: from SRC)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="params' storage and compute dtype (bfloat16: half the memory)")
    p.set_defaults(fn=_import)

    p = sub.add_parser(
        "export",
        help="a workdir as a Hugging Face checkpoint (safetensors) transformers loads",
        description="Write WORKDIR's checkpoint to --to as model.safetensors, config.json and "
        "the tokenizer's files (a GPT-2, BERT or Llama architecture, whichever expresses the "
        "model; LoRA adapters merged).",
    )
    p.add_argument("workdir")
    p.add_argument("--to", required=True)
    _checkpoint_arg(p)
    p.set_defaults(fn=_export)

    from solo.data_cli import register  # prepare, tokenizer train: data commands (issue 14)

    register(sub)
    return parser


def _quiet_closed_loop_callbacks() -> None:
    """After a failed checkpoint read, tensorstore keeps completing the reads it had started and
    hands each result to the asyncio loop Orbax ran them on, which is closed by then: every one
    prints a 'RuntimeError: Event loop is closed' traceback as an unraisable exception (dozens,
    some during interpreter exit). They are noise after a recovery solo already reported, so the
    command drops exactly those; every other unraisable exception is printed as usual."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        default(unraisable)

    sys.unraisablehook = hook


def _quiet_teardown() -> None:
    """After a failure the command reported as one line, the same failure surfaces again while the
    process tears down: writers' atexit flushes and their threads (TensorBoard's event file on a
    full disk, say) print tracebacks of it, and Orbax's abandoned write coroutines warn that they
    were never awaited. Those are dropped; SOLO_DEBUG=1 keeps everything."""
    import threading
    import warnings

    warnings.simplefilter("ignore")
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    logging.disable(logging.CRITICAL)


class _OrbaxBackgroundFailures(logging.Filter):
    """Orbax reports a failed background save (a full disk, say) with a traceback from every
    thread it ran in, then raises the same error in the caller, where the command prints it as
    one line: the background reports are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info
                    and "/orbax/" in record.pathname.replace("\\", "/"))


def _one_line(e: BaseException, workdir: str = "") -> str:
    """An expected failure as one line; a full disk names where and what to do."""
    text = " ".join(str(e).split()) or type(e).__name__
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        where = (getattr(e, "filename", None) or next(iter(re.findall(r'"(/[^"]+)"', text)), "")
                 or workdir or "the workdir")
        return (f"no space left on device (writing {where}); free some space and run the same "
                "command again: a training run resumes from its last complete checkpoint")
    return text


def main(argv: list[str] | None = None) -> int:
    """The `solo` command (argv None: the process's command line). Called with argv (a notebook,
    a test), a failure's one line leaves the caller's logging, warnings and hooks as they were;
    the command itself silences its process's teardown after it."""
    command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config.* overrides and --sweep.* grids are free-form; everything else goes to argparse.
    overrides = [a for a in argv if a.startswith("--config.")]
    sweep_flags = [a for a in argv if a.startswith("--sweep.")]
    rest = [a for a in argv if not a.startswith(("--config.", "--sweep."))]
    args = build_parser().parse_args(rest)
    args.overrides, args.sweep_flags = overrides, sweep_flags
    if overrides and not getattr(args, "takes_overrides", False):
        print(f"solo {args.command}: --config.* overrides only apply to `solo train`, "
              "`solo sweep`, `solo eval`, `solo prepare` and `solo tokenizer`", file=sys.stderr)
        return 2
    if sweep_flags and args.command != "sweep":
        print(f"solo {args.command}: --sweep.* flags only apply to `solo sweep`", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's info/warnings drown the progress line
    if not os.environ.get("SOLO_DEBUG"):
        _quiet_closed_loop_callbacks()
        absl_logging.get_absl_logger().addFilter(_OrbaxBackgroundFailures())
    from solo.train.loop import Diverged
    from solo.train.preemption import Stopped

    try:
        return args.fn(args)
    except (OSError, ValueError) as e:
        # Errors raised at the edges carry a complete message: one line, no traceback (ConfigError,
        # WorkdirError, SourceError, ... are ValueErrors; a full disk or a permission is an
        # OSError). One from deep inside a library gets the same treatment: SOLO_DEBUG=1 shows
        # the traceback.
        if os.environ.get("SOLO_DEBUG"):
            raise
        line = _one_line(e, getattr(args, "workdir", ""))
        if command:
            _quiet_teardown()  # from here on, nothing but the one line
        print(f"solo {args.command}: error: {line} (SOLO_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"solo {args.command}: {e}", file=sys.stderr)
        return 3
    except Stopped as e:  # SIGTERM / Ctrl-C during `solo train`: checkpointed, resumable
        print(f"solo {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
