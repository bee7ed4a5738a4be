"""Registry and the three entry points train/ uses: `forward`, `compute_loss`, `summarize`.

`objectives_cfg` (= `config.objectives`) maps objective name -> ConfigDict(weight=..., **options);
entries with weight 0 are skipped. The z-loss is an option of a token-CE objective
(`objectives.causal_lm.z_loss = 1e-4`; also accepted by seq2seq and mlm): its term is added to the
total with the objective's denominator (not scaled by its weight) and reported as the unprefixed
metric 'z_loss'. Total loss = sum_o weight_o * loss_sum_o / den_o (+ z terms); `den_o` defaults to
the batch's own `count`, and train passes full-batch counts (`denominators`) under gradient
accumulation or psummed ones across pmap devices so microbatch losses/gradients add up exactly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from solo.objectives import causal_lm, infonce, mlm, nsp, seq2seq
from solo.objectives.base import Array, Metrics, Objective, safe_div

OBJECTIVES: dict[str, Objective] = {
    m.OBJECTIVE.name: m.OBJECTIVE for m in (causal_lm, mlm, nsp, infonce, seq2seq)
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown objective {name!r}.{hint} Valid objectives: {', '.join(sorted(OBJECTIVES))}."
        )
    return OBJECTIVES[name]


def active_objectives(objectives_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> options (a plain dict: weight + the objective's declared options) for every entry
    with weight != 0. An entry must give exactly `weight` and the objective's `options`
    (experiments/base.py lists every objective with all of them)."""
    active = {}
    for name, entry in objectives_cfg.items():
        obj = get_objective(name)
        if not isinstance(entry, Mapping) and not hasattr(entry, "to_dict"):
            raise ValueError(f"objectives.{name} must be a ConfigDict(weight=..., ...), "
                             f"got {entry!r}")
        opts = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        want = {"weight", *obj.options}
        if set(opts) != want:
            extra, lacks = sorted(set(opts) - want), sorted(want - set(opts))
            raise ValueError(f"objectives.{name} " + (f"has unknown option(s) {extra}" if extra
                             else f"lacks {lacks}") + f"; its options: {sorted(want)} "
                             "(experiments/base.py lists each with its default)")
        if float(opts["weight"]) != 0.0:
            active[name] = opts
    return active


def model_heads(objectives_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The model heads the active objectives read (sorted), i.e. which head params a run has."""
    return tuple(sorted({h for n in active_objectives(objectives_cfg)
                         for h in get_objective(n).heads}))


def forward(
    apply_fn: Callable[..., Mapping[str, Array]],
    params: Any,
    batch: Mapping[str, Array],
    objective_names: Iterable[str],
    *,
    deterministic: bool,
    rngs: Mapping[str, Array] | None = None,
) -> dict[str, Array]:
    """Run the model once per view with the union of the heads the objectives need on it.

    `params` is either the variables dict ({'params': ...}) or the bare params tree. View '_b' runs
    on the keys ending in '_b' (suffix stripped) and its outputs come back suffixed ('embedding_b').
    Each extra view gets its own dropout stream (rngs folded with the view index).
    """
    objs = [get_objective(n) for n in objective_names]
    missing = sorted({k for o in objs for k in o.batch_keys if k not in batch})
    if missing:
        raise KeyError(f"batch lacks keys {missing} needed by objectives {[o.name for o in objs]}")
    variables = params if "params" in params else {"params": params}
    heads_per_view: dict[str, set[str]] = {}
    for o in objs:
        for v in o.views:
            heads_per_view.setdefault(v, set()).update(o.heads)
    outputs: dict[str, Array] = {}
    for i, view in enumerate(sorted(heads_per_view)):  # '' sorts first
        if view:
            sub = {k[: -len(view)]: x for k, x in batch.items() if k.endswith(view)}
        else:
            sub = dict(batch)
        view_rngs = None
        if rngs is not None:
            view_rngs = {k: jax.random.fold_in(r, i) if i else r for k, r in rngs.items()}
        out = apply_fn(
            variables, sub, heads=tuple(sorted(heads_per_view[view])),
            deterministic=deterministic, rngs=view_rngs,
        )
        outputs.update({k + view: x for k, x in out.items()})
    return outputs


def denominators(batch: Mapping[str, Array], objectives_cfg: Mapping[str, Any]) -> dict[str, Array]:
    """name -> float32 param-free denominator of each active objective on this batch."""
    return {
        n: jnp.asarray(get_objective(n).count(batch), jnp.float32)
        for n in active_objectives(objectives_cfg)
    }


def compute_loss(
    outputs: Mapping[str, Array],
    batch: Mapping[str, Array],
    objectives_cfg: Mapping[str, Any],
    denominators: Mapping[str, Array] | None = None,
    *,
    axis_name: str | None = None,
) -> tuple[Array, Metrics]:
    """(scalar loss, {'name/metric': (sum, count)}).

    `axis_name` is passed to every objective as the option of that name (InfoNCE gathers
    negatives across it under pmap/shard_map).
    """
    total = jnp.float32(0.0)
    metrics: Metrics = {}
    for name, opts in active_objectives(objectives_cfg).items():
        obj = get_objective(name)
        opts = {**opts, "axis_name": axis_name}
        m = obj.loss(outputs, batch, opts)
        den = obj.count(batch) if denominators is None else denominators[name]
        total = total + float(opts["weight"]) * safe_div(m["loss"][0], den)
        for k, (s, c) in m.items():
            if k == "z_loss":  # auxiliary term, unprefixed metric shared by all objectives
                total = total + safe_div(s, den)
                if "z_loss" in metrics:
                    s, c = metrics["z_loss"][0] + s, metrics["z_loss"][1] + c
                metrics["z_loss"] = (s, c)
            else:
                metrics[f"{name}/{k}"] = (s, c)
    return total, metrics


def summarize(metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """sum / count per metric (NaN where count is 0), plus derived ones (causal_lm/perplexity)."""
    out = {}
    for k, (s, c) in metrics.items():
        s, c = float(np.asarray(s)), float(np.asarray(c))
        out[k] = s / c if c else math.nan
    for name, obj in OBJECTIVES.items():
        own = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(name + "/")}
        if obj.derived is not None and "loss" in own and not math.isnan(own["loss"]):
            out.update({f"{name}/{k}": v for k, v in obj.derived(own).items()})
    return out
