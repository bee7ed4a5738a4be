"""Helpers the tests share: configs built from experiments/base.py, the one home of defaults."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from solo.config import RunConfig
from solo.data.config import DataConfig
from solo.experiments.base import get_config
from solo.model import ModelConfig


def model_config(**overrides) -> ModelConfig:
    """base.py's model section with `overrides` (give vocab_size: base's 0 means 'tokenizer's')."""
    return ModelConfig.from_config(get_config().model, **overrides)


def data_config(config=None, **overrides) -> DataConfig:
    """The typed data section of `config` (default: base.py's), with `overrides` replaced."""
    return DataConfig.from_config(config or get_config()).replace(**overrides)


def run_config(config=None) -> RunConfig:
    return RunConfig.from_config(config or get_config())


@contextlib.contextmanager
def serving(app):
    """A real uvicorn server on a free localhost port, in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def llama_style_tokenizer(words: str = "the king sat on his throne and spoke to all who came"):
    """An HFTokenizer as Llama 2's tokenizer.json builds one (Metaspace word pieces; a decoder
    that replaces '▁' by a space and strips the text's first space), over `words`."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from solo.data.hf_tokenizer import HFTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    pieces = [*specials, *dict.fromkeys("▁" + w for w in words.split())]
    b = Backend(models.WordLevel({t: i for i, t in enumerate(pieces)}, unk_token="<unk>"))
    b.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    b.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    b.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return HFTokenizer(b.to_str(), named_tokens=dict(bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>"), add_bos=True)
