"""Causal GPT pretrained on the synthetic world's biographies (the chat agent's first stage).

Command:  solo train gpt_world --workdir runs/gpt_world
Runtime:  RUNTIME_GPT on a 2-core CPU.
Expect:   EXPECT_GPT
"""

from experiments import base


def get_config():
    c = base.get_config()
    c.name = "gpt_world"
    c.model.update(d_model=192, num_layers=4, num_heads=6, d_ff=768, max_len=128)
    c.data.update(task="lm", seq_len=128, batch_size=32)
    c.data.tokenizer.vocab_size = 1024
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=1500, log_every=50, eval_every=500, ckpt_every=500)
    return c
