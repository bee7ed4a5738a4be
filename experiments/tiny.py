"""The smallest causal run: smoke tests, the notebook and laptops.

Command:  solo train tiny --workdir runs/tiny
Runtime:  12 s on a quiet 2-core CPU (25 s at load ~9).
Expect:   eval loss 2.47 at step 150 (from 6.9 = ln 1024 at init), token accuracy 0.49.
"""

from solo.experiments import base


def get_config():
    c = base.get_config()
    c.name = "tiny"
    c.model.update(d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=128)
    c.data.update(task="lm", seq_len=64, batch_size=16)
    c.data.world.num_people = 50
    c.optim.update(lr=3e-3, warmup_steps=20)
    c.train.update(steps=150, log_every=25, eval_every=75, ckpt_every=75)
    return c
