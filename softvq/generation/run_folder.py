"""A generator run's folder across the commands that make it: which folders may be ``--out``, the
settings a rerun must share with the run it continues (config.json and every checkpoint record
them), what a continuing rerun records, the half-written files a killed run leaves, the
``--export-at`` milestones, and the stop on non-finite values with where the last good weights are."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from softvq.atomic import write_json
from softvq.generation.checkpoint import (GENERATOR_EXPORT, MODEL_CONFIG_KEY, RUN_KINDS, folder_kind,
                                         holds_generator_checkpoint, is_run_config, milestone_export)
from softvq.generation.train_config import CHANGEABLE_ON_RESUME, GeneratorTrainConfig, flag_name, recorded_train
from softvq.resume import changed_settings
from softvq.training.stopping import NonFiniteLossError, all_finite


def check_out_folder(run: Path) -> None:
    """``--out`` must be new, empty or a train-generator run (its config.json says so, or, where
    that file was lost, its checkpoints): training writes config.json and checkpoints into it, so any
    other folder would be overwritten (a tokenizer's or an export's config.json) or misread as a run."""
    from softvq.checkpoint.pretrained import is_tokenizer_run
    from softvq.generation.latents import META_NAME
    from softvq.run_lock import LOCK_NAME, ensure_not_in_use
    from softvq.training.accelerator import first_launched_process
    from softvq.training.checkpointing import latest_checkpoint

    if run.is_file():
        raise NotADirectoryError(f"--out {run} is a file; pass a folder for the run")
    if first_launched_process():  # the others of a launch may look after their main process locked it
        ensure_not_in_use(run)  # a run still going: "in use", not what its files make it look like
    # half-written files of our own atomic writes (a process of a launched run may be writing config.json)
    # and a killed run's lock file are no content
    if not run.is_dir() or not [p for p in run.iterdir()
                                if not (p.name.startswith(".") and p.name.endswith(".tmp")) and p.name != LOCK_NAME]:
        return
    file = run / "config.json"
    try:
        payload, why = json.loads(file.read_text()), None
    except FileNotFoundError:
        payload, why = None, None
    except (OSError, ValueError) as exc:
        payload, why = None, f"is not valid JSON ({exc})"
    if is_run_config(payload):
        return
    fresh = "a new or empty folder as --out"
    kind = folder_kind(run)
    if is_tokenizer_run(run) or kind == "tokenizer run":
        raise ValueError(f"--out {run} is a tokenizer training run (softvq train's), not a train-generator run; "
                         f"pass {fresh}")
    if kind == "tokenizer":
        raise ValueError(f"--out {run} is a tokenizer, not a train-generator run: training would overwrite its "
                         f"config.json; pass {fresh}")
    if kind == "latent set":
        raise ValueError(f"--out {run} is a latent set ({META_NAME}, written by pretokenize), not a train-generator "
                         f"run; pass it as --latents and {fresh}")
    if kind == "generator":
        parent = folder_kind(run.parent) in RUN_KINDS
        again = f", or its run {run.parent} to continue that run" if parent else ""
        raise ValueError(f"--out {run} is an exported generator, not a train-generator run: training would overwrite "
                         f"its config.json; pass {fresh}{again}")
    kept = latest_checkpoint(run) is not None
    if not file.exists():
        if kept:
            return  # a run whose config.json was lost: its last checkpoint's settings are checked instead
        raise ValueError(f"--out {run} is a folder that is not a train-generator run (no config.json of one, and no "
                         f"checkpoints); pass {fresh}")
    if why is None:
        why = (f"holds a {type(payload).__name__}, not a run's settings" if not isinstance(payload, dict)
               else "has no run settings (\"train\" and \"model\")")
    fix = ("restore it, or delete it to continue from the settings the run's checkpoints record, or pass a new --out "
           "to start a fresh run" if kept else f"pass {fresh}")
    raise ValueError(f"--out {run} is not a train-generator run: its {file.name} {why}; {fix}")


def run_record(state: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The run's settings as a checkpoint records them, in config.json's layout ({"model", "train",
    "latents_sha1"}; checkpoints before them hold the model alone, and before that nothing). A file
    that is no generator checkpoint is refused before any of it is loaded."""
    from softvq.checkpoint.pretrained import CheckpointError

    if not holds_generator_checkpoint(state):
        raise CheckpointError(f"{checkpoint} is not a train-generator checkpoint; pass a new or empty folder as --out")
    return {key: state[name] for key, name in (("model", MODEL_CONFIG_KEY), ("train", "train"),
                                               ("latents_sha1", "latents_sha1")) if name in state}


def check_same_run(run: Path, saved: dict[str, Any], model: dict[str, Any], train: dict[str, Any],
                   latents_sha1: str) -> None:
    """A run folder resumes only the run it was started with: another generator, other training
    settings or another latent set than ``saved`` (config.json, or a checkpoint's :func:`run_record`)
    records is a clear error before any weights are loaded; what ``saved`` lacks is not compared."""
    from softvq.checkpoint.specs import portable_spec

    # every difference at once: naming one at a time makes the user rerun to find the next
    model_changed = changed_settings(saved["model"], model) if "model" in saved else []
    saved_train = dict(saved.get("train", train))
    if saved_train.get("tokenizer") and train.get("tokenizer") and \
            portable_spec(saved_train["tokenizer"]) == train["tokenizer"]:  # recorded before specs were absolute
        saved_train["tokenizer"] = train["tokenizer"]
    # size is compared as the model it built (above): runs before it could be null recorded "XL"
    changed = changed_settings(saved_train, train, ignore=(*CHANGEABLE_ON_RESUME, "size"))
    if saved.get("latents_sha1", latents_sha1) != latents_sha1:
        changed.append(f"latent set {saved_train.get('latents')!r} -> {train['latents']!r} (another meta.json)")
    if model_changed or changed:
        flags = ", ".join(flag_name(name) for name in CHANGEABLE_ON_RESUME[2:])
        changed = [c for c in changed if c not in model_changed]  # a width is in both records
        what = "; ".join(([f"another generator: {', '.join(model_changed)}"] if model_changed else []) + changed)
        raise ValueError(f"{run} was trained with other settings ({what}); a rerun continues it with the same ones "
                         f"(only {flags} may change), or pass a new --out to start a fresh run")


def saved_settings(run: Path, state: dict[str, Any], checkpoint: Path) -> list[dict[str, Any]]:
    """What a resume from ``checkpoint`` is checked against: the run's config.json (a run config:
    :func:`check_out_folder` saw to it) and the checkpoint's own record, so that a lost or replaced
    config.json neither lets other settings through nor brings another model's weights to
    ``load_state_dict``. The first is what config.json is rebuilt from when it was lost."""
    file = run / "config.json"
    records = [json.loads(file.read_text())] if file.is_file() else []
    own = run_record(state, checkpoint)
    if not records and "train" not in own:
        raise ValueError(f"{run} has no config.json, and its checkpoint {checkpoint.name} is from before checkpoints "
                         f"recorded the run's settings, so continuing it cannot be checked: restore {file}, or pass a "
                         f"new --out to start a fresh run")
    return records + [own]


def exported_step(export: Path) -> int | str | None:
    """The step ``export`` was written at; None where there is no export (or it is damaged), and
    ``"unknown"`` for one written before exports recorded their step. A run stopped between its
    last checkpoint and its export keeps an older export, which is then made again."""
    try:
        return json.loads((export / "config.json").read_text()).get("step", "unknown")
    except (OSError, json.JSONDecodeError):
        return None


def record_continuation(run: Path, cfg: GeneratorTrainConfig, start: int, saved: dict[str, Any]) -> None:
    """Bring ``RUN/config.json`` up to a rerun that continues the run from ``start``: ``train`` takes
    the settings a rerun may change as now given (``steps``: the length it now trains to) and
    ``export_at`` becomes every step asked for over the run's commands (the union; those reached are
    its generator-step-* folders); a rerun that changes ``steps`` is appended to ``continued`` as
    {"at_step", "from_steps", "to_steps"}, so the file says the run was lengthened and where.
    ``saved`` is config.json as read, or, where it was lost, the checkpoint's record it is rebuilt from."""
    file = run / "config.json"
    old, now = saved.get("train", {}), recorded_train(cfg)
    train = {**old, **{name: now[name] for name in CHANGEABLE_ON_RESUME}} if old else now
    train["export_at"] = sorted(set(old.get("export_at", [])) | set(cfg.export_at))
    continued = list(saved.get("continued", []))
    if old and old.get("steps") != cfg.steps:
        continued.append({"at_step": start, "from_steps": old.get("steps"), "to_steps": cfg.steps})
    updated = {**saved, "train": train, **({"continued": continued} if continued else {})}
    if updated != saved or not file.is_file():
        write_json(file, updated)


def tidy_run(run: Path, step: int) -> None:
    """Before a run (re)starts at ``step``: delete the half-written files a killed process left
    (checkpoints, as the tokenizer trainer does, and config.json or exports), and drop the
    ``log.jsonl`` records past ``step``, which the rerun logs again. Main process only."""
    from softvq.atomic import remove_stale_temporaries
    from softvq.training.checkpointing import remove_stale_checkpoint_temporaries
    from softvq.training.logging import drop_records_after

    removed = remove_stale_checkpoint_temporaries(run) + sum(
        remove_stale_temporaries(folder) for folder in [run, *run.glob(f"{GENERATOR_EXPORT}*")])
    if removed:
        print(f"removed {removed} half-written file{'s' if removed > 1 else ''} a killed process left in {run}",
              file=sys.stderr)
    drop_records_after(run / "log.jsonl", step)


def milestone_warnings(cfg: GeneratorTrainConfig, run: Path, start: int) -> list[str]:
    """What ``--export-at`` will not do: steps beyond the run's end, and steps a resumed run has
    passed without their export (given only now); the latter may still be in a checkpoint. (The
    step it resumes at is exported from the EMA it loads.)"""
    from softvq.training.checkpointing import checkpoint_path

    notes = []
    assert cfg.steps is not None  # resolved with the latent set's count
    for step in sorted(set(cfg.export_at)):
        if step > cfg.steps:
            notes.append(f"--export-at {step} is beyond the run's {cfg.steps} steps, so it is not exported; "
                         f"continue the run with --steps {step} or more to reach it")
        elif step < start and not milestone_export(run, step).is_dir():
            kept = checkpoint_path(run, step)
            where = (f"sample it from its checkpoint with `softvq generate {kept}`" if kept.is_file()
                     else "its checkpoint is not kept either")
            notes.append(f"--export-at {step}: the run is already at step {start}, past it, so it cannot be "
                         f"exported any more; {where}")
    return notes


def nonfinite_stop(cfg: GeneratorTrainConfig, run: Path, step: int, count: int | None) -> str:
    """Why a run stops at ``step`` on non-finite values (``count`` skipped steps, or None: weights),
    where its last good weights are and what to try. Nothing is written at the stop: the run keeps
    its settings, so continuing it would repeat the same steps."""
    from softvq.training.checkpointing import latest_checkpoint

    why = (f"{count} steps had a non-finite loss or gradient and were skipped (limit --max-nonfinite "
           f"{cfg.max_nonfinite})" if count is not None
           else "the weights became non-finite (a step with a finite loss moved them to infinity)")
    kept = latest_checkpoint(run)
    last = f"the last good weights are in {kept}" if kept is not None else "no checkpoint had been written yet"
    fp32 = ", --mixed-precision no" if cfg.mixed_precision != "no" else ""
    rare = "; if such steps are rare, continue this run with a higher --max-nonfinite" if count is not None else ""
    return (f"stopped at step {step}: {why}, and nothing was written; {last}. Start a new run (a new --out) with a "
            f"lower --lr, a warm-up (--warmup-steps), gradient clipping (--max-grad-norm){fp32}, or check the latent "
            f"set{rare}")


def refuse_nonfinite(tensors: list[torch.Tensor], cfg: GeneratorTrainConfig, run: Path, step: int) -> None:
    """Never save non-finite weights: skipped steps keep them finite, but a step with a finite loss
    can still move them to infinity (a huge --lr or --weight-decay)."""

    if not all_finite(tensors):
        raise NonFiniteLossError(nonfinite_stop(cfg, run, step, None))


def stale_export_note(run: Path) -> str | None:
    """Why sampling ``RUN`` (its ``RUN/generator`` export) may not sample what the run has become:
    the run is still training, or it was lengthened and stopped before its end, so its newest
    checkpoint is past the export. None when the export is the run's latest."""
    from softvq.run_lock import in_use
    from softvq.training.checkpointing import checkpoint_step, latest_checkpoint

    run = run.expanduser()
    exported = exported_step(run / GENERATOR_EXPORT)
    try:
        latest = latest_checkpoint(run)
    except OSError:  # an unreadable checkpoints/ folder: nothing to tell, and the export still samples
        return None
    if in_use(run):
        of = f"the EMA of step {exported}" if isinstance(exported, int) else "an earlier EMA"
        return f"{run} is still training: its {GENERATOR_EXPORT}/ is {of}, not of where it is now"
    trained_to = checkpoint_step(latest) if latest is not None else None
    if isinstance(exported, int) and trained_to is not None and trained_to > exported:
        return (f"{run}/{GENERATOR_EXPORT} is the EMA of step {exported}, but the run has trained to step "
                f"{trained_to} and stopped before its end (it was lengthened): sample that step with "
                f"`softvq generate {latest}`, or finish the run to export it")
    return None
