"""Model SPECs, the strings that name a tokenizer in files and on the command line.

A SPEC is a preset name (random weights), a softvq checkpoint folder or hub id, a training run
folder (its ``export/``) or one of its ``checkpoints/step-N.pt`` (that step's EMA weights), or
``official:FOLDER_OR_HUB_ID`` for a released checkpoint. Loading one
is :func:`softvq.cli.common.load_tokenizer`; this module holds what files that record a SPEC
(latent sets, generators) need without the command line.
"""

from __future__ import annotations

from pathlib import Path

from softvq.config import PRESETS

OFFICIAL_PREFIX = "official:"


def official_target(spec: str, setting: str = "") -> str:
    """The release folder or hub id after ``official:`` in ``spec`` (which starts with it), or a
    ValueError where nothing follows: an empty one would read the current folder. ``setting`` is
    how the error spells where the spec was given (``"run.init_from="``)."""
    target = spec[len(OFFICIAL_PREFIX):]
    if not target.strip():
        raise ValueError(f"{setting}{OFFICIAL_PREFIX} needs a release folder or hub id after it, e.g. "
                         f"{OFFICIAL_PREFIX}SoftVQVAE/softvq-b-64")
    return target


def is_preset(spec: str) -> bool:
    """Whether SPEC names a preset (case-insensitive)."""
    return spec.lower() in PRESETS


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` can only be a Hugging Face hub id (``org/name``): one slash, not written as
    a path (``./``, ``/``, ``~``), nothing at that path, and no local folder named like its org
    (``runs/nop`` beside a ``runs/`` folder is a mistyped run, not a repository to download)."""
    path = Path(text).expanduser()
    return (text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
            and not path.parent.is_dir())


def portable_spec(spec: str) -> str:
    """SPEC as a file should record it: a local folder (or checkpoint file) as an absolute path, so
    the file still names its model when read from another working directory; presets and hub ids
    as given."""
    prefix = OFFICIAL_PREFIX if spec.startswith(OFFICIAL_PREFIX) else ""
    local = Path(spec[len(prefix):]).expanduser()
    return prefix + str(local.resolve()) if local.exists() else spec
