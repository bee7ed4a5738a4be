"""nanoGPT's CPU reference run for shakespeare_char, reproduced (karpathy/nanoGPT README):

  python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

which nanoGPT reports reaches a validation loss of 1.88 in about 3 minutes.

Get the file: it ships in ../shared/data/tinyshakespeare.txt here; elsewhere download
karpathy/char-rnn's data/tinyshakespeare/input.txt and pass --config.data.source=PATH.

Command:  solo train nanogpt_shakespeare_char --workdir runs/nanogpt_shakespeare_char
Runtime:  248 s on a 2-core Intel Xeon at load ~6 from other jobs (4.2-9k tokens/s);
          nanoGPT reports ~3 minutes for its PyTorch run.
Expect:   validation loss 1.81 at step 2000 (nanoGPT: 1.88), on the whole validation split:
          2.50 / 2.20 / 2.06 / 1.97 / 1.90 / 1.86 / 1.83 / 1.81 every 250 steps; train loss 1.64.

Matched: 4 layers, 4 heads, 128 wide, GELU MLP 4x, LayerNorm (eps 1e-5), learned positions,
tied embeddings, context 64, batch 12, 2,000 steps, AdamW lr 1e-3 (betas 0.9/0.99, weight decay
0.1 on matmul weights only, as nanoGPT's optimizer groups), 100 warmup steps then cosine decay
to 1e-4 at step 2,000, global-norm clip 1.0, dropout 0, the play's first 90% of characters to
train on and the last 10% to validate on. Differences: solo's character tokenizer has specials
and byte fallbacks beside the 65 characters (their logits are trained down within a few steps);
nanoGPT's LayerNorm and linear layers have no bias (bias=False), solo's LayerNorm has one;
nanoGPT samples windows at random offsets, solo reads the split cut into 64-character rows in a
shuffled order; nanoGPT estimates validation loss on 20 random batches (eval_iters=20, noisy),
solo scores the whole validation split.
"""

from solo.experiments import base
from solo.experiments.shakespeare_char import DEFAULT_PATH


def get_config():
    c = base.get_config()
    c.name = "nanogpt_shakespeare_char"
    c.model.update(d_model=128, num_layers=4, num_heads=4, d_ff=512, max_len=64,
                   positions="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu", dropout=0.0)
    c.data.update(source=DEFAULT_PATH, task="lm", seq_len=64, batch_size=12, eval_batch_size=64,
                  split_mode="tail", val_fraction=0.1, txt_split="file", pack="fill")
    c.data.tokenizer.update(kind="char", vocab_size=0)
    c.optim.update(lr=1e-3, warmup_steps=100, decay_steps=2000, min_lr_ratio=0.1, b1=0.9, b2=0.99,
                   weight_decay=0.1, clip_norm=1.0)
    c.train.update(steps=2000, log_every=50, eval_every=250, eval_batches=0, ckpt_every=1000)
    return c
