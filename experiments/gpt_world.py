"""Causal GPT pretrained on the synthetic world's biographies (the chat agent's first stage).

Knowledge storage + extraction as in "Physics of Language Models 3.1": 5 shuffled paraphrases per
person with full names in every sentence, and "mixed training": the *train* people's questions
with answers ('question answer' texts, data.world.mix_qa) join the biographies, so pretraining
already learns to answer from facts stored by the bios; held-out people appear only in bios.
A small world (100 people) and a small batch give each fact ~100 updates within the CPU budget.

Command:  solo train gpt_world --workdir runs/gpt_world
Runtime:  ~11 min wall on a shared 2-core CPU at load 6-10 (5-8.5k tok/s, 2.5-4 steps/s of 2,048
          tokens); ~7.5 min of CPU time, so about 6-7 min on a quiet machine.
Expect:   train loss 0.24; eval loss (unseen paraphrases) 0.62 at step 1000, 0.68 at 2000
          (paraphrase wording over-fits; facts keep improving). Greedy 'question' -> ' answer'
          completion: ~77% for train people, ~45% for held-out people (n=60 each).
"""

from experiments import base


def get_config():
    c = base.get_config()
    c.name = "gpt_world"
    c.model.update(d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128)
    c.data.update(task="lm", seq_len=128, batch_size=16)
    c.data.tokenizer.vocab_size = 1024
    c.data.world.update(num_people=100, bios_per_person=5, full_name_frac=1.0, mix_qa="text")
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=2000, log_every=100, eval_every=1000, ckpt_every=1000)
    return c
