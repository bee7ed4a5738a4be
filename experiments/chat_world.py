"""Chat agent: SFT on the world's question/answer chats, initialised from gpt_world.

The README's main job. If runs/gpt_world holds no checkpoint yet, `solo train` first trains
gpt_world into it (config.train.init_experiment), then fine-tunes here, then prints held-out
exact-match accuracy and a transcript. Questions about held-out people never appear in any
training data: answering them needs the facts learned from their biographies in pretraining.
SFT is short: gpt_world's mixed training already taught the template; longer SFT memorises the
train people's answers.

Command:  solo train chat_world --workdir runs/chat_world
Runtime:  8.2 min measured for both stages on a 2-core CPU still shared with other jobs (load
          4-6, ~10k tokens/s; 16 min at load 8-10); SFT + held-out eval take ~1 min of it.
Expect:   SFT eval loss (held-out validation people) 0.44; held-out exact-match 0.52 on the test
          split (113/216 questions, greedy, through the chat path).
"""

from experiments import gpt_world


def get_config():
    c = gpt_world.get_config()
    c.name = "chat_world"
    c.data.update(task="sft", seq_len=128, batch_size=16)
    c.optim.update(lr=1e-3, warmup_steps=20)
    c.train.update(steps=80, log_every=20, eval_every=40, ckpt_every=40,
                   init_from="runs/gpt_world", init_experiment="gpt_world")
    c.agent.system_prompt = ""
    return c
