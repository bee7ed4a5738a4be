"""Chat agent: SFT on the world's question/answer chats, initialised from gpt_world.

The README's main job. If runs/gpt_world holds no checkpoint yet, `solo train` first trains
gpt_world into it (config.train.init_experiment), then fine-tunes here. Questions about held-out
people never appear in the SFT data (nor in gpt_world's mixed QA texts): answering them needs the
facts learned from their biographies in pretraining. SFT is short: it teaches the chat template;
longer SFT memorises the train people's answers and the held-out (validation) loss rises.

Command:  solo train chat_world --workdir runs/chat_world
Runtime:  RUNTIME_CHAT on a 2-core CPU (both stages).
Expect:   EXPECT_CHAT
"""

from experiments import gpt_world


def get_config():
    c = gpt_world.get_config()
    c.name = "chat_world"
    c.data.update(task="sft", seq_len=128, batch_size=16)
    c.optim.update(lr=5e-4, warmup_steps=10)
    c.train.update(steps=80, log_every=20, eval_every=40, ckpt_every=40,
                   init_from="runs/gpt_world", init_experiment="gpt_world")
    c.agent.system_prompt = ""
    return c
