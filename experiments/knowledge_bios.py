"""Knowledge storage, stage 1 of knowledge_qa: a causal GPT pretrained on biographies only.

Physics of Language Models, Part 3.1 (Allen-Zhu & Li, 2023): a model pretrained on one biography
per person stores the facts but cannot extract them for people whose questions it never
fine-tuned on; knowledge augmentation in pretraining (several paraphrases per person, shuffled
sentence order, full names) makes them extractable. This stage sees the biographies of every
person and no question; `knowledge_qa` fine-tunes it on half the people's questions and asks
about the other half. The augmentation options are `data.world.bios_per_person` (1: the
paper's "bioS single"; 5: "multi5", each paraphrase with its own sentence order and wording)
and `data.world.full_name_frac` (0: sentences after the first name the person by first name
only; 1: "fullname"). Every setting trains the same number of steps, so each fact is seen
equally often (a single biography is repeated five times as often as each of five paraphrases).
notebooks/knowledge.ipynb sweeps them.

Command:  solo train knowledge_bios --workdir runs/knowledge_bios
Runtime:  5.4 min on a 2-core Intel Xeon (~21k tokens/s) shared with other jobs.
Expect:   train loss ~0.11; eval loss on unseen biography paraphrases 0.59 / 0.41 / 0.52 / 0.62
          at steps 750-3000 (bios_per_person=1: 1.41 rising to 2.11: a single biography is
          memorised as one string). Test people's fact sentences completed out of context,
          greedy: 0.62 (1 biography per person: 0.10).
"""

from solo.experiments import base


def get_config():
    c = base.get_config()
    c.name = "knowledge_bios"
    c.model.update(d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128)
    c.data.update(task="lm", seq_len=128, batch_size=16)
    c.data.tokenizer.vocab_size = 1024
    # the paper's split: fine-tune on half the people's questions, test on the other half
    c.data.world.update(num_people=400, heldout_frac=0.5, bios_per_person=5, full_name_frac=1.0,
                        mix_qa="")
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=3000, log_every=100, eval_every=1000, ckpt_every=1000)
    return c
