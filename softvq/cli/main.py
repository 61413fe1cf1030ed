"""The ``softvq`` command line. Each sub-command lives in its own module ``softvq.cli.<name>``
exposing ``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it.

Errors a user can fix (bad paths, bad images, bad checkpoints, bad config values) print one line
and exit with status 2; anything else is a bug and keeps its traceback. The library reports bad
values as ValueErrors, so a bug that raises one would print one line too: ``SOFTVQ_TRACEBACK=1``
shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import NoReturn

# Order is the order of `softvq --help`.
COMMANDS = ("info", "reconstruct", "encode", "decode", "train", "eval", "plot", "pretokenize",
            "train_generator", "generate", "bench")
# Commands that run inference forwards, which stop page-faulting when freed memory is kept.
# Training keeps glibc's defaults: there it measured no gain (see softvq.cpu_allocator).
RETAIN_FREED_MEMORY = ("reconstruct", "encode", "decode", "eval", "pretokenize", "generate")
# Long jobs that keep their work on Ctrl-C (eval saves its running sums; pretokenize, generate,
# decode and reconstruct have written whole shards and images; encode writes nothing half): a
# scheduler's SIGTERM (preemption) gets the same stop. Training installs its own handlers (finish
# the step, write a checkpoint).
STOP_ON_SIGTERM = ("eval", "pretokenize", "generate", "decode", "reconstruct", "encode")
# Commands that run in one process: under torchrun every process would do all of the work into the
# same output (eval: the same report; encode: the same file; decode, reconstruct: the same images)
ONE_PROCESS = ("eval", "encode", "decode", "reconstruct")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed once for a launched run (torchrun): every process parses
    the same command line, so the others would print the same error. Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        from softvq.training.accelerator import first_launched_process

        if first_launched_process():
            self.print_usage(sys.stderr)
            self.exit(2, f"{self.prog}: error: {message}\n")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``softvq`` parser with every sub-command this build has."""
    parser = _Parser(
        prog="softvq", description="SoftVQ-VAE 1D image tokenizers and generators on their latents."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"softvq.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"softvq.cli.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix: printed as one line, without a traceback."""
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.data.images import ImageReadError

    # The OSErrors are paths a user named: an output that is a file, a folder where a file goes,
    # a folder that may not be written to, shards that must not be overwritten; and a full disk.
    from softvq.atomic import OutOfSpaceError

    return (CheckpointError, ImageReadError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, ValueError, OutOfSpaceError)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not when the handler was made."""

    softvq_cli: bool  # set on the CLI's own handler, so it is added once

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _said_by_first_process(record: logging.LogRecord) -> bool:
    """In a launched run, only process 0 prints the library's warnings: every process builds the
    same model from the same config and lists the same folders, so the others would repeat them.
    A warning about what one process alone met (an image it decoded) carries ``every_process``."""
    from softvq.training.accelerator import first_launched_process

    return first_launched_process() or getattr(record, "every_process", False)


def show_library_warnings() -> None:
    """The library's ``logging`` warnings (a release's config.json contradicting its weights, a
    discriminator without its weights) in the CLI's own voice, once per process, and in a launched
    run once for all of its processes."""
    logger = logging.getLogger("softvq")
    if not any(getattr(h, "softvq_cli", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("softvq: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler.addFilter(_said_by_first_process)
        handler.softvq_cli = True
        logger.addHandler(handler)
        # softvq's loaders name each image past Pillow's size warning themselves; Pillow's own copy names
        # no file (appended: a user's -W / PYTHONWARNINGS filter still decides first)
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, append=True)


def main(argv: list[str] | None = None) -> int:
    """Run ``softvq`` with ``argv`` (default: the command line) and return its exit status."""
    show_library_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a nargs="*" positional at the first option, so ``train CONFIG -o DIR k=v`` would
    # leave k=v unparsed; a command that names its list in ``intermixed`` takes such leftovers too.
    listed = getattr(args, "intermixed", None)
    if extra and listed and not any(item.startswith("-") for item in extra):
        setattr(args, listed, [*getattr(args, listed), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from softvq.training.accelerator import first_process_on_its_machine, launched_worker

    if args.command in ONE_PROCESS and launched_worker():
        # said once per machine under a launcher (which sets LOCAL_RANK); by every process where a
        # shell merely exported WORLD_SIZE and RANK, so that none fails without a word
        if first_process_on_its_machine() or "LOCAL_RANK" not in os.environ:
            print(f"softvq {args.command}: error: {args.command} runs in one process on one device; start it "
                  f"without torchrun / accelerate launch (or unset WORLD_SIZE)", file=sys.stderr)
        return 2
    if args.command in RETAIN_FREED_MEMORY:
        from softvq.cpu_allocator import retain_freed_memory

        retain_freed_memory()
    previous = None
    if args.command in STOP_ON_SIGTERM and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        from softvq.tokenizer import images_from_softvq_loaders

        with images_from_softvq_loaders():  # every command reads its images through softvq's loaders
            status = int(args.func(args) or 0)
    except user_errors() as exc:
        if _wants_traceback():
            raise
        import torch.distributed as dist

        from softvq.training.accelerator import first_process_on_its_machine, said_elsewhere

        # Before the processes of a launched run talk to each other, those of one machine meet the same
        # command line and files, so the same refusal: its first process says it. Later, an error may
        # be one process's own.
        said_by_all = not (dist.is_available() and dist.is_initialized())
        if not said_elsewhere(exc) and (first_process_on_its_machine() or not said_by_all):
            print(f"softvq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk met outside softvq's own file writes (a log line, a library's file)
        from softvq.atomic import FULL_DISK_ERRNOS

        if exc.errno not in FULL_DISK_ERRNOS or _wants_traceback():
            raise
        from softvq.training.accelerator import first_launched_process

        if first_launched_process():  # every process of a launched run meets the same full disk
            print(f"softvq {args.command}: error: no space left on the device ({exc}): free some space, then "
                  f"continue with the same command (train: with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from softvq.training.accelerator import first_launched_process, launched_worker

        hint = RESUME_HINTS.get(args.command)
        if first_launched_process():  # once for a launched run, not once per process
            # a launcher also stops the other processes with SIGTERM when one of them fails
            peer = "; if another process stopped with an error (above), fix that first" if launched_worker() else ""
            print(f"softvq {args.command}: interrupted" + peer + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    release_process_group()
    return status


def _wants_traceback() -> bool:
    """``SOFTVQ_TRACEBACK=1``: the full traceback instead of a one-line error."""
    return os.environ.get("SOFTVQ_TRACEBACK", "").strip().lower() in ("1", "true", "yes")


# What an interrupted long job keeps, said where it stops.
RESUME_HINTS = {
    "train-generator": "its checkpoints, if it wrote any, are kept: run the same command again to continue",
    "pretokenize": "the complete shards are kept: run the same command again to continue",
    "generate": "the images written are kept: run the same command again to make the rest (and score them)",
    "decode": "the images written are kept: run the same command again to decode the rest",
    "reconstruct": "the images written are kept: run the same command again to make the rest",
    "eval": "the features measured so far are kept: run the same command again to continue",
}


def _interrupt(signum: int, frame) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def release_process_group() -> None:
    """Destroy the ``torch.distributed`` group a launched run (torchrun / accelerate) created.

    Without this, gloo's worker threads can still be alive while the interpreter shuts down and
    the process dies with SIGABRT ("terminate called without an active exception") after the work
    is done, so torchrun reports a failed run. Called only after success: on an error the other
    processes may still be inside a collective, and a collective teardown could hang them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``softvq`` executable: :func:`main`, then exit with its status.

    A launched worker leaves with ``os._exit`` once its output is flushed. Even after
    :func:`release_process_group`, a native thread of ``torch.distributed`` can still be joinable
    while the interpreter finalises, and the process then aborts ("terminate called without an
    active exception", SIGABRT) after its work is done: torchrun reports the run as failed. A
    clean-clone CI run hit it, and 1 of 10 local two-process runs (0 of 20 with this exit).
    Everything a command writes is closed (checkpoints atomically) before ``main`` returns, so
    skipping finalisation loses nothing.
    """
    from softvq.training.accelerator import launched_worker

    try:
        status = main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe may only show when the buffer is written
    except KeyboardInterrupt:  # Ctrl-C after the work was done (a launched run's other process is done too)
        status = 130
    except BrokenPipeError:
        # The reader left (``softvq info | head``): nothing more to say, and nowhere to say it.
        # stdout goes to devnull so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141  # 128 + SIGPIPE, what a program killed by SIGPIPE reports (as 130 for Ctrl-C)
    if launched_worker():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
