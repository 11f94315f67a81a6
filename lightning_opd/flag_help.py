"""Help text and choices for the flags many commands share, by config field name.

A field's own ``metadata={"help": ...}`` wins; these fill in the rest, so that every flag of every
command says what it does (``tests/test_cli_help.py`` walks every ``--help`` and fails on a flag
without). ``CHOICES`` become argparse choices (a typo is refused at once, with the list), applied only
where the field's default is one of them; a test keeps them equal to the constants they mirror (kept
as plain strings here so that this module imports nothing).
"""

from __future__ import annotations

HELP = {
    # prompts and generation
    "prompt_field": "the prompt set's field that holds the prompt text",
    "chat_template": "apply the tokenizer's chat template: auto (when it has one) | always | never",
    "max_new_tokens": "tokens generated per response at most (the horizon T of what is generated)",
    "temperature": "sampling temperature (the sampled distribution; 1 = the model's own)",
    "top_p": "nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)",
    "seed": "random seed (sampling, shuffling, initialisation): the same seed gives the same run",
    "sample_batch_size": "prompts generated together per batch (memory vs speed)",
    "greedy": "also report greedy (temperature 0) accuracy",
    "limit": "evaluate only the first N prompts (0 = all)",
    "backend": "generation backend: auto (vLLM when installed) | vllm | transformers",
    "batch_size": "sequences per batch (SFT: per optimizer step; eval: per generation batch)",
    # models and devices
    "dtype": "weights' dtype: auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16 | float16",
    "device": "auto (cuda when available) | cpu | cuda | cuda:N",
    "teacher_dtype": "the live teacher's dtype: auto | float32 | bfloat16 | float16",
    "mixed_precision": "no | bf16 | fp16 (accelerate autocast over fp32 master weights)",
    # stage one
    "shard_index": "this worker's index in [0, --num-shards): it does the parts p with p % N == index",
    "num_shards": "number of workers sharing the prompt set (any scheduler; the last to finish commits)",
    "topk": "also store the teacher's top-k token ids and log-probs per position (0 = none; top-k/ESR need it)",
    "topk_tail": "the stored top-k's mass outside the k: renormalize (the k renormalised to 1) | tail_bucket "
    "(one extra bucket for the rest)",
    "allow_inconsistent_teacher": "score with a teacher that is not the student's SFT teacher (recorded; "
    "breaks teacher consistency, so only for experiments)",
    "sft_teacher": "declare the student's SFT teacher (a model directory) when the student has no provenance",
    "allow_duplicate": "write a store even when one with the same content is already registered",
    "scoring_backend": "teacher scoring: transformers (chunked, exact) | vllm (prompt_logprobs) | server "
    "(a running vLLM OpenAI server at --teacher-url)",
    "teacher_url": "--scoring-backend server: base URL of the vLLM OpenAI-compatible server of the teacher "
    "(http://HOST:PORT); checked against --teacher's tokenizer and the SFT teacher before any work",
    "teacher_timeout_s": "--scoring-backend server: seconds one request may take before it is retried",
    "teacher_retries": "--scoring-backend server: retries of a failed request (exponential backoff from 1 s, "
    "at most 30 s apart), then the run stops; committed parts are kept and a rerun resumes",
    "compact_logprobs": "store log-probs as 16-bit fixed point (error <= 2.4e-4 nats; about half the size)",
    "compact_topk_scale": "compact top-k: log-probs in steps of 1/scale nats, ids as gaps (0 = off; 32 = 1/64 nats)",
    "max_tokens_per_batch": "teacher scoring: tokens per forward batch (memory bound)",
    "chunk_size": "positions per LM-head chunk (bounds the [chunk, vocab] logits in memory)",
    "overwrite": "replace an existing output directory of another run (otherwise refused)",
    # training
    "lr": "learning rate (AdamW)",
    "warmup_steps": "linear learning-rate warm-up, in optimizer steps",
    "weight_decay": "AdamW weight decay",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient's global norm to this value",
    "steps": "optimizer steps to train",
    "eval_every": "evaluate on --eval-prompts every N steps and at the last (0 = never)",
    "eval_limit": "evaluate on the first N eval prompts only (0 = all)",
    "save_every": "write a resumable checkpoint every N steps (0 = only the final model)",
    "keep_checkpoints": "checkpoints kept on disk (the newest)",
    "log_every": "print the status line every N steps (metrics.jsonl has every step)",
    "report_to": "also log every metrics.jsonl row to experiment trackers (accelerate's): none | tensorboard "
    "| wandb | mlflow | all (every installed one); pip install 'lightning-opd[trackers]'",
    "shuffle_buffer": "rows held for the streaming shuffle (larger mixes better, costs host memory)",
    "shuffle_buffer_mb": "MiB of decoded rows the streaming shuffle holds, over all processes (each holds "
    "about its 1/N share); the shuffle holds at most --shuffle-buffer rows and this many bytes",
    "max_response_tokens": "skip stored rollouts whose response is longer than this (0 = keep all)",
    "sample_reduction": "per-sample token means are summed (paper) | averaged over the batch",
    "prompts_per_step": "online: prompts sampled per optimizer step (times --n rollouts each)",
    # horizons (TOPD / POPD, METHODS §4)
    "horizon_tokens": "--horizon fixed: train on the first N response tokens of every rollout (TOPD)",
    "horizon_fraction": "--horizon fraction: train on this share of the store's horizon T (TOPD, e.g. 0.1)",
    "horizon_h0": "--horizon staircase/linear: the horizon at step 0, in tokens (POPD)",
    "horizon_dh": "--horizon staircase: tokens added to the horizon at each stair (POPD)",
    "horizon_dk": "--horizon staircase: optimizer steps between stairs (POPD)",
    "horizon_ramp_steps": "--horizon linear: steps over which the horizon grows from h0 to T (POPD)",
    # the demo
    "sft_prompts": "demo: SFT prompts the teacher answers",
    "opd_prompts": "demo: OPD prompts the student samples rollouts on",
    "eval_prompts": "demo: held-out evaluation problems",
    "opd_steps": "demo: stage-two optimizer steps",
    "opd_lr": "demo: stage-two learning rate",
    "opd_batch_size": "demo: stored rollouts per stage-two step",
    "rollouts_per_prompt": "demo: rollouts sampled per OPD prompt",
    "horizon": "demo: response horizon T of the rollouts, in tokens",
    "teacher_steps": "demo: training steps of the toy teacher (cached after the first run)",
    "student_seed": "seed of the tiny student's random initialisation",
}

CHOICES = {
    "chat_template": ("auto", "always", "never"),
    "backend": ("auto", "vllm", "transformers"),
    "scoring_backend": ("transformers", "vllm", "server"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "teacher_dtype": ("auto", "float32", "bfloat16", "float16"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "sample_reduction": ("sum", "mean"),
    "objective": ("lightning", "opd_plus", "topk"),
    "divergence": ("reverse_kl", "forward_kl", "jsd", "hellinger", "tv", "alpha"),
    "horizon": ("full", "fixed", "fraction", "staircase", "linear"),
    "verifier": ("auto", "math", "last_number", "addition"),
    "optim": ("adamw", "adamw-8bit"),
    "save_dtype": ("auto", "float32", "bfloat16", "float16"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "topk_tail": ("renormalize", "tail_bucket"),
    "precision": ("bf16", "no"),
    "report_to": ("none", "tensorboard", "wandb", "mlflow", "all"),
}
