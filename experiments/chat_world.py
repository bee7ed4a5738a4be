"""Chat agent: SFT on the world's question/answer chats, initialised from gpt_world.

The README's main job. If runs/gpt_world holds no checkpoint yet, `solo train` first trains
gpt_world into it (config.train.init_experiment), then fine-tunes here. Questions about held-out
people never appear in the SFT data (nor in gpt_world's mixed QA texts): answering them needs the
facts learned from their biographies in pretraining. SFT is short: it teaches the chat template;
longer SFT memorises the train people's answers and the held-out (validation) loss rises.

Command:  solo train chat_world --workdir runs/chat_world
Runtime:  12 min wall on a shared 2-core CPU at load 6-10 (both stages: gpt_world ~11 min, SFT +
          held-out eval ~1 min); 8.5 min of CPU time, so ~7-8 min on a quiet machine.
Expect:   SFT eval loss (held-out validation people) 0.64 at step 40, 0.68 at 80; held-out
          exact-match ~0.20 on the test split (43/216), 0.33 on validation (76/234). Below the
          0.5 target: extraction for held-out people is the bottleneck (see the report).
"""

from experiments import gpt_world


def get_config():
    c = gpt_world.get_config()
    c.name = "chat_world"
    c.data.update(task="sft", seq_len=128, batch_size=16)
    # Answers start with a space: the tokenizer has no dummy prefix, so " Vienna" gets the pieces
    # the bios and mixed QA texts taught ("Vienna" would be spelled with other, unseen pieces).
    c.data.world.answer_prefix = " "
    c.optim.update(lr=1e-3, warmup_steps=20)
    c.train.update(steps=80, log_every=20, eval_every=40, ckpt_every=40,
                   init_from="runs/gpt_world", init_experiment="gpt_world")
    c.agent.system_prompt = ""
    return c
