"""SmolLM2-135M-Instruct taught the synthetic world with LoRA: the pretrained counterpart of the
from-scratch chat_world, scored the same way (held-out exact match through the chat path).

SmolLM2 has never met the world's people, and a held-out person's facts are stated only in their
biographies, so training on the train people's chats alone cannot answer questions about them.
As gpt_world does ("mixed training"), the LoRA run reads the biographies together with the train
people's question/answer chats, rendered in SmolLM2's own ChatML template (the template
`solo chat` uses, so training and inference format turns alike). The form comes fast, the facts
slowly: after 10 steps replies already have the world's answer format (exact match 0.009).
Adapters (rank 16) go on every projection of the 30 layers; the base stays frozen bit for bit.

Command:  solo train smollm_world_sft --workdir runs/smollm_world_sft
          (the first run imports the GGUF into runs/smollm2: see experiments/base.py's
          SMOLLM2_GGUF), then `solo eval runs/smollm_world_sft` repeats the score.
Runtime:  21.4 min on a quiet 2-core CPU (Intel Xeon, Sapphire Rapids): 120 steps of 2,048
          tokens at 8.5 s (242 tokens/s; 17 min), then the held-out evals (538 greedy chat
          replies, ~4 min); peak memory 7.3 GB.
Expect:   eval loss on unseen biography paraphrases 0.738 (perplexity 2.09; from-scratch
          gpt_world: 0.75 after 4,000 steps), train loss 0.40; held-out exact match 0.014
          (3/216), against the from-scratch chat_world's 0.847 on the same machine (its seed
          0, before the kv-head-major QKV layout; 0.45-0.70 over seeds 0-3 now). Replies have
          the world's form ("January 27, 1955", "Hanoi") with wrong facts: 120 steps are 1.3
          passes over the 138k-token corpus, so each biography was read about once, while facts
          stored in weights need on the order of 100 exposures (Physics of LMs 3.1; gpt_world
          gives ~200). At 242 tokens/s that is hours on 2 CPU cores (20 passes: ~3.2 h); on an
          accelerator, raise train.steps.
"""

from solo.experiments import base, gpt_world


def get_config():
    c = base.get_config()
    c.name = "smollm_world_sft"
    world = gpt_world.get_config().data.world
    c.data.update(task="lm", seq_len=128, batch_size=16)
    c.data.world.update(world)
    c.lora.update(rank=16, alpha=32.0, targets=("attn/[qkvo]$", "mlp/wi_[01]$", "mlp/wo$"))
    c.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.0)
    c.train.update(steps=120, log_every=20, eval_every=120, ckpt_every=120, eval_batches=8,
                   init_from="runs/smollm2", init_import=base.SMOLLM2_GGUF, init_model=True)
    c.agent.system_prompt = ""
    return c
