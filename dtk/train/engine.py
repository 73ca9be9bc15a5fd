"""THE training loop: one engine for every training command.

A method (``dtk.methods.*``, on ``dtk.train.state.Method``) says what is
specific to its paper — how a batch becomes a loss, what a frozen teacher is,
which sampler the result wants — and the engine owns everything else: model
loading, LoRA or full fine-tuning (``setup``), accelerate (DDP, mixed
precision), gradient accumulation and clipping, the optimiser and LR schedule,
EMA, data order, checkpoints and exact resume (``checkpoint``), preemption, NaN
guards, metrics (``metrics``), a second player's update, validation images and
export (``export``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch

from dtk.errors import BadInput, RunFailure
from dtk.train import checkpoint, export, setup
from dtk.train.config import EXIT_PREEMPTED, TrainConfig
from dtk.train.metrics import Metrics
from dtk.train.state import EMA, Method, PerExample, Preempted, Run, TrainingState

log = logging.getLogger("dtk")


def train(method: Method, config: TrainConfig) -> dict:
    """Run ``method`` under ``config``: the whole training command, with its output locked for its life."""
    from dtk.io import release_out

    try:
        return _train(method, config)
    finally:
        if str(config.out).strip() and Path(config.out).is_dir():
            release_out(config.out)


def _train(method: Method, config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dtk.diffusion.loading import model_configs, native_size, resolve_model
    from dtk.diffusion.schedule import alphas_cumprod
    from dtk.logs import quiet_libraries
    from dtk.seeds import derive_seed

    config.with_defaults(method.training_defaults).check()
    if config.device not in ("auto", "cpu"):
        raise BadInput(f"--device {config.device}: training takes cpu or auto (accelerate's choice, one GPU per "
                       "process); choose GPUs with CUDA_VISIBLE_DEVICES")
    quiet_libraries()
    t_start = time.monotonic()
    if config.mixed_precision == "fp16" and (config.device == "cpu" or not torch.cuda.is_available()):
        # accelerate runs no fp16 autocast on the CPU, and fp16 frozen weights then meet fp32 activations
        raise BadInput("--mixed-precision fp16: needs a CUDA GPU; on the CPU use bf16 or no")
    AcceleratorState._reset_state()  # a process-wide singleton: let a second run in one process choose again
    world = setup.launcher_world_size()
    # a launcher's processes on a machine without CUDA join one process group on the CPU (gloo); accelerate
    # would otherwise start each as a lone process, and N copies would train into one --out
    cpu = config.device == "cpu" or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
    if world > 1 and accelerator.num_processes != world:
        raise BadInput(f"WORLD_SIZE={world}, but accelerate joined {accelerator.num_processes} process(es) "
                       f"({accelerator.distributed_type.name}); refusing to train {world} independent copies into "
                       "one --out (check the launcher's environment, or run one process)")
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # checkpoints and export read whole parameters from the main process: that needs DDP
        raise BadInput(f"accelerate is configured for {accelerator.distributed_type.name}; dtk's checkpoints "
                       "and export support DDP (the multi-GPU default): run `accelerate launch` with a DDP config")
    main = accelerator.is_main_process
    if config.data == "-" and accelerator.num_processes > 1:
        raise BadInput("--data -: stdin cannot be shared by several processes; give a file")
    out = Path(config.out)
    ref = resolve_model(config.model)
    if out.resolve() in ref.dirs:
        raise BadInput(f"--out {out}: is --model {config.model} or one of the models it is built on; "
                       "a run must not overwrite its own base")
    if main:
        from dtk.io import check_out_apart, lock_out, recover_set_aside

        check_out_apart(out, [("--model", d) for d in [ref.path, *ref.dirs]] + [("--data", config.data)])
        lock_out(out, create=False, command=method.name)   # one writer: another run training here is refused
        # what a killed --overwrite run had set aside comes back before any check, unless that run had
        # checkpoints of its own by then (they are newer: the folder is the new run's)
        recover_set_aside(out, progressed=lambda owner: setup.newest_step(out) > owner.get("checkpoint_step", -1))
    accelerator.wait_for_everyone()
    resume_from = setup.prepare_out(out, config, main)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    # the data first where the model's configs tell its size: a corrupt image is found before a 30-50 s load
    configs = model_configs(ref)
    data = (setup.open_data_for(method, config, ref.family, configs[0], native_size(configs[0], configs[1]))
            if configs else None)
    setup.stop_if_terminated("before the model loaded")
    model = setup.load_model(config, ref, accelerator, weight_dtype)
    setup.stop_if_terminated("after the model loaded")
    if data is None:   # a single-file checkpoint: its configs came with its weights
        data = setup.open_data_for(method, config, model.family, dict(model.unet.config), model.default_size)
    if data.kind not in method.data_kinds:
        hint = method.data_hints.get(data.kind, "")
        raise BadInput(f"--data {config.data}: {method.name} needs {' or '.join(method.data_kinds)}, "
                       f"this is {data.kind}" + (f"; {hint}" if hint else ""))
    run = Run(config=config, model=model, accelerator=accelerator, data=data, weight_dtype=weight_dtype,
              abar=alphas_cumprod(model.pipe.scheduler.config).to(accelerator.device))
    method.check_data(data, run)
    unet = model.unet
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(derive_seed(config.seed, "init"))  # LoRA initialisation: the same on every process and run
    named = setup.add_trainable(unet, config)
    run.raw_unet = unet
    method.setup(run)
    optimizer = setup.make_optimizer([p for _, p in named], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, setup.lr_lambda(config.lr_schedule, config.warmup_steps, config.max_steps))
    run.unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMA(named, config.ema_decay) if config.ema_decay else None
    run.ema = ema
    state = TrainingState(run=run, method=method, named=named, optimizer=optimizer, scheduler=scheduler, ema=ema,
                          out=out)
    if resume_from is not None:
        checkpoint.restore(resume_from, state)
        run.step = state.step
        log.info("%s: resumed from %s (step %d)", method.name, resume_from, state.step)
    replacing = setup.clear_out(out, config, main, resume_from, method.name)
    try:
        result = _train_loop(state, t_start, replacing)
    except BaseException:
        if replacing is not None:   # stopped before it had a checkpoint of its own: the replaced result returns
            replacing.restore()
        raise
    if replacing is not None:   # a resume already at --max-steps writes no checkpoint, only its export
        replacing.drop()
    return result


def _train_loop(state: TrainingState, t_start: float, replacing) -> dict:
    """Steps until --max-steps: log, validate and checkpoint on schedule; stop with a checkpoint on SIGTERM;
    export at the end."""
    from dtk.train.data import BatchOrder

    run, method, config = state.run, state.method, state.run.config
    accelerator, main, data = run.accelerator, run.accelerator.is_main_process, run.data
    accelerator.wait_for_everyone()
    order = BatchOrder(len(data), config.seed, config.batch_size, config.grad_accum, accelerator.num_processes)
    metrics = Metrics(state.out, method.name, main, state.step)
    if main:
        n_train = sum(p.numel() for p in state.params)
        from dtk import threads

        threads.report()
        log.info("%s: %s on %s (%d examples), %s %.2fM trainable parameters, global batch %d, %d steps, %d process(es) on %s",
                 method.name, run.model.ref.spec, data.name, len(data),
                 "full UNet" if config.full else f"LoRA rank {config.lora_rank} alpha {config.alpha:g},",
                 n_train / 1e6, order.global_batch, config.max_steps, accelerator.num_processes, accelerator.device)

    last_record: dict = {}
    window_start, window_examples = time.monotonic(), 0
    with _StopSignals() as stop:
        while state.step < config.max_steps:
            grad_norm = _one_step(state, order, metrics)
            if not state.optimizer.step_was_skipped:  # fp16: the grad scaler skipped an overflowing step
                state.scheduler.step()
                if state.ema is not None:
                    state.ema.update()
            state.step += 1
            state.seen += order.global_batch
            window_examples += order.global_batch
            step = run.step = state.step
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.monotonic() - window_start
                extra = {"lr": state.scheduler.get_last_lr()[0], "examples_per_s": window_examples / max(elapsed, 1e-9),
                         "grad_norm": grad_norm}
                last_record = metrics.flush(step, config.max_steps, extra, accelerator)
                window_start, window_examples = time.monotonic(), 0
            if config.validate_every and step % config.validate_every == 0 and main:
                export.validate(state)
            stopping = _any_process(accelerator, stop.requested)
            if step % config.checkpoint_every == 0 or stopping or step == config.max_steps:
                path = checkpoint.save(state)
                if replacing is not None:   # this run has a checkpoint of its own: the replaced result goes
                    replacing.drop()
                if stopping:
                    metrics.close()
                    raise Preempted(f"checkpoint {path} saved at step {step}; rerun with --resume auto to continue "
                                    f"(exit {EXIT_PREEMPTED})")
    metrics.close()
    result = {}
    if main:
        result = export.export_model(state, time.monotonic() - t_start, last_record)
    accelerator.wait_for_everyone()
    return result


def _one_step(state: TrainingState, order, metrics) -> float:
    """One optimizer step over grad_accum micro-batches; NaN/Inf stops the run before any update.
    Returns the gradient norm (before clipping)."""
    from dtk.seeds import derive_seed
    from dtk.train.data import collate

    run, method, optimizer, params, step, data = (state.run, state.method, state.optimizer, state.params,
                                                  state.step, state.run.data)
    accelerator, config = run.accelerator, run.config
    rank = accelerator.process_index
    for micro in range(config.grad_accum):
        positions = order.positions(step, micro, rank)
        batch = collate([data[i] for i in order.indices(step, micro, rank)])
        run.rng = PerExample([derive_seed(config.seed, f"example-{p}") for p in positions], accelerator.device)
        sync = micro == config.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.unet):
            with accelerator.autocast():
                loss, logs = method.loss(batch, run)
            if _any_process(accelerator, not bool(torch.isfinite(loss.detach()).all())):
                raise RunFailure(_nan_message("loss", loss, step + 1, run.config))
            accelerator.backward(loss / config.grad_accum)
        metrics.add({"loss": float(loss.detach()), **logs})
    # the norm is taken even without clipping (max norm inf): a NaN gradient must never reach the weights
    grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm) and config.mixed_precision != "fp16":  # fp16: the scaler skips the step
        raise RunFailure(_nan_message("gradient norm", grad_norm, step + 1, run.config))
    try:
        optimizer.step()
    except RuntimeError as e:   # the update itself overflowed (e.g. --lr 1e38)
        if "overflow" not in str(e):
            raise
        raise RunFailure(_nan_message(f"the update at --lr {config.lr:g}", "out of float range", step + 1,
                                      run.config, "stopped before saving the weights")) from None
    optimizer.zero_grad(set_to_none=True)
    # a finite loss can still leave weights at 1e30 (a huge --lr): no checkpoint may hold them
    norms = torch._foreach_norm([p.detach() for p in params])
    if _any_process(accelerator, not bool(torch.isfinite(torch.stack(norms)).all())):
        raise RunFailure(_nan_message("the trained weights' norm", "not finite", step + 1, run.config,
                                      "stopped before saving them (a smaller --lr?)"))
    if method.second_player is not None:
        _second_player_step(run, method.second_player, metrics, step)
    return grad_norm


def _second_player_step(run, player, metrics, step) -> None:
    """The second player's update over every micro-batch the trained model saw in this step, with the same
    accumulation, autocast and NaN guard as the main update."""
    items = player.take()
    if not items:
        return
    accelerator, total = run.accelerator, 0.0
    for i, item in enumerate(items):
        last = i == len(items) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(player.module):
            with accelerator.autocast():
                loss = player.loss(item)
            if _any_process(accelerator, not bool(torch.isfinite(loss.detach()).all())):
                raise RunFailure(_nan_message(f"the second player's {player.log_name}", loss, step + 1, run.config))
            accelerator.backward(loss / len(items))
        total += float(loss.detach())
    params = [p for p in player.module.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, player.max_grad_norm))
    if not math.isfinite(norm) and run.config.mixed_precision != "fp16":   # fp16: the scaler skips the step
        raise RunFailure(_nan_message("the second player's gradient norm", norm, step + 1, run.config))
    player.optimizer.step()
    player.optimizer.zero_grad(set_to_none=True)
    metrics.add({player.log_name: total / len(items)})


def _nan_message(what: str, value, step: int, config: TrainConfig,
                 done: str = "stopped before updating the weights") -> str:
    from dtk.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(Path(config.out))
    kept = (f"the last good checkpoint is {found[-1]} (continue with --resume auto, e.g. with a lower --lr)"
            if found else "no checkpoint was written yet")
    value = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else value
    return f"{what} is {value} at step {step}; {done}; {kept}"


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class _StopSignals:
    """SIGTERM / SIGUSR1 (Slurm preemption) only set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        from dtk import signals

        self.requested = bool(signals.received)   # one that came while the model was loading
        signals.received.clear()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("train: received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
