"""The ``softvq`` command line. Each sub-command lives in its own module ``softvq.cli.<name>``
exposing ``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it.

Errors a user can fix (bad paths, bad images, bad checkpoints, bad config keys) print one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `softvq --help`.
COMMANDS = ("info", "reconstruct", "encode", "decode", "train", "eval", "plot", "pretokenize",
            "train_generator", "generate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.data.images import ImageReadError

    return (CheckpointError, ImageReadError, FileNotFoundError, KeyError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"softvq {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softvq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
