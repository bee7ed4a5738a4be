"""Encoder-decoder: turn a fact sentence into the question that asks for it.

Command:  solo train seq2seq_world --workdir runs/seq2seq_world
Runtime:  107 s on a quiet 2-core CPU (7 min at load ~8).
Expect:   eval loss 1.64 at step 600 (6.2 after 4 steps), teacher-forced token accuracy 0.73
          on questions about held-out people.
"""

from solo.experiments import base


def get_config():
    c = base.get_config()
    c.name = "seq2seq_world"
    c.model.update(kind="encoder_decoder", d_model=128, num_layers=2, num_heads=4, d_ff=512,
                   max_len=64)
    c.data.update(task="seq2seq", seq_len=48, src_seq_len=48, batch_size=32)
    c.objectives.causal_lm.weight = 0.0
    c.objectives.seq2seq.weight = 1.0
    c.optim.update(lr=2e-3, warmup_steps=50)
    c.train.update(steps=600, eval_every=200, ckpt_every=300)
    return c
