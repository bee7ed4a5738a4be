"""Pretrained models in and out: `import_model` turns a Hugging Face checkpoint directory (or a
hub id, where the machine has internet) or a GGUF file into an ordinary workdir at step 0, and
`export_model` writes a workdir as safetensors + config.json + tokenizer files that
`transformers` loads. The tensor mappings are model/hf.py's and model/gguf.py's.

An imported workdir holds config.json (experiments/base.py with the model's `config.model`, the
objectives its heads serve, and its tokenizer), tokenizer/ (tokenizer.json, tokenizer_config.json
with the chat template) and checkpoints/0 (its params). `solo eval/sample/chat/serve` use it as
they use any workdir; to fine-tune it, train a config whose `train.init_from` names it.

Every path may be remote (gs://..., through `etils.epath` as all workdir code; gs:// needs
gcsfs): sources are read through epath (a GGUF file is downloaded first: its reader memory-maps
a local file), and the output is written in a local staging directory, then renamed into place
(local) or uploaded with its config.json last (remote: object stores have no atomic directory
rename; solo.files.upload_tree says what the order guarantees).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import jax
import numpy as np

from solo.config import RunConfig
from solo.data.pipeline import save_tokenizer
from solo.experiments.base import get_config
from solo.files import is_remote, join, local_file, path, read_bytes, staged_dir, write_atomic
from solo.model import hf as hf_lib
from solo.model import unstack_layers
from solo.model.config import ModelConfig
from solo.model.hf import ConversionError
from solo.objectives import model_heads
from solo.train.checkpoint import Checkpointer
from solo.train.workdir import CONFIG_FILE, _reason, _remote_hint, write_config

OBJECTIVES = {"gpt2": ("causal_lm",), "llama": ("causal_lm",), "bert": ("mlm", "nsp")}
TASKS = {"gpt2": "lm", "llama": "lm", "bert": "bert"}


# ----------------------------------------------------------------------------- import


def _check_reachable(p: str) -> None:
    """A remote path that cannot be used (gcsfs missing, no credentials): one line naming the
    fix (the workdir code's hint), before anything is read or written."""
    if not is_remote(p):
        return
    try:
        path(p).exists()
    except Exception as e:  # noqa: BLE001 - ImportError without gcsfs; object stores' own
        raise ConversionError(f"{p} cannot be used ({_reason(e)})" + _remote_hint(p)) from None


def _read_hf_dir(src: str) -> tuple[dict, dict[str, np.ndarray], Any]:
    """(config.json, state dict, tokenizer) of an HF checkpoint directory (local or remote)."""
    from solo.data.hf_tokenizer import HFTokenizer

    cfg_path = join(src, "config.json")
    if not path(cfg_path).is_file():
        raise ConversionError(f"{src} is not a Hugging Face checkpoint directory (no "
                              "config.json); pass a directory from save_pretrained or a .gguf")
    config = json.loads(path(cfg_path).read_text())
    hf_lib.arch_of(config)  # unsupported architectures fail before the weights are read
    files = sorted(p.name for p in path(src).iterdir() if p.name.endswith(".safetensors"))
    state: dict[str, np.ndarray] = {}
    if files:
        from safetensors.numpy import load, load_file

        for f in files:  # local files memory-mapped; remote ones read whole
            state.update(load(read_bytes(join(src, f))) if is_remote(src)
                         else load_file(os.path.join(src, f)))
    elif path(join(src, "pytorch_model.bin")).is_file():
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{src} holds pytorch_model.bin, which needs torch to read; "
                                  "install it, or convert the weights to safetensors") from None
        weights = join(src, "pytorch_model.bin")
        sd = torch.load(io.BytesIO(read_bytes(weights)) if is_remote(src) else weights,
                        map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in sd.items()}
    else:
        raise ConversionError(f"{src} has config.json but no weights (*.safetensors or "
                              "pytorch_model.bin)")
    if not path(join(src, "tokenizer.json")).is_file():
        raise ConversionError(f"{src} has no tokenizer.json (the fast tokenizer's file): save "
                              "the tokenizer with transformers' save_pretrained beside the model")
    return config, state, HFTokenizer.from_dir(src)


def _read_source(src: str, stack: contextlib.ExitStack
                 ) -> tuple[dict, dict[str, np.ndarray], Any, str]:
    """(config, state dict, tokenizer, where) of a source; a remote GGUF file's local copy lives
    as long as `stack` (its tensors may be views of the memory map)."""
    from solo.data.hf_tokenizer import HFTokenizer

    if src.startswith("hf:"):  # a hub id: needs internet (huggingface_hub caches it)
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ConversionError("hf: ids need huggingface_hub: pip install "
                                  "huggingface_hub") from None
        src = snapshot_download(src[3:], allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                         "*.model", "*.jinja"])
    _check_reachable(src)
    if path(src).is_file() and src.endswith(".gguf"):
        from solo.model import gguf

        r = gguf.reader(stack.enter_context(local_file(src)))
        config = gguf.hf_config(r)
        return config, gguf.state_dict(r, config), HFTokenizer.from_gguf(r), src
    if path(src).is_dir():
        return (*_read_hf_dir(src), src)
    raise ConversionError(f"{src} does not exist or is neither a checkpoint directory nor a "
                          ".gguf file")


def import_model(src: str, workdir: str, *, name: str = "", dtype: str = "float32"
                 ) -> RunConfig:
    """Writes `src` (an HF directory, a .gguf file, or hf:ID) as a workdir at step 0; returns
    its config. dtype: the params' storage and compute dtype (float32 or bfloat16; GGUF
    tensors are dequantized to it). Nothing is written when the source cannot be used."""
    _check_reachable(workdir)
    if path(join(workdir, CONFIG_FILE)).exists():
        raise ConversionError(f"{workdir} already holds a run; import into a new --workdir")
    with contextlib.ExitStack() as stack:
        return _import(src, workdir, name, dtype, stack)


def _import(src: str, workdir: str, name: str, dtype: str, stack: contextlib.ExitStack
            ) -> RunConfig:
    hf, state, tok, where = _read_source(src, stack)
    arch = hf_lib.arch_of(hf)
    c = get_config()
    c.name = name or os.path.splitext(os.path.basename(os.path.normpath(where)))[0]
    c.model.update(hf_lib.model_overrides(hf), dtype=dtype, param_dtype=dtype)
    if tok.vocab_size > c.model.vocab_size:
        raise ConversionError(f"the tokenizer has {tok.vocab_size} ids but the model's "
                              f"vocabulary only {c.model.vocab_size}: they do not belong together")
    for objective in c.objectives:
        c.objectives[objective].weight = 1.0 if objective in OBJECTIVES[arch] else 0.0
    c.data.task = TASKS[arch]
    c.data.seq_len = min(c.data.seq_len, c.model.max_len)
    config = RunConfig.from_config(c)
    params = jax.tree.map(lambda x: np.asarray(x, jax.numpy.dtype(config.model.param_dtype)),
                          hf_lib.params_from_hf(state, config.model, arch,
                                                model_heads(config.objectives)))
    # an import is all there or not at all (remote: config.json, which makes it a workdir,
    # goes up last; Orbax's checkpoint carries its own commit marker)
    with staged_dir(workdir, ".import-", commit=(CONFIG_FILE,)) as tmp:
        save_tokenizer(tok, tmp)
        write_config(config, tmp)
        ckpt = Checkpointer(tmp, async_save=False)
        ckpt.save(0, {"params": params, "step": np.zeros((), np.int32)}, {})
        ckpt.wait()
        ckpt.close()
    return config


# ----------------------------------------------------------------------------- export


def arch_for(cfg: ModelConfig) -> str:
    """The HF architecture that expresses a solo model, or a ConversionError saying why none."""
    errors = []
    for arch in hf_lib.ARCHS:
        try:
            hf_lib.check_expressible(cfg, arch)
            return arch
        except ConversionError as e:
            errors.append(str(e))
    raise ConversionError("no Hugging Face architecture expresses this model: "
                          + "; ".join(errors))


def export_model(workdir: str, out: str, checkpoint: str | int = "latest") -> str:
    """Writes a workdir's checkpoint as an HF directory `out` (model.safetensors, config.json,
    the tokenizer's files; LoRA adapters merged); returns the architecture. Nothing is written
    if the model has no HF counterpart."""
    from safetensors.numpy import save_file

    from solo.train.inference import load

    _check_reachable(workdir)
    _check_reachable(out)
    if path(out).exists() and (not path(out).is_dir() or any(path(out).iterdir())):
        raise ConversionError(f"{out} exists and is not empty; export into a new directory")
    loaded = load(workdir, checkpoint)
    cfg, params = unstack_layers(loaded.model.cfg, jax.device_get(loaded.params))
    arch = arch_for(cfg)
    state = hf_lib.hf_from_params(params, cfg, arch)
    with staged_dir(out, ".export-", commit=("config.json",)) as tmp:
        # tensors HF ties to others are not stored twice (safetensors refuses shared memory)
        tied = {"gpt2": {"lm_head.weight"},
                "bert": {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"},
                "llama": {"lm_head.weight"} if cfg.tie_embeddings else set()}[arch]
        # float32 files (safetensors' numpy API has no bfloat16; transformers casts on load)
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()
                   if k not in tied},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_atomic(os.path.join(tmp, "config.json"),
                     json.dumps(hf_lib.hf_config(cfg, arch), indent=2) + "\n")
        tok = loaded.tokenizer
        if getattr(tok, "kind", None) == "hf":
            tok.save(tmp)
        else:  # solo's sentencepiece model, as it is (transformers' LlamaTokenizer reads it)
            write_atomic(os.path.join(tmp, "tokenizer.model"), read_bytes(tok.path))
    return arch
