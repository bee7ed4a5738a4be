"""Causal GPT pretrained on the synthetic world's biographies (the chat agent's first stage).

Knowledge storage + extraction as in "Physics of Language Models 3.1": 5 shuffled paraphrases per
person with full names in every sentence, and "mixed training": the *train* people's questions
with answers ('question answer' texts, data.world.mix_qa) join the biographies, so pretraining
already learns to answer from facts stored by the bios; held-out people appear only in bios.
A small world (100 people) and a small batch give each fact ~100 updates within the CPU budget.

Command:  solo train gpt_world --workdir runs/gpt_world
Runtime:  RUNTIME_GPT on a 2-core CPU.
Expect:   EXPECT_GPT
"""

from experiments import base


def get_config():
    c = base.get_config()
    c.name = "gpt_world"
    c.model.update(d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128)
    c.data.update(task="lm", seq_len=128, batch_size=16)
    c.data.tokenizer.vocab_size = 1024
    c.data.world.update(num_people=100, bios_per_person=5, full_name_frac=1.0, mix_qa=True)
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=1600, log_every=100, eval_every=800, ckpt_every=800)
    return c
