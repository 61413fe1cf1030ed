"""``softvq train [CONFIG] [key=value ...] [--output DIR] [--resume [CHECKPOINT]]``

Train a tokenizer. CONFIG is a YAML file or the name of a bundled config (``softvq train --list``
shows them); without one it trains the small CPU demo on the photos bundled with scikit-image /
scikit-learn. ``key=value`` overrides any field, e.g. ``model.num_tokens=32 optim.lr=2e-4``.

The run folder (``--output``, default ``runs/<run.name>``) receives ``config.yaml`` (the resolved
config), ``log.jsonl``, ``tensorboard/``, ``grids/``, ``checkpoints/``, ``export/`` (EMA weights,
loadable with ``Tokenizer.from_pretrained``) and ``metrics.json`` (held-out PSNR / LPIPS).
``--resume`` continues the newest checkpoint of the run folder (or the one given) exactly; its
config comes from the run folder unless CONFIG is given. Several processes:
``accelerate launch -m softvq.cli.main train ...`` or ``torchrun --nproc_per_node N -m softvq.cli.main train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a tokenizer (no arguments: the CPU demo on the bundled photos)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                        help="a YAML config or bundled config name (default: demo), then key=value overrides")
    parser.add_argument("-o", "--output", type=Path, default=None, help="run folder (default: runs/<run.name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue the newest checkpoint in the run folder, or the given checkpoint file")
    parser.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    parser.set_defaults(func=run, intermixed="items")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config, overrides): the first item without '=' is the config, the rest must be overrides."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None and not overrides:
            config = item
        else:
            raise ValueError(f"unexpected argument {item!r}: give one CONFIG first, then key=value overrides")
    return config, overrides


def resolve_run_dir(output: Path | None, name: str, resume: bool) -> Path:
    """``--output`` as given (refused when it holds files and we are not resuming); otherwise
    ``runs/<name>``, or ``runs/<name>-2``... when that folder already holds a run and we are not
    resuming it (results are never overwritten)."""
    from softvq.run_lock import ensure_not_in_use
    from softvq.training.accelerator import first_launched_process

    if output is not None:
        if output.exists() and not output.is_dir():
            raise NotADirectoryError(f"--output {output} is a file; a run is a folder: choose another --output")
        # Only the first process checks: under torchrun / accelerate the others may look after it
        # has begun writing the run.
        if not resume and first_launched_process() and _has_run(output):
            ensure_not_in_use(output)  # a run still going there: say so, not just "not empty"
            raise FileExistsError(f"{output} is not empty; pass --resume to continue the run there, "
                                  f"or choose another --output (a new run never overwrites one)")
        return output
    base = Path("runs") / name
    if resume or not _has_run(base):
        return base
    n = 2
    while _has_run(base.with_name(f"{name}-{n}")):
        n += 1
    return base.with_name(f"{name}-{n}")


def _has_run(folder: Path) -> bool:
    from softvq.run_lock import LOCK_NAME

    # a lock file alone is what a run killed while setting up leaves: nothing to keep
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def run(args: argparse.Namespace) -> int:
    from softvq.checkpoint.pretrained import RUN_CONFIG_NAME, is_tokenizer_run
    from softvq.training.config import CONFIG_DIR, load_config

    if args.list:
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            first = next((l[1:].strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
            print(f"{path.stem:28s} {first}")
        return 0
    config_name, overrides = split_items(args.items)
    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # argparse gives --resume the word after it: `--resume model.x=1` named no checkpoint
        raise ValueError(f"--resume took {resume!r} as its CHECKPOINT, but it looks like an override: put key=value "
                         f"overrides before --resume (softvq train {resume} --resume -o RUN)")
    if resume and config_name is None:
        # Continue with the run's own resolved config (overrides still apply).
        run_dir = args.output or Path("runs") / load_config(None, overrides).run.name
        saved = run_dir / RUN_CONFIG_NAME
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found; pass --output RUN_DIR of the run to continue")
        cfg = load_config(saved, overrides)
    else:
        cfg = load_config(config_name, overrides)
        run_dir = resolve_run_dir(args.output or (Path(cfg.run.output) if cfg.run.output else None),
                                  cfg.run.name, bool(resume))
    if resume and resume is not True:
        resume = Path(resume)

    from softvq.training.trainer import NonFiniteLossError, Trainer

    # torch's own warning about more loader workers than cores; the trainer says it in one line
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    try:
        trainer = Trainer(cfg, run_dir, resume=resume)
        result = trainer.fit()
    except NonFiniteLossError as exc:
        print(f"softvq train: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # stopped at once (second signal) or before training began
        from softvq.training.accelerator import first_launched_process

        if first_launched_process():
            saved = is_tokenizer_run(run_dir)
            print("softvq train: interrupted; " + (f"continue with: {resume_command(run_dir)}" if saved
                                                   else "nothing was written: run the same command again"),
                  file=sys.stderr)
        return 130
    if not trainer.is_main:
        return 0
    if result.status == "interrupted":
        print(f"stopped at step {result.step}; continue with: {resume_command(run_dir)}")
        return 130
    m = result.metrics
    line = f"{result.status} at step {result.step}: held-out PSNR {m.get('psnr', float('nan')):.2f} dB"
    if "lpips" in m:
        line += f", LPIPS {m['lpips']:.4f}"
    print(line + f" ({m.get('wall_seconds', 0):.0f} s)")
    print(f"run folder {run_dir}: export/ (EMA weights), grids/, checkpoints/, metrics.json, log.jsonl")
    return 0


def resume_command(run_dir: Path) -> str:
    """The command that continues the run: under a launcher, with it and the same process count (a
    resume on another count trains on, but its losses no longer match an uninterrupted run's)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    if world > 1 and local == world:
        return (f"torchrun --nproc_per_node {world} -m softvq.cli.main train --resume --output {run_dir} (or "
                f"your launcher, with {world} processes again)")
    if world > 1:  # several machines: their rendezvous is the user's
        return f"your launch command with -m softvq.cli.main train --resume --output {run_dir}, {world} processes again"
    return f"softvq train --resume --output {run_dir}"
