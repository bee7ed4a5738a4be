"""Knowledge extraction, stage 2: fine-tune knowledge_bios on the train people's questions, then
ask about the held-out people (Physics of Language Models 3.1; see knowledge_bios).

If runs/knowledge_bios holds no checkpoint, `solo train` trains knowledge_bios into it first
(train.init_experiment). Questions about held-out people never appear in any training data:
answering them needs facts the biographies stored, extracted the way the fine-tuning taught for
other people. `solo eval WORKDIR` prints the held-out exact match (the world's test people).

Command:  solo train knowledge_qa --workdir runs/knowledge_qa
Runtime:  0.8 min of fine-tuning on a 2-core Intel Xeon shared with other jobs (+5.4 min if
          knowledge_bios is trained first).
Expect:   held-out exact match 0.326 on the first 270 test-people questions (the fine-tuned
          people's: 0.896); from knowledge_bios with bios_per_person=1: 0.044 (0.193). The
          paper's direction (augmentation makes facts extractable), not its size (~0.96):
          notebooks/knowledge.ipynb says why.
"""

from solo.experiments import knowledge_bios


def get_config():
    c = knowledge_bios.get_config()
    c.name = "knowledge_qa"
    c.data.update(task="sft")
    c.optim.update(lr=3e-4, warmup_steps=20)
    c.train.update(steps=400, log_every=50, eval_every=200, ckpt_every=200,
                   init_from="runs/knowledge_bios", init_experiment="knowledge_bios")
    c.agent.eval_questions = 270  # the figure below: the first 15 test people's questions
    return c
