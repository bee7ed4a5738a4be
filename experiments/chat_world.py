"""Chat agent: SFT on the world's question/answer chats, initialised from gpt_world.

The README's main job. If runs/gpt_world holds no checkpoint yet, `solo train` first trains
gpt_world into it (config.train.init_experiment), then fine-tunes here, then prints held-out
exact-match accuracy and a transcript. Questions about held-out people never appear in any
training data: answering them needs the facts learned from their biographies in pretraining.
SFT is short and gentle (lr 1e-4): gpt_world's mixed training already taught the template
(single- and 3-turn chats), and at lr 1e-3 SFT memorised the train people's answers and cost
held-out accuracy (measured before 3-turn chats: 0.53 -> 0.43).

Command:  solo train chat_world --workdir runs/chat_world
Runtime:  5.9 min for both stages on a quiet 2-core Intel Xeon (~25k tokens/s; 6.3-7.5 min on
          earlier 2-core machines); SFT + held-out eval take ~1 min of it.
Expect:   held-out exact-match on the test split, greedy, through the chat path, on a 2-core
          Intel Xeon: 0.699 (151/216) with seed 0 (SFT eval loss 0.1152). The seed moves it a
          lot: seeds 0-3 gave 0.699 / 0.454 / 0.542 / 0.583 (mean 0.570, sd 0.10; SFT eval loss
          0.115-0.571), so compare recipes over several seeds (--config.seed=S on gpt_world and
          here). Each machine reproduces its own figure bit for bit (float summation order moves
          it too: seed 0 before the kv-head-major QKV layout gave 0.847 on the Xeon, 0.731 on an
          AMD EPYC). Abstention on the 106 questions no fact answers (people who do not exist,
          off-world): 0.000 on every seed; the agent invents an answer.
"""

from solo.experiments import gpt_world


def get_config():
    c = gpt_world.get_config()
    c.name = "chat_world"
    c.data.update(task="sft", seq_len=128, batch_size=16)
    c.optim.update(lr=1e-4, warmup_steps=20)
    c.train.update(steps=80, log_every=20, eval_every=40, ckpt_every=40,
                   init_from="runs/gpt_world", init_experiment="gpt_world")
    c.agent.system_prompt = ""
    return c
