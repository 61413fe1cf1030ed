"""Train a DiT, SiT or MAR on pre-extracted latent shards (``softvq pretokenize``).

The settings and the paper's recipes (supp. C.2) are :class:`~softvq.generation.train_config.GeneratorTrainConfig`;
the checks of the latent set and the tokenizer before a run are in :mod:`softvq.generation.run_inputs`, and the
run folder's bookkeeping across reruns in :mod:`softvq.generation.run_folder`. This module is the loop.

It runs under ``accelerate`` (CPU, one or many GPUs, optional bf16), keeps an EMA
(``softvq.training.ema``), writes atomic resumable checkpoints every ``checkpoint_every`` steps
(``softvq.training.checkpointing``: model, EMA, optimizer, step and RNG states; batches are a
function of (seed, step, rank), so a resumed run continues exactly), shows a progress bar, and
appends one JSON line per ``log_every`` steps to ``log.jsonl``: the mean loss terms of those steps
over every process, as DiT's release logs them. Ctrl-C or SIGTERM finishes the step, logs the steps
since the last line and writes a checkpoint before stopping (``softvq.training.stopping``). A step with a
non-finite loss or gradient is skipped; after ``max_nonfinite`` of them the run stops with
:class:`~softvq.training.stopping.NonFiniteLossError`, and non-finite weights are never saved. At
the end the EMA weights are exported to ``RUN/generator`` for ``softvq generate``, and at each
step of ``export_at`` to ``RUN/generator-step-NNNNNNNN`` (supp. Tab. 9 / arXiv Tab. 8: gFID and IS
at 400K, 1M, 2M, 3M and 4M steps of one run), which ``keep_checkpoints`` never deletes.

The command line is ``softvq train-generator`` (:mod:`softvq.cli.train_generator`, one flag per
field of :class:`GeneratorTrainConfig`); from Python:

    from softvq.generation.train import GeneratorTrainConfig, train_generator
    train_generator(GeneratorTrainConfig(latents="runs/latents", out="runs/sit-tiny", objective="sit",
                                         width=128, depth=4, heads=4, steps=300, batch_size=32))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from softvq.atomic import write_json
from softvq.checkpoint.pretrained import load_strict
from softvq.eval_mode import with_gradients
from softvq.generation.checkpoint import (GENERATOR_EXPORT, MODEL_CONFIG_KEY, Generator, GeneratorMeta, milestone_export,
                                         run_meta, save_generator)
from softvq.generation.latents import LatentSet, latent_set_sha1, load_latents
from softvq.generation.models import build_generator
from softvq.generation.objective import GenerationObjective, GenerationObjectiveConfig
from softvq.generation.run_folder import (check_out_folder, check_same_run, exported_step, milestone_warnings,
                                          nonfinite_stop, record_continuation, refuse_nonfinite, saved_settings,
                                          tidy_run)
from softvq.generation.run_inputs import check_latent_set, other_tokenizer, tokenizer_spec
from softvq.generation.train_config import GeneratorTrainConfig, build_model_config, config_from_record, recorded_train
from softvq.randomness import derived_seed
from softvq.training.ema import EMA
from softvq.training.logging import LogWindow, RunLogger
from softvq.training.optim import param_groups
from softvq.training.schedule import lr_factor
from softvq.training.stopping import NonFiniteLossError, StopRequests, on_any_process

# config_from_record and recorded_train lived here before the settings had a module of their own
__all__ = ["GeneratorTrainConfig", "train_generator", "learning_rate", "parameter_groups", "config_from_record",
           "recorded_train"]

_LOG = logging.getLogger(__name__)  # the CLI prints its warnings as "softvq: warning: ..."


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every matrix and embedding, not on biases and norm scales (1-D tensors),
    as MAE / MAR do; with ``weight_decay`` 0 (DiT / SiT) this is plain AdamW."""
    return param_groups(model.named_parameters(), weight_decay, no_decay_names=())


def learning_rate(cfg: GeneratorTrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 gets lr/warmup), then constant."""
    assert cfg.lr is not None  # a resolved config
    return cfg.lr * lr_factor(step, total_steps=cfg.steps or 1, warmup_steps=cfg.warmup_steps or 0, kind="constant")


def _batch_indices(count: int, batch: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """The batch of a (seed, step, rank): independent of how the run was interrupted, and of the
    Python version (:func:`softvq.randomness.derived_seed`)."""
    g = torch.Generator().manual_seed(derived_seed(seed, step, rank))
    return torch.randint(0, count, (batch,), generator=g)


def run_header(cfg: GeneratorTrainConfig, model: torch.nn.Module, model_cfg: Any, data: LatentSet, acc: Any,
               start: int) -> str:
    """The lines a run starts with: what is trained, on what, where and for how long (as ``softvq
    train`` says it), and for a recipe-sized model on a CPU, what a laptop run should take instead."""
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(map(str, data.latents.shape[1:]))
    lines = [f"run {cfg.out}: {cfg.objective.upper()}, width {model_cfg.width}, depth {model_cfg.depth}, "
             f"{model_cfg.heads} heads, {params / 1e6:.2f} M parameters; {len(data.latents)} latents of {shape}, "
             f"{len(data.classes)} class(es)",
             f"{acc.num_processes} process(es) on {acc.device.type} (mixed precision {cfg.mixed_precision}), "
             f"batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.steps} steps from step {start}"]
    if acc.device.type == "cpu" and params > 100e6 and start == 0:  # the recipes' XL / H: minutes a step
        smallest = "B" if cfg.objective == "mar" else "S"
        lines.append(f"note: {params / 1e6:.0f} M parameters is a GPU recipe; on a CPU try --size {smallest}, or "
                     f"--width 128 --depth 4 --heads 4 --steps 600 (README, Generation)")
    return "\n".join(lines)


@with_gradients
def train_generator(cfg: GeneratorTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns {"first_loss", "last_loss", "steps", "export", "stopped"}
    (and ``"already_finished": True``, with no losses, when the run had already reached ``steps``).
    The losses are of the first and last step this call trained: after a resume, ``first_loss`` is
    the resumed step's, not step 1's (the run's whole curve is in its ``log.jsonl``).

    The first Ctrl-C or SIGTERM finishes the step, writes a checkpoint and returns with
    ``stopped`` True, ``steps`` the step reached and no export; calling again continues. It seeds
    torch's global random generator from ``seed`` (so that a run repeats exactly), and gives the
    global generators back their states when it returns.
    """
    from softvq.run_lock import lock_run_folder
    from softvq.training.checkpointing import capture_rng, restore_rng
    from softvq.training.accelerator import new_accelerator, said_by_main_process, same_on_every_process

    if not isinstance(cfg, GeneratorTrainConfig):
        raise TypeError(f"cfg must be a GeneratorTrainConfig, got {type(cfg).__name__} (GeneratorTrainConfig(**fields) "
                        f"makes one of a dict)")
    check_out_folder(Path(cfg.validate().out))  # before anything is read or written
    data = load_latents(cfg.latents)
    check_latent_set(data, cfg.latents)
    if cfg.tokenizer is not None:
        spec = tokenizer_spec(cfg.tokenizer, tuple(data.latents.shape[1:]))
        cfg = dataclasses.replace(cfg, tokenizer=spec)
        other = other_tokenizer(spec, data.meta)
        if other is not None:  # generate would say it only after the whole run
            _LOG.warning(f"--tokenizer {other}: generate would decode this run's samples with other weights than "
                         f"the latents were made with; pass the tokenizer pretokenize used, or leave --tokenizer out")
    cfg = cfg.resolved(count=data.latents.shape[0])  # epochs -> steps
    length = f"--epochs {cfg.epochs:g} ({cfg.steps} steps)" if cfg.epochs is not None else f"--steps {cfg.steps}"
    run = Path(cfg.out)
    # without CUDA a launched run must ask for CPU processes, or accelerate gives each one a run of its own
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if on_cpu and cfg.mixed_precision == "fp16":  # Accelerate has no fp16 autocast on a CPU: it trained in fp32
        raise ValueError("--mixed-precision fp16 needs a GPU (on a CPU it would train in float32 and record fp16); "
                         "pass --mixed-precision bf16 or no")
    acc = new_accelerator(mixed_precision=cfg.mixed_precision, cpu=on_cpu)
    # first: the refusals after it assume every process meets them alike
    same_on_every_process(dataclasses.asdict(cfg), acc.num_processes)
    if cfg.batch_size % acc.num_processes:  # each process takes batch / n: a remainder would be dropped unsaid
        raise said_by_main_process(ValueError(f"--batch-size {cfg.batch_size} must split evenly into "
                                              f"{acc.num_processes} processes; pass a multiple of {acc.num_processes}"),
                                   acc.is_main_process)  # every process finds it: the CLI says it once
    lock = lock_run_folder(run, acc)  # one process per run folder, for the run's whole life (main only)
    caller_rng = capture_rng()  # the run seeds the global generators; the caller gets its states back
    try:
        return _train(cfg, data, run, acc, length, progress)
    finally:
        lock.release()
        restore_rng(caller_rng)


def _train(cfg: GeneratorTrainConfig, data: LatentSet, run: Path, acc, length: str, progress: bool) -> dict[str, Any]:
    """The run itself, in the locked ``run`` folder (:func:`train_generator`)."""
    from tqdm.auto import tqdm

    from softvq.training.accelerator import gather_objects, mean_over_processes
    from softvq.training.checkpointing import capture_rng, save_checkpoint

    torch.manual_seed(cfg.seed + acc.process_index)
    # resolved with the latent set's count: the recipe's fields and the lengths in steps are set
    assert (cfg.steps is not None and cfg.warmup_steps is not None and cfg.lr is not None
            and cfg.weight_decay is not None and cfg.adam_beta2 is not None and cfg.path is not None
            and cfg.schedule is not None)

    model_cfg = build_model_config(cfg, data.latents.shape[1], data.latents.shape[2], len(data.classes))
    model = build_generator(model_cfg)
    objective = GenerationObjective(
        GenerationObjectiveConfig(cfg.objective, cfg.path, cfg.schedule, cfg.diffusion_steps, cfg.vlb_weight),
        sigma_learned=getattr(model_cfg, "sigma_learned", True))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, cfg.adam_beta2))
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)

    # what generate needs besides the weights, in every checkpoint and export
    meta = run_meta(dataclasses.asdict(cfg), data.meta)
    # the run's settings as config.json and every checkpoint record them, and a resume checks them
    train_record, latents_sha1 = recorded_train(cfg), latent_set_sha1(data.meta)
    resumed = _resume_or_begin(cfg, run, acc, model, model_cfg, optimizer, ema, meta, train_record, latents_sha1,
                               length)
    if isinstance(resumed, dict):  # a finished run, left as it is
        return resumed
    start, nonfinite = resumed

    if acc.is_main_process:
        for note in milestone_warnings(cfg, run, start):
            _LOG.warning(note)
        print(run_header(cfg, model, model_cfg, data, acc, start), file=sys.stderr)
    model, optimizer = acc.prepare(model, optimizer)
    latents = (data.latents - data.mean) / data.std  # (z - mean) / std, supp. C.2 / the release
    labels = data.labels
    per_process = cfg.batch_size // acc.num_processes
    log = RunLogger(run, enabled=acc.is_main_process, tensorboard=False)  # log.jsonl, as the tokenizer trainer's
    first_loss, ran = math.nan, False  # ran: whether this call trained a step
    last_loss: float | torch.Tensor = math.nan  # the last step's loss, read from the device at the end
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.objective}",
               disable=not (progress and acc.is_main_process))
    window = LogWindow()

    def log_window(step: int, lr: float) -> None:
        """One log record: the means of the steps since the last one over every process
        (collective), with the lr and EMA decay of ``step`` and the time those steps took (the
        steps' own: exports and checkpoints between them left out)."""
        means = mean_over_processes(window.means(), acc.num_processes, acc.device)
        # the steps since the last line: fewer than log_every at the end, after a resume and at a stop
        record = {**means, "lr": lr, "ema_decay": ema.current_decay(),
                  "sec_per_step": window.seconds / window.steps, "nonfinite_steps": nonfinite}
        window.clear()
        if "loss" in record:  # a window of skipped steps only has none
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        log.scalars(step, record, echo=False)  # non-finite values as text: strict JSON has no NaN

    model.train()
    say = (lambda text: print(text, file=sys.stderr)) if acc.is_main_process else (lambda text: None)
    stop = StopRequests(lambda name: say(f"received {name}: stopping after this step with a checkpoint "
                                         f"(Ctrl-C again to stop at once)")).install()
    stopped_at = None
    try:
        for step in bar:
            begun = time.perf_counter()
            idx = _batch_indices(len(latents), per_process, cfg.seed, step, acc.process_index)
            x, y = latents[idx], labels[idx]
            if acc.device.type == "cuda":  # pinned, so the copy need not wait for the steps still queued
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with acc.autocast():
                terms = objective(model, x, y)
            acc.backward(terms["loss"])
            # A non-finite loss gives non-finite gradients, so their norm (computed when clipping anyway)
            # tells a step to skip. Under fp16 the grad scaler's step skips overflowing gradients itself
            # (and lowers its scale): overflow is routine there, so only the loss counts.
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            finite = torch.isfinite(terms["loss"].detach())
            if cfg.mixed_precision != "fp16":
                finite = finite & torch.isfinite(grad_norm)
            # Reading it waits for the device once a step, as the tokenizer trainer does. With several
            # processes they agree on it (a loss may be non-finite on one alone) and on a stop
            # request, so that every process skips and stops at the same step.
            bad = not bool(finite)
            stopping = stop.requested
            if acc.num_processes > 1:
                bad, stopping = on_any_process([bad, stopping], acc.device)
            if not bad or cfg.mixed_precision == "fp16":
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if bad:
                nonfinite += 1
                window.add({"nonfinite": 1.0}, seconds=time.perf_counter() - begun)  # no loss in the mean
                say(f"step {done}: non-finite loss or gradient, step skipped ({nonfinite}/{cfg.max_nonfinite})")
                if nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteLossError(nonfinite_stop(cfg, run, done, nonfinite))
            else:
                ema.update(acc.unwrap_model(model))
                window.add({k: v.detach() for k, v in terms.items()}, seconds=time.perf_counter() - begun)
            last_loss, ran = terms["loss"].detach(), True
            if step == start:
                first_loss = float(last_loss)
            if done % cfg.log_every == 0 or done == cfg.steps:
                log_window(done, lr)
            if done in cfg.export_at:  # before the checkpoint: a resume past it has it
                refuse_nonfinite(ema.shadow, cfg, run, done)  # on every process: all stop together
                if acc.is_main_process:
                    unwrapped = acc.unwrap_model(model)
                    with ema.swapped_into(unwrapped):
                        save_generator(unwrapped, meta, milestone_export(run, done), step=done)
            if stopping and done < cfg.steps and window.steps:
                # the steps since the last line, before the checkpoint that a resumed run starts after
                log_window(done, lr)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                rngs = gather_objects(capture_rng(), acc.num_processes)  # each process's own stream
                unwrapped = acc.unwrap_model(model)
                refuse_nonfinite([*unwrapped.parameters(), *ema.shadow], cfg, run, done)
                if acc.is_main_process:
                    save_checkpoint({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                                     "ema": ema.state_dict(), "step": done, "rng": rngs, "meta": meta.to_dict(),
                                     "nonfinite_steps": nonfinite, MODEL_CONFIG_KEY: model_cfg.to_dict(),
                                     # loads, and resumes with its settings checked, without config.json
                                     "train": train_record, "latents_sha1": latents_sha1},
                                    run, done, keep=cfg.keep_checkpoints)
            if stopping and done < cfg.steps:
                stopped_at = done
                break
    finally:
        stop.restore()
        log.close()
    if stopped_at is not None:
        bar.close()
        say(f"stopped at step {stopped_at} with a checkpoint; run the same command again to continue")
        return {"first_loss": _trained(first_loss, ran), "last_loss": _trained(last_loss, ran), "steps": stopped_at,
                "export": None, "stopped": True}
    bar.close()
    acc.wait_for_everyone()
    export = run / GENERATOR_EXPORT
    refuse_nonfinite(ema.shadow, cfg, run, cfg.steps)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        with ema.swapped_into(unwrapped):
            save_generator(unwrapped, meta, export, step=cfg.steps)
    return {"first_loss": _trained(first_loss, ran), "last_loss": _trained(last_loss, ran), "steps": cfg.steps,
            "export": str(export), "stopped": False}


def _resume_or_begin(cfg: GeneratorTrainConfig, run: Path, acc, model: Generator, model_cfg: Any,
                     optimizer: torch.optim.Optimizer, ema: EMA, meta: GeneratorMeta, train_record: dict[str, Any],
                     latents_sha1: str, length: str) -> tuple[int, int] | dict[str, Any]:
    """Load the run's last checkpoint into ``model``, ``optimizer`` and ``ema`` (its settings checked
    against these) and return (step, non-finite steps so far); or begin the run folder at step 0;
    or, for a run already finished and exported, the result that says so."""
    from softvq.training.checkpointing import latest_checkpoint, load_checkpoint
    from softvq.training.resuming import restore_or_reseed_rng

    assert cfg.steps is not None and cfg.warmup_steps is not None and cfg.lr is not None  # resolved by _train's caller
    start = nonfinite = 0
    note: str | None  # printed for the user: warnings, and the random generators' state on a resume
    latest = latest_checkpoint(run)
    if latest is not None:
        state = load_checkpoint(latest)
        saved = saved_settings(run, state, latest)
        for record in saved:
            check_same_run(run, record, model_cfg.to_dict(), train_record, latents_sha1)
        load_strict(model, state["model"], str(latest))  # a mismatch left is named, not torch's traceback
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = int(state["step"])
        nonfinite = int(state.get("nonfinite_steps", 0))  # counted over the run, as the tokenizer trainer does
        if start > cfg.steps:
            raise ValueError(f"{run} is already at step {start}; {length} would train nothing "
                             f"(pass --steps above {start}, or more --epochs, to continue it)")
        if acc.is_main_process:
            tidy_run(run, start)
            record_continuation(run, cfg, start, saved[0])
            if start in cfg.export_at and not milestone_export(run, start).is_dir():
                # given only now: the EMA of this step is the one just loaded, and the loop will not pass it
                with ema.swapped_into(model):
                    save_generator(model, meta, milestone_export(run, start), step=start)
                print(f"exported the EMA generator of step {start} ({latest.name}) to {milestone_export(run, start)}",
                      file=sys.stderr)
        if start == cfg.steps and exported_step(run / GENERATOR_EXPORT) in (start, "unknown"):  # finished: leave it
            if acc.is_main_process:
                for note in milestone_warnings(cfg, run, start):  # --export-at given only now
                    _LOG.warning(note)
                print(f"{run} already finished at step {start}; pass --steps above {start} (or more --epochs) "
                      f"to train it further", file=sys.stderr)
            return {"first_loss": None, "last_loss": None, "steps": start, "export": str(run / GENERATOR_EXPORT),
                    "stopped": False, "already_finished": True}
        note = restore_or_reseed_rng(state["rng"], rank=acc.process_index, world=acc.num_processes, seed=cfg.seed,
                                     step=start)
        if note is not None and acc.is_main_process:
            print(note, file=sys.stderr)
        if acc.is_main_process and start == cfg.steps:
            old = exported_step(run / GENERATOR_EXPORT)
            print(f"{run} trained to step {start}; its export is {'missing' if old is None else f'from step {old}'}"
                  f": exporting again", file=sys.stderr)
        elif acc.is_main_process:
            print(f"resuming {run} from step {start} ({latest.name})", file=sys.stderr)
    elif acc.is_main_process:
        if cfg.warmup_steps >= cfg.steps:  # e.g. MAR's 100-epoch recipe warm-up under a short --steps
            warm = (f"--warmup-epochs {cfg.warmup_epochs:g}" if cfg.warmup_epochs is not None
                    else f"--warmup-steps {cfg.warmup_steps}")
            _LOG.warning(f"the learning-rate warm-up ({warm}: {cfg.warmup_steps} steps) is not shorter than the run "
                         f"({length}), so the lr never reaches its peak {cfg.lr:g}; pass a shorter --warmup-steps "
                         f"or --warmup-epochs")
        tidy_run(run, 0)  # a run killed before its first checkpoint starts again
        run.mkdir(parents=True, exist_ok=True)
        resolved = {"train": train_record, "model": model_cfg.to_dict(), "latents_sha1": latents_sha1}
        write_json(run / "config.json", resolved)

    return start, nonfinite


def _trained(loss: float | torch.Tensor, ran: bool) -> float | None:
    """A loss of this call's steps (NaN where that step was not finite), or None where it ran no
    step (a finished run exported again): its NaN placeholder printed as JSON strict parsers refuse."""
    return float(loss) if ran else None
