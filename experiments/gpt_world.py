"""Causal GPT pretrained on the synthetic world's biographies (the chat agent's first stage).

Knowledge storage + extraction as in "Physics of Language Models 3.1": 5 shuffled paraphrases per
person with full names in every sentence, and "mixed training": the *train* people's
question/answer chats, in the same chat template SFT and the agent use (data.world.mix_qa='chat'),
join the biographies, so pretraining already learns to answer from facts stored by the bios.
Held-out people appear only in their biographies. A small world (100 people) and a small batch
give each fact ~200 updates within the CPU budget.

Command:  solo train gpt_world --workdir runs/gpt_world
Runtime:  5.5-6.5 min on a quiet 2-core CPU (~20k tokens/s); about twice that on a machine shared
          with other jobs (load 4-6).
Expect:   train loss 0.20; eval loss on unseen biography paraphrases 0.67 at step 2000 and
          0.78 / 0.75 at step 4000 (AMD EPYC / Intel Xeon; their wording over-fits while the facts
          keep improving); held-out question exact match straight from this checkpoint
          0.71 / 0.84 (chat path, test split).
"""

from solo.experiments import base


def get_config():
    c = base.get_config()
    c.name = "gpt_world"
    c.model.update(d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128)
    c.data.update(task="lm", seq_len=128, batch_size=16)
    c.data.tokenizer.vocab_size = 1024
    # chat_turns=3: the mixed chats include 3-turn conversations, so replies end at their own
    # end-of-turn deep in a multi-turn chat too. (The chat template puts a space before a reply,
    # so an answer's " Vienna" gets the pieces the biographies taught.) unknown_people: the
    # abstention eval's people who do not exist (they change no training data).
    c.data.world.update(num_people=100, bios_per_person=5, full_name_frac=1.0, mix_qa="chat",
                        chat_turns=3, unknown_people=200)
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=4000, log_every=100, eval_every=2000, ckpt_every=2000)
    return c
