"""Character-level causal LM on tinyshakespeare (nanoGPT's shakespeare_char, 90/10 tail split).

Get the file: it ships in ../shared/data/tinyshakespeare.txt here; elsewhere download
karpathy/char-rnn's data/tinyshakespeare/input.txt and pass --config.data.source=PATH.

Command:  solo train shakespeare_char --workdir runs/shakespeare_char
Runtime:  174 s on a quiet 2-core CPU (~14.8k tokens/s; 9 min at load 5-7).
Expect:   validation loss 2.30 at step 300 and 2.06 at step 600 (5.8 at init; the tokenizer
          has 333 pieces: 65 characters + 10 specials + 256 bytes + a few), accuracy 0.40.
"""

from pathlib import Path

from solo.experiments import base

DEFAULT_PATH = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")


def get_config():
    c = base.get_config()
    c.name = "shakespeare_char"
    # nanoGPT's CPU-sized shakespeare_char (its 6x384 GPU model is benchmarks/train_throughput.py
    # --size nanogpt-char): 4 layers, 128 wide, 128 characters of context.
    c.model.update(d_model=128, num_layers=4, num_heads=4, d_ff=512, max_len=128,
                   positions="learned", norm="layernorm", mlp="gelu", dropout=0.0)
    c.data.update(source=DEFAULT_PATH, task="lm", seq_len=128, batch_size=32, split_mode="tail",
                  val_fraction=0.1, txt_split="file", pack="fill")
    c.data.tokenizer.update(kind="char", vocab_size=0)
    c.optim.update(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, b2=0.99, weight_decay=0.1)
    c.train.update(steps=600, log_every=50, eval_every=300, eval_batches=50, ckpt_every=300)
    return c
