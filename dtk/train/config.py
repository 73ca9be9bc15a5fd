"""The settings every training command shares (one name for one idea, see docs/conventions.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dtk.errors import BadInput, check_number

# peft target modules of a diffusers UNet: attention projections, the
# transformer blocks' in/out projections and feed-forward, ResNet convolutions
# and the time-embedding projections (the set PCM trains; docs/methods.md).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2")
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISION = ("no", "fp16", "bf16")
EXPORT_FORMATS = ("diffusers", "kohya")

# Exit status of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint:
# EX_TEMPFAIL of sysexits.h, "try again later" — a requeued job resumes.
EXIT_PREEMPTED = 75

# settings a method may choose (``Method.training_defaults``, ``dtk.methods.defaults``); these where none does
ENGINE_DEFAULTS = {"lr": 1e-4, "max_steps": 1000, "batch_size": 4, "lora_rank": 16, "ema_decay": 0.0}


@dataclass
class TrainConfig:
    out: str
    model: str | None = None
    data: str | None = None
    # None: the method's choice (``Method.training_defaults``), else ENGINE_DEFAULTS
    max_steps: int | None = None
    batch_size: int | None = None       # per process and micro-step
    grad_accum: int = 1
    lr: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0          # 0 = no clipping
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None      # 0 = no EMA
    full: bool = False                  # full fine-tuning instead of LoRA
    lora_rank: int | None = None
    lora_alpha: float | None = None     # default: = rank (scale 1)
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None           # None, "auto" or a checkpoint dir
    validate_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    export_format: str = "diffusers"
    resolution: int | None = None
    allow_missing_captions: bool = False
    seed: int = 0
    log_every: int = 10
    device: str = "auto"
    overwrite: bool = False
    model_config: str | None = None
    extra: dict = field(default_factory=dict)   # the method's own options, recorded in dtk.json

    def with_defaults(self, chosen: dict) -> "TrainConfig":
        """Settings left unset (None) take ``chosen`` (a method's training defaults), else the engine's."""
        for name, value in {**ENGINE_DEFAULTS, **chosen}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def check(self) -> None:
        """Every value in range (a config file's values included, which click does not check); unset settings
        take the engine's defaults."""
        self.with_defaults({})
        if not str(self.out).strip():
            raise BadInput("--out '': empty (an unset shell variable?); name the output directory")
        if isinstance(self.lora_targets, str):   # a config file may give a comma list or a TOML array
            from dtk.parsing import comma_values

            self.lora_targets = tuple(comma_values(self.lora_targets, str))
        if not (self.lora_targets and all(isinstance(t, str) and t for t in self.lora_targets)):
            raise BadInput(f"--lora-targets {self.lora_targets}: want module names, e.g. to_q,to_k,to_v,to_out.0")
        self.lora_targets = tuple(self.lora_targets)
        for name, value, low in (("--max-steps", self.max_steps, 1), ("--batch-size", self.batch_size, 1),
                                 ("--grad-accum", self.grad_accum, 1), ("--lora-rank", self.lora_rank, 1),
                                 ("--checkpoint-every", self.checkpoint_every, 1),
                                 ("--keep-checkpoints", self.keep_checkpoints, 1), ("--log-every", self.log_every, 1),
                                 ("--warmup-steps", self.warmup_steps, 0), ("--validate-every", self.validate_every, 0),
                                 ("--resolution", self.resolution if self.resolution is not None else 8, 8)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BadInput(f"{name} {value}: must be a whole number, at least {low}")
        for name, value in (("--lr", self.lr), ("--weight-decay", self.weight_decay),
                            ("--max-grad-norm", self.max_grad_norm), ("--ema-decay", self.ema_decay),
                            ("--lora-alpha", self.lora_alpha)):
            check_number(name, value)
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise BadInput(f"--lora-alpha {self.lora_alpha}: must be positive")
        if self.lr <= 0:
            raise BadInput(f"--lr {self.lr}: must be positive")
        if self.weight_decay < 0:
            raise BadInput(f"--weight-decay {self.weight_decay}: must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise BadInput(f"--ema-decay {self.ema_decay}: must be in [0, 1)")
        if self.max_grad_norm < 0:
            raise BadInput(f"--max-grad-norm {self.max_grad_norm}: must be >= 0 (0 = no clipping)")
        for name, value, allowed in (("--lr-schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("--optimizer", self.optimizer, OPTIMIZERS),
                                     ("--mixed-precision", self.mixed_precision, MIXED_PRECISION),
                                     ("--export-format", self.export_format, EXPORT_FORMATS)):
            if value not in allowed:
                raise BadInput(f"{name} {value}: unknown (choose from {', '.join(allowed)})")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)
