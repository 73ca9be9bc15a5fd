"""Each method's defaults, in one place that imports nothing heavy.

The methods' constructors, the engine (for a Python caller of ``dtk.train.engine.train``) and the CLI's
``--help`` all read them here, so a shell user and a Python caller get the same run. ``TRAINING`` holds the
engine settings a method chooses (the papers' learning rates, batch sizes, LoRA ranks); the rest are the
settings of methods whose defaults depend on the mode they run in.
"""

TRAINING = {
    "train-reflow": {"lr": 1e-4, "max_steps": 2000, "batch_size": 8, "lora_rank": 16},
    "distill-pcm": {"lr": 1e-4, "max_steps": 2000, "batch_size": 8, "lora_rank": 64},
    "tune-sct": {"lr": 1e-4, "max_steps": 4000, "batch_size": 32, "lora_rank": 16},
    "dpo": {"lr": 1e-5, "max_steps": 2000, "batch_size": 4, "lora_rank": 8},
    "train-npo": {"lr": 5e-6, "max_steps": 2000, "batch_size": 4, "lora_rank": 8},
    # Self-NPO: its teacher is the EMA of the student (the public code's 0.999), at a lower learning rate
    "train-npo --self": {"lr": 1e-6, "max_steps": 2000, "batch_size": 4, "lora_rank": 8, "ema_decay": 0.999},
}

# Diffusion-DPO: β = 5000 (the paper: 2000 SD1.5, 5000 SDXL; its launch scripts used 5000 for both); 20% empty
# captions keep CFG's unconditional branch
DPO = {"beta": 5000.0, "empty_prompt_prob": 0.2}
# Diffusion-NPO from pairs: β = 500 for SD1.5 (2000 for SDXL); the result serves the empty-prompt branch
NPO_FROM_PAIRS = {"beta": 500.0, "empty_prompt_prob": 0.2}
# Self-NPO keeps every caption (as its public code)
SELF_NPO = {"empty_prompt_prob": 0.0, "teacher_steps": 5, "huber_c": 0.001, "negative": "student"}
