"""The one summary of benchmarks/gpu_check.sh: reads the figures it left in OUT (train_cudnn.json,
train_xla.json, numerics.json, decode.json, log) and the stages' exit codes (env RESULTS, "name:rc:
seconds" words), prints a table and the README line, and writes OUT/summary.json. Any figure
missing (a stage failed or timed out) is reported as such; nothing here imports jax.

  RESULTS="train:0:95 ..." python benchmarks/gpu_summary.py OUT
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train(d: dict | None) -> dict | None:
    if not d or "jax" not in d:
        return None
    j = d["jax"]
    return dict(size=d.get("size", "?"), device=f"{d['devices']}x {d['device']}", dtype=d["dtype"],
                attention=d.get("attention", "?"), ms_step=round(j["ms_step"], 2),
                ms_step_median=round(j.get("ms_step_median", j["ms_step"]), 2),
                tokens_s=round(j["tokens_s"]), mfu=round(j["mfu"], 4),
                peak_tflops=round(d["peak"] / 1e12, 1), peak_source=d.get("peak_source", "?"),
                tokens_per_step=d.get("tokens_per_step"), jax=d.get("jax_version"))


def _numerics(rows: list | None) -> dict | None:
    if not rows:
        return None
    out = {}
    for r in rows:
        p = out.setdefault(f"{r['path']}/{r['dtype']}", dict(rows=0, failed=0, worst_rel=0.0,
                                                             worst_max_abs=0.0, errors=[]))
        p["rows"] += 1
        p["failed"] += not r["ok"]
        if "error" in r:
            p["errors"].append(r["error"])
            continue
        for x in ("fwd", "dq", "dk", "dv"):
            rel, mx = r[x]["rel"], r[x]["max_abs"]
            p["worst_rel"] = max(p["worst_rel"], rel) if rel == rel else float("nan")
            p["worst_max_abs"] = max(p["worst_max_abs"], mx) if mx == mx else float("nan")
    return out


def _tests(log: str) -> str | None:
    """pytest's last summary line inside the tests stage of the log."""
    part = re.search(r"^=== tests \(.*?$(.*?)^=== tests: exit", log, re.S | re.M)
    if not part:
        return None
    lines = [ln.strip("= ") for ln in part.group(1).splitlines()
             if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)", ln)]
    return lines[-1] if lines else None


def main(out_dir: str) -> dict:
    out = Path(out_dir)
    stages = {}
    for word in os.environ.get("RESULTS", "").split():
        name, rc, secs = word.split(":")
        stages[name] = dict(exit=int(rc), seconds=int(secs),
                            status="ok" if rc == "0" else "timed out" if rc in ("124", "137")
                            else "FAILED")
    log = (out / "log").read_text() if (out / "log").exists() else ""
    decode = _load(out / "decode.json") or {}
    summary = dict(
        stages=stages,
        train_cudnn=_train(_load(out / "train_cudnn.json")),
        train_xla=_train(_load(out / "train_xla.json")),
        numerics=_numerics(_load(out / "numerics.json")),
        tests=_tests(log),
        decode={k: dict(tok_s=round(v["ours_tok_s"], 1), ttft_ms=round(v["ours_ttft_ms"], 1),
                        roofline_tok_s=round(v["roofline_tok_s"]))
                for k, v in decode.items() if isinstance(v, dict) and "ours_tok_s" in v},
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print("stage      status     exit  seconds")
    for name, s in stages.items():
        print(f"{name:10s} {s['status']:10s} {s['exit']:4d}  {s['seconds']:7d}")
    for key in ("train_cudnn", "train_xla"):
        t = summary[key]
        if t is None:
            print(f"{key}: no figure (see the log)")
            continue
        print(f"{key}: {t['device']} {t['dtype']} | {t['ms_step']:.1f} ms/step (median "
              f"{t['ms_step_median']:.1f}) | {t['tokens_s']:,} tokens/s | MFU {t['mfu']:.1%} of "
              f"{t['peak_tflops']} TFLOP/s ({t['peak_source']}) | {t['attention']}")
    for name, p in (summary["numerics"] or {}).items():
        print(f"numerics {name:16s}: {p['rows'] - p['failed']}/{p['rows']} ok, worst relative "
              f"error {p['worst_rel']:.1e}, worst max |err| {p['worst_max_abs']:.1e}"
              + (f", errors: {p['errors'][0]}" if p["errors"] else ""))
    if summary["numerics"] is None:
        print("numerics: no figure (see the log)")
    print(f"tests: {summary['tests'] or 'no pytest summary (see the log)'}")
    for k, v in summary["decode"].items():
        print(f"decode {k}: {v['tok_s']:,} tokens/s, TTFT {v['ttft_ms']} ms "
              f"(roofline {v['roofline_tok_s']:,})")
    if not summary["decode"]:
        print("decode: no figure (see the log)")
    c, x = summary["train_cudnn"], summary["train_xla"]
    if not c and x:  # the fused path failed: the reference path's figure is still the figure
        c, x = x, None
    if c:
        line = (f"{c['size']} {c['dtype']} train step on {c['device']} (jax {c['jax']}, "
                f"{c['tokens_per_step'] or '?'} tokens a step): {c['tokens_s']:,} tokens/s, "
                f"{c['ms_step']:.1f} ms/step, MFU {c['mfu']:.1%}, {c['attention']}")
        if x:
            line += f"; XLA attention: {x['tokens_s']:,} tokens/s, MFU {x['mfu']:.1%}"
        print("README: " + line)
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/solo-gpu-check")
