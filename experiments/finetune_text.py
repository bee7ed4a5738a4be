"""Fine-tune a pretrained causal LM on a text file: the seed's "GPT-2 on your own text" example
(nanoGPT's finetune_shakespeare), on SmolLM2-135M-Instruct and tinyshakespeare.

The first run imports the model (train.init_import -> runs/smollm2, ~10 s; get the GGUF file
as experiments/base.py's SMOLLM2_GGUF says), evaluates it at step 0 (train.eval_at_start: the
"before"), fine-tunes every parameter at nanoGPT's constant lr 3e-5, evaluates again, then prints
samples. Any imported causal model works the same: --config.train.init_from=runs/gpt2 (after
`solo import DIR --workdir runs/gpt2`). --config.lora.rank=8 fine-tunes adapters instead.

Command:  solo train finetune_text --workdir runs/finetune_text
Runtime:  9.2 min on a quiet 2-core CPU (Intel Xeon, Sapphire Rapids: 40 steps of 2,048 tokens
          at 10.7 s, 191 tokens/s; the two evals of 16k tokens, compilation, the import and the
          samples the rest); peak memory 8.1 GB (float32 params, Adam moments and activations).
Expect:   validation perplexity 42.5 at step 0 -> 28.3 at step 40 (loss 3.749 -> 3.342, tokens
          of SmolLM2's BPE; "tail" split: the last 10% of the play text), then samples in the
          play's format (speaker names in capitals, verse lines).
"""

from solo.experiments import base
from solo.experiments.shakespeare_char import DEFAULT_PATH


def get_config():
    c = base.get_config()
    c.name = "finetune_text"
    c.data.update(source=DEFAULT_PATH, task="lm", seq_len=256, batch_size=8, eval_batch_size=8,
                  split_mode="tail", val_fraction=0.1, txt_split="file", pack="fill")
    c.optim.update(lr=3e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, b2=0.99)
    c.train.update(steps=40, log_every=5, eval_every=40, eval_batches=8, eval_at_start=True,
                   ckpt_every=40, keep=1, init_from="runs/smollm2", init_import=base.SMOLLM2_GGUF,
                   init_model=True)
    c.agent.update(sample_prompts=("ROMEO:\n", "First Citizen:\n"), max_new_tokens=64,
                   temperature=0.8, top_k=50)
    return c
