"""The tokenizer trainer: one code path for one CPU, one GPU, or many processes / nodes.

Distribution goes through Hugging Face Accelerate: launched plainly it trains in one process;
under ``accelerate launch`` or ``torchrun`` the tokenizer is wrapped in DDP (or FSDP with
``run.distributed=fsdp``) and every process takes its share of each global batch
(``softvq.data.sampler``). The small trainable parts of the objective (alignment projector,
discriminator heads) are not wrapped; their gradients are averaged over processes explicitly.

One optimizer step (paper supplementary C.1):

1. for each of ``grad_accum`` micro-batches: tokenizer forward under bf16 autocast on GPU, the
   generator loss of Eq. 7 (discriminator frozen for it), backward; then the discriminator loss
   on the detached reconstruction, backward (once the objective switches the GAN on);
2. if any process saw a non-finite loss or gradient norm, nothing is updated and the step is
   counted; after ``run.max_nonfinite`` such steps the run stops with an explanation;
3. gradient clipping, optimizer steps (AdamW by default, ``optim.name``) for tokenizer (+ projector)
   and discriminator, the warm-up + cosine schedules, the EMA update.

Checkpoints hold everything needed to continue exactly (``softvq.training.checkpointing``);
SIGINT / SIGTERM finish the current step, write a checkpoint and stop; the EMA weights are
exported with ``Tokenizer.save_pretrained`` into ``run_dir/export`` at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
import yaml
from torch import nn
from tqdm import tqdm

from softvq.atomic import atomic_write, write_json
from softvq.checkpoint.pretrained import EXPORT_NAME, RUN_CONFIG_NAME, CheckpointError, is_tokenizer_run, load_strict
from softvq.checkpoint.specs import OFFICIAL_PREFIX, official_target
from softvq.data.images import why_unreadable
from softvq.data.loader import Batch, HeldOut, build_data
from softvq.data.workers import worker_batches
from softvq.eval_mode import with_gradients
from softvq.messages import first_few
from softvq.randomness import seed_everything
from softvq.resume import changed_settings
from softvq.run_lock import lock_run_folder
from softvq.tokenizer import Tokenizer
from softvq.training import checkpointing as ckpt
from softvq.training.accelerator import (decided_by_main_process, gather_objects, make_accelerator, mean_over_processes,
                                        same_on_every_process)
from softvq.training.config import TrainConfig, anchor_path_keys, anchor_paths, save_config
from softvq.training.ema import EMA
from softvq.training.heldout import HeldOutMonitor
from softvq.training.logging import HELDOUT_PREFIX, LogWindow, RunLogger, drop_records_after, format_value
from softvq.training.optim import build_optimizer
from softvq.training.resuming import restore_or_reseed_rng
from softvq.training.run_folder import check_run_folder
from softvq.training.schedule import build_scheduler, load_training_state, scaled_lr
from softvq.training.stopping import NonFiniteLossError, StopRequests, all_finite, on_any_process

if TYPE_CHECKING:
    from softvq.losses.objective import TokenizerObjective


@dataclass
class TrainResult:
    """How a run ended: ``finished``, ``time limit``, ``interrupted`` or ``already finished`` (a finished
    run resumed again, its outputs kept); where its outputs are."""

    run_dir: Path
    step: int
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    export: Path | None = None


def default_objective(cfg: TrainConfig, tokenizer: Tokenizer) -> TokenizerObjective:
    """The paper's objective (:class:`~softvq.losses.objective.TokenizerObjective`) with the config's
    weights; a ``Trainer``'s ``objective_factory`` replaces it."""
    from softvq.losses.objective import TokenizerObjective

    return TokenizerObjective(cfg.objective, tokenizer)


class Trainer:
    """Train a :class:`~softvq.tokenizer.Tokenizer` as ``config`` says, writing into ``run_dir``.

    Args:
        config: the resolved :class:`TrainConfig`.
        run_dir: output folder (config, logs, checkpoints, grids, export, metrics).
        resume: ``None`` to start fresh, ``True`` for the newest checkpoint in ``run_dir``, or a
            checkpoint path.
        objective_factory: ``(config, tokenizer) -> objective`` (default: the paper's
            ``TokenizerObjective``); lets tests substitute a cheaper loss.

    Constructing one seeds Python's, NumPy's and torch's global random generators from
    ``schedule.seed`` (so that a run repeats exactly; ``fit()`` or ``close()`` gives them back the
    states they had before, so a notebook's later draws do not depend on training), creates
    ``run_dir`` with ``config.yaml`` and opens its log; ``fit()`` runs once and closes the log. A new
    run takes a new or empty folder: one holding another run's log, checkpoints or outputs needs
    ``resume``, and one holding other files is refused.

    In your own multi-process script, call ``torch.distributed.destroy_process_group()`` once
    training is done (``softvq train`` does): a gloo group left alive at exit can abort the
    finished process.
    """

    @with_gradients  # its networks built inside a caller's inference_mode() would be inference tensors
    def __init__(self, config: TrainConfig, run_dir: str | Path, *, resume: bool | str | Path | None = None,
                 objective_factory: Callable[[TrainConfig, Tokenizer], TokenizerObjective] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}; make one with "
                            f"softvq.training.config.load_config(name, overrides) or config_from_dict(tree)")
        # relative paths made absolute: config.yaml must name the same files from any folder
        self.cfg = anchor_paths(config.validate())
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"run_dir {self.run_dir} is a file; a run is a folder: choose another")
        self.accelerator = make_accelerator(config)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        # first: the refusals after it assume every process meets them alike
        same_on_every_process(config.to_dict(), self.world,
                              ignore=("data.workers", "data.prefetch_factor", "run.progress"))
        self.is_main = acc.is_main_process
        self.device = acc.device
        sched = config.schedule
        per_micro = sched.batch_size / (self.world * sched.grad_accum)
        if per_micro != int(per_micro) or per_micro < 1:
            raise ValueError(
                f"schedule.batch_size {sched.batch_size} must split evenly into {self.world} processes x "
                f"{sched.grad_accum} accumulation steps"
            )
        self.micro_batch = int(per_micro)

        # Held until fit() ends (or set-up fails): a second run, or a --resume of this one while it
        # still trains, is refused before it writes anything here.
        self._lock = lock_run_folder(self.run_dir, acc)
        self._caller_rng: dict[str, Any] | None = ckpt.capture_rng()  # given back when the run ends
        try:
            self._set_up(resume, objective_factory)
        except BaseException:
            self._release()
            raise

    def _set_up(self, resume: bool | str | Path | None,
                objective_factory: Callable[[TrainConfig, Tokenizer], TokenizerObjective] | None) -> None:
        config, sched, acc = self.cfg, self.cfg.schedule, self.accelerator
        # Identical initialisation on every process; afterwards each process draws its own
        # randomness (augmentations inside the loss) from seed + 1 + rank.
        self.pending_notes: list[str] = []  # said once the logger exists
        self._settings_until: int | None = None  # the step a resume with other settings starts from
        self._earlier_settings: dict[str, Any] = {}  # and the checkpoint's settings, which it changes
        self.pending_notes += late_ramps(config)  # a short run of a config sized for 250k steps
        unread = config.unread_model_keys()
        if unread:  # accepted, saved in config.yaml, and doing nothing: say so where the run is logged
            bottleneck = config.model.bottleneck
            settings = ", ".join(f"{key}={getattr(bottleneck, key.rsplit('.', 1)[1])!r}" for key in unread)
            self.pending_notes.append(f"warning: {settings} {'has' if len(unread) == 1 else 'have'} no effect: "
                                      f"bottleneck kind {bottleneck.kind!r} does not read "
                                      f"{'it' if len(unread) == 1 else 'them'}")
        # the main process alone reads the folder: the others may look after it began writing there
        decided_by_main_process(acc, lambda: check_run_folder(self.run_dir, new_run=not resume))
        checkpoint = self._checkpoint_to_resume(resume) if resume else None
        seed_everything(sched.seed)
        self.tokenizer = Tokenizer(config.model)
        if checkpoint is None:  # a fresh start, also a --resume of a run stopped before its first checkpoint
            _initial_weights(self.tokenizer, config)
        # before the optimizer, which takes only what trains
        self.frozen_modules = _freeze(self.tokenizer, config.run.freeze)
        self.objective = (objective_factory or default_objective)(config, self.tokenizer)
        seed_everything(sched.seed + 1 + self.rank)

        gen_extra = list(self.objective.generator_parameters())
        self.disc_params = list(self.objective.discriminator_parameters())
        self.gen_extra = gen_extra
        names = {id(p): f"objective.{n}" for n, p in self.objective.named_parameters()}
        named_gen = list(self.tokenizer.named_parameters()) + [(names.get(id(p), "objective.param"), p) for p in gen_extra]
        o = config.optim
        self.lr = scaled_lr(o.lr, sched.batch_size, o.scale_lr)
        self.optimizer = build_optimizer(named_gen, name=o.name, lr=self.lr, betas=o.betas,
                                         weight_decay=o.weight_decay, eps=o.eps)
        self.disc_optimizer = None
        if self.disc_params:
            disc_lr = scaled_lr(o.disc_lr if o.disc_lr is not None else o.lr, sched.batch_size, o.scale_lr)
            self.disc_optimizer = build_optimizer(
                [(names.get(id(p), "objective.disc"), p) for p in self.disc_params], name=o.name, lr=disc_lr,
                betas=o.disc_betas or o.betas,
                weight_decay=o.disc_weight_decay if o.disc_weight_decay is not None else o.weight_decay, eps=o.eps)

        self.model, self.optimizer = acc.prepare(self.tokenizer, self.optimizer)
        self.unwrapped: Tokenizer = acc.unwrap_model(self.model)
        self.objective.to(self.device)
        schedule_args: dict[str, Any] = dict(total_steps=sched.steps, warmup_steps=sched.warmup_steps,
                                             kind=sched.lr_schedule, min_ratio=sched.min_lr_ratio)
        self.scheduler = build_scheduler(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                         else self.optimizer, **schedule_args)
        self.disc_scheduler = build_scheduler(self.disc_optimizer, **schedule_args) if self.disc_optimizer else None
        self.ema = EMA(self.unwrapped, sched.ema_decay, warmup=sched.ema_warmup)

        self.step = 0
        self.nonfinite_steps = 0
        self.skipped_files: set[str] = set()
        # shards: where each logical data worker stopped, so --resume continues at the next sample
        self.stream_positions: dict[int, tuple[int, int]] = {}
        self.last_checkpoint: Path | None = None
        self.checkpoint_step = 0  # the step of last_checkpoint
        self._stop = StopRequests()  # fit() installs the real one
        self._mid_step = False  # True while a step updates weights, optimizer and EMA
        self._step_start: tuple[dict[int, tuple[int, int]], dict[str, Any]] | None = None  # set by train_step
        self._fitted = False
        self._step_seconds = 0.0  # the time this call's steps took, grids and checkpoints left out
        self._set_aside: Path | None = None  # where an explicit older checkpoint moved the line it leaves
        resume_state = self._load_resume(checkpoint, explicit=resume is not True) if checkpoint else None
        if resume and self.is_main:
            self._trim_log()

        self.data, self.heldout = build_data(
            config.data, image_size=config.image_size, micro_batch=self.micro_batch, rank=self.rank,
            world_size=self.world, seed=sched.seed, start_micro_step=self.step * sched.grad_accum,
            stream_positions=self._restore_stream_positions(resume_state),
            pin_memory=self.device.type == "cuda")
        self.skipped_files.update(self.heldout.skipped)
        if self.heldout.skipped:
            shown = self.heldout.skipped
            self.pending_notes.append(f"held-out set: skipped {len(shown)} unreadable file(s) ({first_few(shown, 3)}) "
                                      f"and drew others in their place")
        if resume_state is not None:
            self._restore_rng(resume_state)
        if self.is_main and not is_tokenizer_run(self.run_dir):
            # before the log or anything else: a run stopped from here on continues with --resume
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / RUN_CONFIG_NAME)
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, tensorboard=config.run.tensorboard)
        self.monitor = HeldOutMonitor(self.heldout, self.run_dir, grid_images=config.run.grid_images,
                                      eval_lpips=config.run.eval_lpips, batch_size=max(1, self.micro_batch),
                                      autocast=acc.autocast, device=self.device, is_main=self.is_main,
                                      log_image=self.logger.image)

    def close(self) -> None:
        """Free the run folder without training (``fit()`` frees it when it ends): for a Trainer
        made and then not used, e.g. a notebook cell run again before ``fit()``."""
        self._release()

    def _release(self) -> None:
        """Close the log, free the run folder and give the caller's random generators back their states."""
        if hasattr(self, "logger"):  # a set-up that failed before the log was opened
            self.logger.close()
        self._lock.release()
        if self._caller_rng is not None:
            ckpt.restore_rng(self._caller_rng)
            self._caller_rng = None

    # --- the loop ------------------------------------------------------------------------------

    @with_gradients
    def fit(self) -> TrainResult:
        """Train to ``schedule.steps`` (or until the time limit or a stop signal), then write the
        final checkpoint, export the EMA weights, a last grid and ``metrics.json``."""
        try:
            return self._fit()
        finally:  # however it ends, the folder is free for a --resume
            self._release()

    def _fit(self) -> TrainResult:
        if self._fitted:
            raise RuntimeError("a Trainer runs fit() once; to continue its run, make a new "
                               "Trainer(config, run_dir, resume=True)")
        self._fitted = True
        cfg, run = self.cfg, self.cfg.run
        export = self.run_dir / EXPORT_NAME
        finished = self._outputs_of_this_step() if self.step >= cfg.schedule.steps else None
        if finished is not None:
            # a finished run resumed again: keep its outputs as they are (a second export and
            # evaluation would rewrite metrics.json with the speed of no training at all)
            self.logger.info(f"the run already finished: it is at step {self.step} and schedule.steps is "
                             f"{cfg.schedule.steps}; raise schedule.steps to train further")
            self.logger.close()
            return TrainResult(self.run_dir, self.step, "already finished", finished, self.last_checkpoint, export)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            current = self.run_dir / RUN_CONFIG_NAME
            if self._settings_until is not None:  # the run's history stays readable
                # the checkpoint's own settings: config.yaml may already hold those of a resume that
                # changed them and stopped before its first checkpoint
                text = yaml.safe_dump(self._earlier_settings, sort_keys=False)
                atomic_write(self.run_dir / self._earlier_config_name(), lambda p: p.write_text(text))
            save_config(cfg, current)
        self._describe()
        start_step, started = self.step, time.time()
        status = "finished"
        self._stop = StopRequests(lambda name: self.logger.info(
            f"received {name}: stopping after this step (Ctrl-C again to stop at once)")).install()
        bar = tqdm(total=cfg.schedule.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=0.5,
                   disable=not (self.is_main and run.progress), desc="train")
        window = LogWindow()
        shown_at = 0.0
        try:
            # closed by the block, not left to __del__: a worker's error is a reference cycle
            # that keeps the iterator, and so its workers, alive (see worker_batches)
            with worker_batches(self.data.loader) as data_iter:
                if self.step == 0 and run.grid_every:
                    self._log_heldout(0, self.write_grid())
                while self.step < cfg.schedule.steps:
                    reason = self._should_stop(started)
                    if reason:
                        status = reason
                        break
                    begun = time.perf_counter()
                    logs = self.train_step(data_iter)
                    lr = logs.pop("lr")  # the step's own, not a mean over the window
                    spent = time.perf_counter() - begun
                    self._step_seconds += spent
                    window.add(logs, seconds=spent, latest={"lr": float(lr)})
                    bar.update(1)
                    if self.is_main and run.progress and "loss" in logs and time.time() - shown_at > 1.0:
                        shown_at = time.time()  # reading the losses syncs the device: at most once a second
                        shown: dict[str, str] = {k: format_value(float(logs[k]))
                                                 for k in ("loss", "rec", "perceptual", "d/loss") if k in logs}
                        rate = window.steps * cfg.schedule.batch_size / max(window.seconds, 1e-9)
                        shown["img/s"] = f"{rate:.1f}"
                        bar.set_postfix(shown, refresh=False)
                    step = self.step
                    # the grid before the log, so that a log step's record carries its held-out metrics
                    grid_due = (run.grid_every and step % run.grid_every == 0) or step == cfg.schedule.steps
                    heldout = self.write_grid() if grid_due else {}
                    if self._log_due(step):
                        self._log_window(step, window, heldout)
                    else:
                        self._log_heldout(step, heldout)
                    if run.checkpoint_every and step % run.checkpoint_every == 0 and step < cfg.schedule.steps:
                        self.save_checkpoint()
        except KeyboardInterrupt:
            status = "interrupted"
            at_once = True
        except BaseException:  # any other error: give the notebook its Ctrl-C back, close the log
            self._stop.restore()
            self.logger.close()
            raise
        else:
            at_once = False
        finally:
            bar.close()
        result = TrainResult(self.run_dir, self.step, status)
        # stopped at once inside an update, or with several processes (each may be anywhere, so a
        # checkpoint's collectives could hang or gather two steps): no consistent state to save
        unsafe = self._mid_step or (at_once and self.world > 1)
        try:  # the handlers stay until the checkpoint is written: a second signal must not kill it half-way
            if unsafe:
                result.checkpoint, result.step = self.last_checkpoint, self.checkpoint_step
                where = f"inside the update of step {self.step + 1}" if self._mid_step else \
                    f"at once with {self.world} processes"
                self.logger.info(f"stopped {where}: no checkpoint of an inconsistent state is written; --resume "
                                 f"continues from {self.last_checkpoint or 'step 0 (no checkpoint yet)'}")
            elif self.step > start_step or self.last_checkpoint is None:
                if self._step_start is not None:  # stopped at once before the step's update
                    self.stream_positions, rng = self._step_start
                    ckpt.restore_rng(rng)
                if window.steps and run.log_every:  # the steps since the last log line: a resumed run would not
                    self._log_window(self.step, window, {})
                result.checkpoint = self.save_checkpoint()
            else:
                result.checkpoint = self.last_checkpoint
        finally:
            self._stop.restore()
        wall = time.time() - started
        if status == "interrupted":
            kept = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint yet"
            self.logger.info(f"interrupted at step {result.step}: {kept}; continue with --resume")
        else:
            result.export = self.export()
            result.metrics = self.final_metrics(wall, start_step)
        self.logger.close()
        return result

    def _outputs_of_this_step(self) -> dict[str, Any] | None:
        """``metrics.json`` when it and ``export/`` were written at the checkpoint's step, else None.

        A run stopped between its last checkpoint and its outputs (a signal or a crash during the
        final evaluation) keeps the outputs of an earlier, shorter schedule: those are made again.
        """
        export, metrics = self.run_dir / EXPORT_NAME, self.run_dir / "metrics.json"
        if not (export.is_dir() and metrics.is_file()):
            return None
        try:
            saved = json.loads(metrics.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("step") != self.step:
            self.logger.info(f"export/ and metrics.json are from step {saved.get('step', '?')}, not from the "
                             f"checkpoint's step {self.step}: exporting and evaluating again")
            return None
        return saved

    def train_step(self, data_iter: Iterator[Batch]) -> dict[str, float | torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its logged scalars."""
        sched, acc = self.cfg.schedule, self.accelerator
        step = self.step
        self.model.train()
        for module in self.frozen_modules:  # as the release's stage 2: a KL posterior gives its mean
            module.eval()
        self.objective.train()
        logs: dict[str, Any] = defaultdict(float)
        lr = self.scheduler.get_last_lr()[0]
        # what a stop at once before this step's update puts back, so that its checkpoint (of the step
        # before) neither skips this step's samples on resume nor draws other random numbers
        self._step_start = (dict(self.stream_positions), ckpt.capture_rng())
        # Everything stays on the device until one sync at the end of the step: a non-finite loss
        # gives non-finite gradients, so the gradient norms (identical on every process after
        # DDP's all-reduce) decide whether to skip, and logged values are converted at log steps.
        for micro in range(sched.grad_accum):
            batch = next(data_iter)
            self.skipped_files.update(batch.skipped)
            if batch.stream_position is not None:
                logical, epoch, index = batch.stream_position
                self.stream_positions[logical] = (epoch, index)
            images = batch.images.to(self.device, non_blocking=True)
            last = micro == sched.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():  # the objective keeps the discriminator out of this graph
                    output = self.model(images)
                    loss, gen_logs = self.objective.generator_loss(images, output, step, as_tensors=True)
                acc.backward(loss / sched.grad_accum)
                with acc.autocast():
                    d_loss, d_logs = self.objective.discriminator_loss(
                        images, output.reconstruction.detach(), step, as_tensors=True)
                if d_loss.requires_grad:
                    acc.backward(d_loss / sched.grad_accum)
                    logs["d/loss"] += d_loss.detach().float() / sched.grad_accum
            for k, v in {**gen_logs, **d_logs}.items():
                if k not in ("loss", "d/loss"):  # the trainer records those itself
                    logs[k] += v / sched.grad_accum
            logs["loss"] += loss.detach().float() / sched.grad_accum

        self._average_unwrapped_grads()
        grad_norm = self._clip(self.model, self.gen_extra)
        disc_grads = [p for p in self.disc_params if p.grad is not None]
        disc_norm = (torch.nn.utils.clip_grad_norm_(disc_grads, self.cfg.optim.grad_clip or float("inf"))
                     if disc_grads else torch.zeros((), device=self.device))
        checks = torch.stack([grad_norm.float().to(self.device), disc_norm.float().to(self.device),
                              torch.as_tensor(logs["loss"], device=self.device),
                              torch.as_tensor(logs.get("d/loss", 0.0), device=self.device)])
        ok = torch.isfinite(checks).all().to(torch.float32).reshape(1)
        if self.world > 1:  # every process must skip together
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        finite = bool(ok.item())  # the step's one host-device sync
        if not finite:
            self._mid_step = True
            self._zero_grads()
            self.nonfinite_steps += 1
            self.logger.info(f"step {step}: non-finite loss or gradient, step skipped "
                             f"({self.nonfinite_steps}/{self.cfg.run.max_nonfinite})")
            self._advance_schedules()
            self._mid_step = False
            self._step_start = None  # the skipped step is counted: a checkpoint from here is of its end
            if self.nonfinite_steps >= self.cfg.run.max_nonfinite:
                path = self.save_checkpoint()
                raise NonFiniteLossError(
                    f"stopped at step {self.step}: {self.nonfinite_steps} steps had a non-finite loss or "
                    f"gradient (limit run.max_nonfinite={self.cfg.run.max_nonfinite}). The last good weights are "
                    f"in {path}. Try a lower optim.lr, a longer schedule.warmup_steps, "
                    f"schedule.precision=fp32, or check the data; continue with --resume and overrides."
                )
            return {"nonfinite": 1.0, "lr": lr}

        # From here until the step is counted, the weights, optimizers, schedules and EMA are at two
        # different steps: a checkpoint taken in between (a second Ctrl-C) would mix them.
        self._mid_step = True
        self.optimizer.step()
        if self.disc_optimizer is not None and disc_grads:
            self.disc_optimizer.step()
        self._zero_grads()
        self._advance_schedules()
        self.ema.update(self.unwrapped)
        self._mid_step = False
        self._step_start = None
        logs["grad_norm"] = grad_norm
        logs["lr"] = lr
        return dict(logs)

    # --- pieces of a step ---------------------------------------------------------------------

    def _average_unwrapped_grads(self) -> None:
        """DDP averages the tokenizer's gradients; the objective's trainable parts are averaged here."""
        if self.world == 1:
            return
        grads = [p.grad for p in self.gen_extra + self.disc_params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n

    def _clip(self, model: nn.Module, extra: list[torch.nn.Parameter]) -> torch.Tensor:
        """Clip the tokenizer (+ projector) gradients to ``optim.grad_clip``; returns the norm before
        (a tensor: reading it is left to the caller's single sync)."""
        max_norm = self.cfg.optim.grad_clip or float("inf")
        if self.cfg.run.distributed == "fsdp" and self.world > 1:
            norm = torch.as_tensor(self.accelerator.clip_grad_norm_(model.parameters(), max_norm))
            if extra:  # its norm joins the model's, so that a non-finite projector gradient skips the step too
                extra_norm = torch.nn.utils.clip_grad_norm_(extra, max_norm)
                norm = torch.hypot(norm.float(), extra_norm.float().to(norm.device))
            return norm
        params = [p for p in list(model.parameters()) + extra if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)
        for p in self.gen_extra + self.disc_params:
            p.grad = None

    def _advance_schedules(self) -> None:
        with warnings.catch_warnings():  # the schedules follow the step even when an update is skipped
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
            if self.disc_scheduler is not None:
                self.disc_scheduler.step()
        self.step += 1

    def _skipped_everywhere(self) -> list[str]:
        """Unreadable files met so far by any process, each once (every process calls this)."""
        return sorted(set().union(*gather_objects(sorted(self.skipped_files), self.world)))

    # --- stopping ------------------------------------------------------------------------------

    def _should_stop(self, started: float) -> str | None:
        # Agreed before every step. Reading the all-reduced flags back waits for the device, but
        # each step here waits anyway (train_step reads its non-finite check), so this costs one
        # small collective a step.
        limit = self.cfg.run.max_minutes
        interrupted, late = on_any_process(
            [self._stop.requested, limit is not None and time.time() - started > limit * 60], self.device)
        if interrupted:
            return "interrupted"
        if late:
            return "time limit"
        return None

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (collective: call on every process)."""
        rng = ckpt.capture_rng()
        rngs = gather_objects(rng, self.world)
        skipped = self._skipped_everywhere()
        model_state = ckpt.cpu_copy(self.accelerator.get_state_dict(self.model))
        with self.ema.swapped_into(self.unwrapped):
            ema_state = ckpt.cpu_copy(self.accelerator.get_state_dict(self.model))
        return {
            "format": ckpt.FORMAT,
            "step": self.step,
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "model": model_state,
            "ema": ema_state,
            "ema_updates": self.ema.num_updates,
            "objective": {k: v.detach().cpu() for k, v in self.objective.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer else None,
            "disc_scheduler": self.disc_scheduler.state_dict() if self.disc_scheduler else None,
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_files": skipped,
            "rng": rngs,
            "data_stream": {"workers": self.cfg.data.workers,
                            "positions": gather_objects(self.stream_positions, self.world)},
        }

    def save_checkpoint(self) -> Path:
        """Write the run's state at this step to ``checkpoints/step-NNNNNNNN.pt`` (atomically, keeping
        the last ``run.keep_checkpoints``) and return its path; collective: every process calls it."""
        self._refuse_nonfinite_weights()
        state = self.state_dict()
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        if self.is_main:
            path = ckpt.save_checkpoint(state, self.run_dir, self.step, keep=self.cfg.run.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint, self.checkpoint_step = path, self.step
        return path

    def _refuse_nonfinite_weights(self) -> None:
        """Never save non-finite weights (collective). Skipped steps keep them finite, but a step with
        a finite loss can still move them to infinity (a huge lr); then every later step is skipped,
        and a checkpoint would keep the broken weights as the run's latest."""
        tensors = [*self.unwrapped.parameters(), *self.ema.shadow, *self.gen_extra, *self.disc_params]
        (broken,) = on_any_process([not all_finite(tensors)], self.device)
        if not broken:
            return
        last = (f"the last good weights are in {self.last_checkpoint}: continue from it with --resume "
                f"{self.last_checkpoint} (Trainer(..., resume=that path)) and" if self.last_checkpoint is not None
                else "no checkpoint had been written yet: start again with")
        raise NonFiniteLossError(f"stopped at step {self.step}: the weights became non-finite (a step with a finite "
                                 f"loss moved them to infinity), and nothing was written; {last} a lower optim.lr, "
                                 f"a longer schedule.warmup_steps, optim.grad_clip or schedule.precision=fp32")

    def _checkpoint_to_resume(self, resume: Literal[True] | str | Path) -> Path | None:
        """The checkpoint ``resume`` names (the newest for ``True``); None for a run stopped before
        its first checkpoint, which then starts again in its folder."""
        if self.cfg.run.distributed == "fsdp" and self.world > 1:
            raise ValueError("resuming an FSDP run is not supported yet; resume it with run.distributed=ddp")
        path = ckpt.latest_checkpoint(self.run_dir) if resume is True else Path(resume)
        if path is not None and path.is_dir():
            run = path.parent if path.name == ckpt.CHECKPOINT_DIR else path
            newest = ckpt.latest_checkpoint(run)
            raise CheckpointError(f"--resume {path} is a folder, not a checkpoint file: name one of its files"
                                  + (f" (the newest is {newest})" if newest else "")
                                  + ", or give --resume alone to continue the newest checkpoint of --output")
        if path is None and is_tokenizer_run(self.run_dir):
            self.pending_notes.append(f"--resume: {self.run_dir} has no checkpoint yet (the run stopped before "
                                      f"its first one): starting from step 0")
        elif path is None:
            raise CheckpointError(f"--resume: no checkpoint in {self.run_dir / ckpt.CHECKPOINT_DIR}; start without "
                                  f"--resume (resume=None), or point --output (run_dir) at the run to continue")
        return path

    def _load_resume(self, path: Path, explicit: bool) -> dict[str, Any]:
        """Load ``path`` into the model, EMA, objective and optimizers; ``explicit``: named by the
        user (maybe an older one), so the line of training it leaves is set aside."""
        state = ckpt.load_checkpoint(path)
        if state.get("format") != ckpt.FORMAT:
            raise CheckpointError(f"{path} is not a softvq training checkpoint")
        # "model.encoder.width 96 -> 64"; paths as this config has them (older runs saved them relative)
        saved_settings = anchor_path_keys(state.get("config", {}))
        changed = changed_settings(saved_settings, self.cfg.to_dict())
        model_changes = [c for c in changed if c.startswith("model.")]
        # other weights would train and average; a checkpoint from before run.freeze froze nothing
        frozen_then = set(saved_settings.get("run", {}).get("freeze") or [])
        if frozen_then != set(self.cfg.run.freeze):
            raise CheckpointError(f"{path} was trained with frozen parts {sorted(frozen_then) or 'none'}, this run "
                                  f"freezes {sorted(self.cfg.run.freeze) or 'none'}; a run's frozen parts cannot "
                                  f"change: drop that override, or start a new run from its export (run.init_from)")
        try:
            load_strict(self.unwrapped, state["model"], str(path))
        except CheckpointError:
            if not model_changes:
                raise
            raise CheckpointError(f"{path} holds a model made with other settings ({'; '.join(model_changes)}); a "
                                  f"run's model cannot change: drop those overrides, or start a new run") from None
        missing = [n for n in self.ema.names if n not in state["ema"]]
        if missing:
            raise CheckpointError(f"{path}: EMA weights lack {missing[:4]}")
        self.ema.load_state_dict({"shadow": state["ema"], "num_updates": state["ema_updates"]})
        missing, unexpected = self.objective.load_state_dict(state["objective"], strict=False)
        if unexpected or missing:
            raise CheckpointError(f"{path}: objective state does not match this objective "
                                  f"(missing {missing[:4]}, unexpected {unexpected[:4]}); was the objective config changed?")
        # the saved moments and schedule position, with this config's lr, betas and weight decay
        load_training_state(self.optimizer, self.scheduler, state["optimizer"], state["scheduler"])
        if self.disc_optimizer is not None and state.get("disc_optimizer"):
            assert self.disc_scheduler is not None  # built with disc_optimizer
            load_training_state(self.disc_optimizer, self.disc_scheduler, state["disc_optimizer"],
                                state["disc_scheduler"])
        self.step = int(state["step"])
        if self.is_main and ckpt.remove_stale_checkpoint_temporaries(self.run_dir):
            self.pending_notes.append("removed the half-written checkpoint a killed process left behind")
        if explicit and self.is_main:
            aside = self._set_aside = ckpt.set_aside_newer(self.run_dir, self.step, keep=path)
            if aside is not None:
                self.pending_notes.append(f"continuing from step {self.step}, an older checkpoint: the line it "
                                          f"leaves is kept in {aside}, out of this run's way")
        if changed:  # allowed (a lower lr after a divergence, more steps), but said, and the old ones kept
            self._settings_until, self._earlier_settings = self.step, saved_settings
            self.pending_notes.append(f"resumed with settings other than the checkpoint's: {'; '.join(changed)} "
                                      f"(the earlier ones: {self._earlier_config_name()})")
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.skipped_files = set(state["skipped_files"])
        self.last_checkpoint, self.checkpoint_step = path, self.step
        return state

    def _earlier_config_name(self) -> str:
        """Where config.yaml is copied when a resume changes settings: the steps up to here ran with it."""
        return f"config-until-step-{self._settings_until:08d}.yaml"

    def _trim_log(self) -> None:
        """Drop the log records a killed run wrote past the checkpoint resumed from: the resumed run
        logs those steps again. Those of a line set aside go with its checkpoints."""
        # a run (re)started at step 0 logs step 0's held-out metrics again
        dropped = drop_records_after(self.run_dir / "log.jsonl", self.step if self.step else -1)
        if not dropped:
            return
        if self._set_aside is not None:
            text = "".join(line + "\n" for line in dropped)
            atomic_write(self._set_aside / "log.jsonl", lambda p: p.write_text(text))
        since = f"past step {self.step}" if self.step else "from step 0 on"
        self.pending_notes.append(f"log.jsonl: dropped {len(dropped)} record(s) logged {since}, which this run logs "
                                  f"again")

    def _restore_stream_positions(self, state: dict[str, Any] | None) -> dict[int, tuple[int, int]] | None:
        """Restore and return this process's saved shard-stream positions, or None when they cannot
        be replayed (no checkpoint, an older checkpoint, or another process / worker count)."""
        saved = (state or {}).get("data_stream")
        if not saved or saved["workers"] != self.cfg.data.workers or len(saved["positions"]) != self.world:
            return None
        self.stream_positions = {int(k): tuple(v) for k, v in saved["positions"][self.rank].items()}
        return dict(self.stream_positions)

    def _restore_rng(self, state: dict[str, Any]) -> None:
        note = restore_or_reseed_rng(state["rng"], rank=self.rank, world=self.world, seed=self.cfg.schedule.seed,
                                     step=self.step)
        if note is not None:
            self.pending_notes.append(note)

    # --- outputs ---------------------------------------------------------------------------------

    def write_grid(self) -> dict[str, float]:
        """Held-out originals / EMA reconstructions / |error| as ``grids/step-XXXXXXXX.png``, and the
        EMA weights' PSNR (and LPIPS, with ``run.eval_lpips``) on all held-out images: the training
        loop logs them as ``heldout/psnr`` / ``heldout/lpips``, the held-out curve beside the
        batches' losses. Returns those metrics on the main process ({} on the others)."""
        return self.monitor.grid(self.model, self.ema, self.unwrapped, self.step)

    def _log_window(self, step: int, window: "LogWindow", heldout: dict[str, float]) -> None:
        """One log record at ``step``: the window's means (the only place logged tensors are read
        back: one sync per log step) with the rates, counters and held-out metrics; collective."""
        cfg, run = self.cfg, self.cfg.run
        means = mean_over_processes(window.means(), self.world, self.device)
        # the steps' own time: the held-out grids and checkpoints between them would swing it 10x
        images_per_s = window.steps * cfg.schedule.batch_size / max(window.seconds, 1e-9)
        window.clear()  # before the write: a stop between the two must not log these steps again
        if self.data.num_items:  # shards do not say how many images an epoch holds: no epoch then
            means["epoch"] = step * cfg.schedule.batch_size / self.data.num_items
        means.update(images_per_s=images_per_s, nonfinite_steps=float(self.nonfinite_steps),
                     skipped_files=float(len(self._skipped_everywhere())),
                     **{HELDOUT_PREFIX + k: v for k, v in heldout.items()})
        self.logger.scalars(step, means, echo=not run.progress or step % (run.log_every * 10) == 0 or bool(heldout))

    def _log_due(self, step: int) -> bool:
        every = self.cfg.run.log_every
        return step > 0 and bool(every) and (step % every == 0 or step == self.cfg.schedule.steps)

    def _log_heldout(self, step: int, metrics: dict[str, float], *, after_its_record: bool = False) -> None:
        """The held-out metrics of a step whose log record does not carry them, as a record of their
        own: a step without a log record, or (``after_its_record``) one whose record was written
        before its grid was due (a run stopped early at a log step)."""
        if metrics and (after_its_record or not self._log_due(step)):
            self.logger.scalars(step, {HELDOUT_PREFIX + k: v for k, v in metrics.items()})

    def export(self) -> Path:
        """The EMA weights in our pretrained format (``Tokenizer.from_pretrained(run_dir/'export')``)."""
        target = self.run_dir / EXPORT_NAME
        with self.ema.swapped_into(self.unwrapped):
            state = ckpt.cpu_copy(self.accelerator.get_state_dict(self.model))
        if self.is_main:
            copy = Tokenizer(self.cfg.model)
            load_strict(copy, state, "EMA weights")
            copy.save_pretrained(target)
        self.accelerator.wait_for_everyone()
        return target

    def final_metrics(self, wall_seconds: float, start_step: int) -> dict[str, Any]:
        """Held-out PSNR / LPIPS of the EMA and the raw weights, the last grid, ``metrics.json``."""
        held: HeldOut = self.heldout
        raw = self.monitor.reconstructions(self.model)
        # the last step's grid measured these weights; a run stopped early (max_minutes) has none
        # yet, nor has a finished one making its export again (its log has them: not logged twice)
        if self.monitor.last[0] == self.step:
            ema_metrics = self.monitor.last[1]
        else:
            ema_metrics = self.write_grid()
            if self.step > start_step:
                self._log_heldout(self.step, ema_metrics, after_its_record=True)
        skipped = self._skipped_everywhere()
        if not self.is_main:
            return {}
        raw_metrics = self.monitor.metrics(raw)
        steps_run = self.step - start_step
        metrics: dict[str, Any] = {
            "step": self.step,
            "heldout_images": len(held.names),
            "image_size": self.cfg.image_size,
            **ema_metrics,
            **{f"raw_{k}": v for k, v in raw_metrics.items()},
            "weights": "ema",
            # this call's: a resumed run's steps before it are not in them
            "wall_seconds": round(wall_seconds, 1),
            "steps_this_run": steps_run,
            # the steps' own time, as the log's images_per_s (grids, checkpoints and start-up would make
            # a short resumed part look slower); None when this call only made the outputs of earlier steps
            "images_per_second": (round(steps_run * self.cfg.schedule.batch_size / max(self._step_seconds, 1e-9), 2)
                                  if steps_run else None),
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_files": len(skipped),
            "skipped_examples": skipped[:10],
            "ignored_non_image_files": len(self.data.ignored_files),
            "parameters": self.unwrapped.num_parameters(),
            "data": self.data.description,
        }
        write_json(self.run_dir / "metrics.json", metrics)
        text = f"held-out ({len(held.names)} images, EMA weights): PSNR {metrics['psnr']:.2f} dB"
        if "lpips" in metrics:
            text += f", LPIPS {metrics['lpips']:.4f}"
        self.logger.info(text + f"  | raw weights: PSNR {metrics['raw_psnr']:.2f} dB")
        if skipped:
            held_skipped = len(set(held.skipped).intersection(skipped))  # also told apart at the start
            part = f" ({held_skipped} of them held-out)" if held_skipped else ""
            self.logger.info(f"skipped {len(skipped)} unreadable image file(s){part}, e.g. {why_unreadable(skipped[0])}")
        if self.data.ignored_files:
            self.logger.info(f"ignored {len(self.data.ignored_files)} non-image file(s) in the data folder")
        return metrics

    def _describe(self) -> None:
        c, s = self.cfg, self.cfg.schedule
        for note in self.pending_notes:
            self.logger.info(note)
        self.logger.info(
            f"run {self.run_dir}: {c.model_preset or 'custom'} tokenizer, {self.unwrapped.num_parameters() / 1e6:.2f} M "
            f"parameters, {c.model.num_tokens} tokens x {self.unwrapped.latent_dim} ({c.model.bottleneck.kind}), "
            f"{c.image_size} px"
        )
        self.logger.info(
            f"{self.world} process(es) on {self.device.type} ({self.accelerator.mixed_precision} mixed precision), "
            f"global batch {s.batch_size} = {self.world} x {self.micro_batch} x {s.grad_accum} accumulation, "
            f"peak lr {self.lr:.3g}, {s.steps} steps from step {self.step}"
        )
        self.logger.info(f"data: {self.data.description}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if c.data.workers > cores:
            self.logger.info(f"data.workers={c.data.workers} loader processes share {cores} CPU core(s) with training: "
                             f"set data.workers={cores} or fewer if decoding competes with the model")
        if c.model.decoder_noise_dim:
            self.logger.info(f"generative decoder (WeTok Sec. 3.3): {c.model.decoder_noise_dim} noise channels per token")
        if c.run.init_from and self.step == 0:
            self.logger.info(f"weights initialised from {c.run.init_from}")
        if c.run.freeze:
            self.logger.info(f"frozen (not trained): {', '.join(c.run.freeze)}")
        if c.run.init_encoder and self.step == 0:
            self.logger.info(f"encoder initialised from DINO weights {c.run.init_encoder} (paper Sec. 4.1)")


def late_ramps(config: TrainConfig) -> list[str]:
    """Warnings for what a run ends before: an lr warm-up, LPIPS's warm-up or the GAN's start at or
    past ``schedule.steps`` (a config sized for 250k steps, shrunk to a few hundred)."""
    sched, obj = config.schedule, config.objective
    notes = []
    if sched.warmup_steps >= sched.steps:
        notes.append(f"warning: schedule.warmup_steps {sched.warmup_steps} is not shorter than schedule.steps "
                     f"{sched.steps}: the lr never reaches its peak; pass a shorter schedule.warmup_steps")
    if obj.perceptual_weight > 0 and obj.perceptual_warmup_steps >= sched.steps:
        notes.append(f"warning: objective.perceptual_warmup_steps {obj.perceptual_warmup_steps} is not shorter than "
                     f"schedule.steps {sched.steps}: LPIPS never reaches its weight {obj.perceptual_weight:g}; pass "
                     f"a shorter objective.perceptual_warmup_steps")
    if obj.adversarial_weight > 0 and obj.discriminator_start >= sched.steps:
        notes.append(f"warning: objective.discriminator_start {obj.discriminator_start} is not before schedule.steps "
                     f"{sched.steps}: the GAN never starts; pass an earlier objective.discriminator_start (or "
                     f"objective.adversarial_weight=0 to say so)")
    return notes


def _freeze(tokenizer: Tokenizer, parts: list[str]) -> list[nn.Module]:
    """Stop ``run.freeze``'s parts from training, each with the projection on its side of the latents;
    returns their modules (kept in eval mode while the rest trains)."""
    modules = {"encoder": (tokenizer.encoder, tokenizer.to_latent), "bottleneck": (tokenizer.bottleneck,),
               "decoder": (tokenizer.from_latent, tokenizer.decoder)}
    frozen: list[nn.Module] = [module for part in parts for module in modules[part]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def _initial_weights(tokenizer: Tokenizer, config: TrainConfig) -> None:
    """Load ``run.init_from`` (a whole tokenizer) or ``run.init_encoder`` (DINO weights) into a fresh model."""
    from softvq.checkpoint.official import looks_released

    run = config.run  # validate() refused both set
    if run.init_from:
        release = run.init_from.startswith(OFFICIAL_PREFIX)  # a released SoftVQ-VAE checkpoint
        target = official_target(run.init_from, "run.init_from=") if release else run.init_from
        try:
            start = Tokenizer.from_official(target) if release else Tokenizer.from_pretrained(target)
        except CheckpointError as exc:  # name the setting that points there, and where a relative one looked
            where = "" if Path(target).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
            fix = ("" if release else f"; set run.init_from={OFFICIAL_PREFIX}{target}" if looks_released(target)
                   else "; train the run it names first, or set run.init_from=<that run>/export (or one of its "
                        "checkpoints/step-N.pt)")
            raise CheckpointError(f"run.init_from: {exc}{where}{fix}") from None
        tokenizer.load_weights_of(start, f"run.init_from {run.init_from}", config_keys=config.own_model_keys())
    elif run.init_encoder:
        from softvq.networks.dinov2 import dinov2_for_width, init_encoder_from_dino, load_dino

        source = run.init_encoder
        if source == "dinov2":
            try:
                source = dinov2_for_width(tokenizer.config.encoder.width)
            except ValueError as exc:
                raise ValueError(f"run.init_encoder=dinov2: {exc}; set run.init_encoder=null") from None
        init_encoder_from_dino(tokenizer.encoder, load_dino(source, "set run.init_encoder to that file (or to null: a random start)"))

