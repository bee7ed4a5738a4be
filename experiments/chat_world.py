"""Chat agent: SFT on the world's question/answer chats, initialised from gpt_world.

The README's main job. If runs/gpt_world holds no checkpoint yet, `solo train` first trains
gpt_world into it (config.train.init_experiment), then fine-tunes here. Questions about held-out
people never appear in the SFT data: answering them needs the facts learned in pretraining.

Command:  solo train chat_world --workdir runs/chat_world
Runtime:  RUNTIME_CHAT on a 2-core CPU (both stages).
Expect:   EXPECT_CHAT
"""

from experiments import gpt_world


def get_config():
    c = gpt_world.get_config()
    c.name = "chat_world"
    c.data.update(task="sft", seq_len=128, batch_size=32)
    c.optim.update(lr=1e-3, warmup_steps=50)
    c.train.update(steps=500, eval_every=250, ckpt_every=250, init_from="runs/gpt_world",
                   init_experiment="gpt_world")
    c.agent.system_prompt = ""
    return c
