"""A trained generator on disk: ``config.json`` + ``model.safetensors`` (the EMA weights).

``config.json`` holds everything ``softvq generate`` needs besides the weights:
the backbone config, the objective (SiT path or DiT schedule), the latent statistics the
generator was trained on ((z − mean) / std), the tokenizer that decodes its latents, and the
class names. Loading is strict (missing / unexpected keys are named).

A ``train-generator`` run folder holds such a folder at the end (``RUN/generator``) and at the
steps of ``--export-at`` (``RUN/generator-step-NNNNNNNN``); its training checkpoints
(``RUN/checkpoints/step-NNNNNNNN.pt``) load as generators too, with their EMA weights: supp.
Tab. 9 (arXiv Tab. 8) samples along training, at 400K, 1M, 2M, 3M and 4M steps. A checkpoint
records the backbone config and the meta, so it loads wherever it lies; one written before it did
loads from its run folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from softvq.checkpoint.pretrained import (CONFIG_NAME, WEIGHTS_NAME, is_tokenizer_run, load_strict, read_folder_config,
                                         read_state_dict, usable_device, write_folder)
from softvq.generation.latents import latent_set_sha1
from softvq.generation.mar import MaskedAutoregressive
from softvq.generation.models import LatentTransformer, build_generator

Generator = LatentTransformer | MaskedAutoregressive

FORMAT = "softvq-generator"


@dataclass
class GeneratorMeta:
    """What a generator was trained on and how to sample it.

    objective:   ``sit`` (velocity, interpolant ``path``), ``dit`` (ε + learned σ, ``schedule``) or
                 ``mar`` (masked autoregressive with a diffusion head; its schedule is in its config).
    path:        SiT interpolant, ``linear`` or ``cosine`` (GVP).
    schedule:    DiT noise schedule, ``cosine`` or ``linear``; ``diffusion_steps`` T.
    latent_mean / latent_std: scalars of the training latents; samples are de-normalised with them.
    tokenizer:   how to load the decoder, a model SPEC (:mod:`softvq.checkpoint.specs`: a preset name,
                 a folder or hub id, a training run, or ``official:FOLDER_OR_HUB_ID``).
    tokenizer_sha1: sha1 of the weights that encoded the latents (:func:`softvq.resume.weights_sha1`;
                 None for latent sets made before it was recorded): ``generate`` warns when the
                 tokenizer it decodes with has others.
    classes:     class names, index = label.
    """

    objective: str = "sit"
    path: str = "cosine"
    schedule: str = "cosine"
    diffusion_steps: int = 1000
    latent_mean: float = 0.0
    latent_std: float = 1.0
    tokenizer: str | None = None
    tokenizer_sha1: str | None = None
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict, as checkpoints and exports record them."""
        return asdict(self)

    def other_tokenizer(self, tokenizer_sha1: str, name: str) -> str | None:
        """"``name``, whose weights (sha1 …) are not the ones that made the generator's latents
        (sha1 …)" where the tokenizer weights of ``tokenizer_sha1`` are not those this meta records;
        None where they are, or where it records none (sets made before their sha1 was kept)."""
        if self.tokenizer_sha1 is None or tokenizer_sha1 == self.tokenizer_sha1:
            return None
        return (f"{name}, whose weights (sha1 {tokenizer_sha1[:10]}) are not the ones that made the generator's "
                f"latents (sha1 {self.tokenizer_sha1[:10]})")


def save_generator(model: Generator, meta: GeneratorMeta, directory: str | Path,
                   state: dict[str, Any] | None = None, step: int | None = None) -> Path:
    """Write the generator (``state`` overrides the weights, e.g. the EMA copy) atomically;
    ``step``, the training step of the weights, goes into ``config.json``. A ``meta`` of another
    kind of generator, or a folder that holds a tokenizer or a latent set, is refused."""
    if not isinstance(meta, GeneratorMeta):
        raise TypeError(f"meta must be a GeneratorMeta, got {type(meta).__name__} (GeneratorMeta(**fields) makes "
                        f"one of a dict)")
    if meta.objective != model.config.kind:  # found only when sampling, after the export was shipped
        raise ValueError(f"the meta says objective {meta.objective!r} but the model is a {model.config.kind!r} "
                         f"generator; give the meta the model's kind")
    payload = {"format": FORMAT, "config": model.config.to_dict(), "meta": meta.to_dict(),
               **({"step": step} if step is not None else {})}
    return write_folder(directory, state or model.state_dict(), payload)


GENERATOR_EXPORT = "generator"  # where softvq train-generator exports its EMA weights in a run folder
MILESTONE_PREFIX = "generator-step-"  # and where --export-at exports them along the way


def milestone_export(run: str | Path, step: int) -> Path:
    """``RUN/generator-step-NNNNNNNN``, the EMA generator ``--export-at`` writes at ``step`` (supp.
    Tab. 9's generation over training, arXiv Tab. 8); unlike checkpoints, never deleted by
    ``keep_checkpoints``."""
    return Path(run) / f"{MILESTONE_PREFIX}{step:08d}"


def run_meta(train: dict[str, Any], latents_meta: dict[str, Any]) -> GeneratorMeta:
    """The meta of a ``train-generator`` run from its resolved training settings (``config.json``'s
    ``train``) and its latent set's ``meta.json``: the tokenizer is ``--tokenizer`` or the set's."""
    from softvq.checkpoint.specs import portable_spec  # latent sets made before their specs were absolute

    tokenizer = train.get("tokenizer") or latents_meta.get("tokenizer")
    return GeneratorMeta(objective=train["objective"], path=train["path"], schedule=train["schedule"],
                         diffusion_steps=train["diffusion_steps"], latent_mean=float(latents_meta["latent_mean"]),
                         latent_std=float(latents_meta["latent_std"]),
                         tokenizer=tokenizer and portable_spec(tokenizer),
                         tokenizer_sha1=latents_meta.get("tokenizer_sha1"), classes=list(latents_meta["classes"]))


def generator_run_export(folder: str | Path) -> Path | None:
    """``folder/generator`` where ``folder`` is a ``train-generator`` run that has exported, else None
    (the twin of :func:`softvq.checkpoint.pretrained.training_run_export` for tokenizer runs)."""
    export = Path(folder).expanduser() / GENERATOR_EXPORT
    return export if (export / CONFIG_NAME).is_file() else None


def is_run_config(payload: Any) -> bool:
    """Whether ``payload`` (a parsed config.json) is a ``train-generator`` run's config, not a
    tokenizer's or an export's (those have a ``format``)."""
    return isinstance(payload, dict) and "train" in payload and "model" in payload


RUN_KINDS = ("generator run", "unfinished generator run")  # what folder_kind calls a train-generator run


def folder_kind(path: str | Path) -> str | None:
    """What softvq wrote in the folder ``path``: ``"latent set"`` (pretokenize), ``"tokenizer run"``,
    ``"tokenizer"``, ``"generator run"``, ``"unfinished generator run"`` (no export yet),
    ``"generator"``, or None for anything else. Commands name it when given the wrong kind."""
    from softvq.checkpoint.pretrained import FORMAT as TOKENIZER_FORMAT, training_run_export
    from softvq.generation.latents import FORMAT as LATENTS_FORMAT, META_NAME

    path = Path(path).expanduser()
    if _json_object(path / META_NAME).get("format") == LATENTS_FORMAT:
        return "latent set"
    if training_run_export(path) is not None:
        return "tokenizer run"
    if generator_run_export(path) is not None:
        return "generator run"
    config = _json_object(path / CONFIG_NAME)
    if config.get("format") == TOKENIZER_FORMAT:
        return "tokenizer"
    if config.get("format") == FORMAT:
        return "generator"
    if is_run_config(config):  # the export comes at the end
        return "unfinished generator run"
    return None


def _json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``, or {} when it is missing, unreadable or not an object."""
    try:
        payload = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def load_generator(path_or_id: str | Path, map_location: str | torch.device = "cpu", *,
                   tokenizer_flag: str = "the tokenizer") -> tuple[Generator, GeneratorMeta]:
    """Load ``(model in eval mode, meta)`` from a folder written by :func:`save_generator`; a
    ``train-generator`` run folder stands for its export, ``RUN/generator``, and a training
    checkpoint of a run, ``RUN/checkpoints/step-N.pt``, gives the EMA weights of step N (what an
    export at N would hold). A tokenizer given instead is refused naming ``tokenizer_flag``, the
    caller's name for one (the commands pass their flag: ``generate --tokenizer``, ``eval --model``)."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        model, meta = _from_training_checkpoint(path, tokenizer_flag)
        return model.to(usable_device(map_location)).eval(), meta
    if path.suffix == ".pt" and not path.exists():  # a checkpoint keep_checkpoints deleted, or a typo
        from softvq.checkpoint.pretrained import CheckpointError

        raise CheckpointError(_no_checkpoint_file(path))
    path_or_id = generator_run_export(path_or_id) or path_or_id
    _refuse_other_folders(Path(path_or_id).expanduser(), tokenizer_flag)
    folder, payload = read_folder_config(path_or_id, FORMAT, "softvq generator",
                                         "tokenizers load with softvq.Tokenizer.from_pretrained")
    with torch.random.fork_rng(devices=[]):  # a random initialisation the weights replace: leave the caller's stream
        model = build_generator(payload["config"])
    load_strict(model, read_state_dict(folder / WEIGHTS_NAME), str(folder / WEIGHTS_NAME))
    return model.to(usable_device(map_location)).eval(), _meta(payload.get("meta", {}))


def _meta(fields: dict[str, Any]) -> GeneratorMeta:
    known = GeneratorMeta.__dataclass_fields__
    return GeneratorMeta(**{k: v for k, v in fields.items() if k in known})


KINDS = ("a generator folder (train-generator's RUN/generator), its run RUN, or one of its checkpoints "
         "RUN/checkpoints/step-N.pt")
MODEL_CONFIG_KEY = "model_config"  # the backbone config in a training checkpoint, which so loads on its own


def run_exports(run: str | Path) -> list[Path]:
    """The generators a ``train-generator`` run holds: its ``--export-at`` folders in step order,
    then its final export."""
    found = sorted(p for p in Path(run).glob(f"{MILESTONE_PREFIX}*") if (p / CONFIG_NAME).is_file())
    return found + [export] if (export := generator_run_export(run)) is not None else found


def holds_generator_checkpoint(state: Any) -> bool:
    """Whether a loaded ``.pt`` holds what every train-generator checkpoint does: the weights, their
    EMA and the step. A ``softvq train`` checkpoint holds those too and is told apart by its format."""
    from softvq.training.checkpointing import FORMAT as TOKENIZER_CHECKPOINT

    return (isinstance(state, dict) and {"model", "ema", "step"} <= set(state)
            and state.get("format") != TOKENIZER_CHECKPOINT)


def _no_checkpoint_file(path: Path) -> str:
    """The error for a checkpoint file that is not there, naming what its run holds instead."""
    from softvq.training.checkpointing import CHECKPOINT_DIR, list_checkpoints

    run = path.resolve().parent.parent
    if path.resolve().parent.name != CHECKPOINT_DIR or folder_kind(run) not in RUN_KINDS:
        return f"no such checkpoint file {path}; pass {KINDS}"
    kept = ", ".join(f"{CHECKPOINT_DIR}/{p.name}" for p in list_checkpoints(run)) or "no checkpoints"
    exports = ", ".join(p.name for p in run_exports(run)) or "none"
    return (f"no such checkpoint file {path}: train-generator keeps only the last --keep-checkpoints of them, and "
            f"never deletes the generator-step-* folders of --export-at; its run {run} holds {kept} and the "
            f"generators {exports}")


def _from_training_checkpoint(file: Path, tokenizer_flag: str) -> tuple[Generator, GeneratorMeta]:
    """The generator of a ``train-generator`` checkpoint file: the backbone config it records (or,
    in checkpoints from before it did, its run's ``RUN/config.json``), its weights with the EMA in
    place of the trained ones (the weights sampling uses, as in an export), and the meta it records
    (or, before that, the meta its run's latent set gives)."""
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.training.checkpointing import CHECKPOINT_DIR, checkpoint_step, load_checkpoint

    where = file.resolve()  # a bare "step-N.pt" given inside RUN/checkpoints has no parents of its own
    run = where.parent.parent
    in_run = where.parent.name == CHECKPOINT_DIR and checkpoint_step(where) is not None
    config = _json_object(run / CONFIG_NAME) if in_run else {}
    run_config = is_run_config(config)
    if in_run and is_tokenizer_run(run):
        raise CheckpointError(f"{file} is a checkpoint of a tokenizer training run, not of a generator; pass it as "
                              f"{tokenizer_flag}, and as the generator {KINDS}")
    not_one = f"{file} is a file that is not a generator checkpoint; pass {KINDS}"
    try:
        state = load_checkpoint(file)
    except CheckpointError:
        if run_config:  # a damaged checkpoint of a generator run: that error names it
            raise
        raise CheckpointError(not_one) from None
    if not holds_generator_checkpoint(state):
        from softvq.training.checkpointing import FORMAT as TOKENIZER_CHECKPOINT

        if isinstance(state, dict) and state.get("format") == TOKENIZER_CHECKPOINT:
            raise CheckpointError(f"{file} is a checkpoint of a tokenizer training run, not of a generator; pass "
                                  f"it as {tokenizer_flag}, and as the generator {KINDS}")
        raise CheckpointError(not_one)
    model_config = state.get(MODEL_CONFIG_KEY) or (config["model"] if run_config else None)
    if model_config is None:
        if "meta" in state:  # written before checkpoints held the backbone config
            from softvq.training.checkpointing import checkpoint_path

            raise CheckpointError(f"{file} is a train-generator checkpoint outside its run folder, from before "
                                  f"checkpoints held their backbone config (the run's {CONFIG_NAME} has it): put it "
                                  f"back as {checkpoint_path('RUN', int(state.get('step', 0)))} of its run RUN, or "
                                  f"pass the run's export RUN/{GENERATOR_EXPORT}")
        raise CheckpointError(not_one)
    with torch.random.fork_rng(devices=[]):  # a random initialisation the weights replace: leave the caller's stream
        model = build_generator(model_config)
    load_strict(model, {**state["model"], **state["ema"]["shadow"]}, str(file))
    meta = _meta(state["meta"]) if "meta" in state else _older_checkpoint_meta(file, run, config)
    return model, meta


def _older_checkpoint_meta(file: Path, run: Path, config: dict[str, Any]) -> GeneratorMeta:
    """Checkpoints written before they recorded the meta: it is rebuilt from the latent set the run
    was started on, found where ``config.json`` says (and the same set)."""
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.generation.latents import META_NAME

    recorded = str(config["train"].get("latents", ""))
    looked = _latent_set_places(run, config["train"])
    for latents in looked:
        data = _json_object(latents / META_NAME)
        if data and latent_set_sha1(data) == config.get("latents_sha1", latent_set_sha1(data)):
            return run_meta(config["train"], data)
    places = ", ".join(map(str, looked))
    raise CheckpointError(f"{file} was written before checkpoints recorded their latent statistics, and the latent "
                          f"set its run was started on ({recorded!r} in {run / CONFIG_NAME}) is at none of {places}; "
                          f"put it back at one of them (its {META_NAME} is enough)")


def _latent_set_places(run: Path, train: dict[str, Any]) -> list[Path]:
    """Where the latent set of ``run`` (resolved) may be, made absolute: as ``config.json`` records
    it, and, when that is relative (runs before it was recorded absolute), from the folder training
    ran in (where the run is ``--out``) and from the run's parent."""
    latents = Path(str(train.get("latents", ""))).expanduser()
    places = [latents]
    if not latents.is_absolute():
        out = Path(str(train.get("out", "")))
        if not out.is_absolute() and out.parts and run.parts[-len(out.parts):] == out.parts:
            places.append(run.parents[len(out.parts) - 1] / latents)
        places.append(run.parent / latents)
    return list(dict.fromkeys(place.resolve() for place in places))


def _refuse_other_folders(path: Path, tokenizer_flag: str) -> None:
    """A one-line CheckpointError saying what ``path`` is when it is another softvq folder a user
    may pass by mistake: a latent set, a tokenizer (run), or a generator run that has no export yet."""
    from softvq.checkpoint.pretrained import CheckpointError, training_run_export
    from softvq.generation.latents import META_NAME

    kind = folder_kind(path)
    if kind == "latent set":
        raise CheckpointError(f"{path} is a latent set ({META_NAME}, written by pretokenize), not a generator; train "
                              f"one on it with `softvq train-generator --latents {path} --out RUN` and pass RUN in its "
                              f"place")
    if kind == "tokenizer run":
        raise CheckpointError(f"{path} is a tokenizer training run (its tokenizer is {training_run_export(path)}), not "
                              f"a generator; pass it as {tokenizer_flag}, and a generator (train-generator's RUN) in "
                              f"its place")
    if kind == "tokenizer":
        raise CheckpointError(f"{path} is a tokenizer, not a generator; pass it as {tokenizer_flag}, and a generator "
                              f"(train-generator's RUN) in its place")
    if kind == "unfinished generator run":
        from softvq.training.checkpointing import latest_checkpoint

        latest = latest_checkpoint(path)
        exports = ", ".join(map(str, run_exports(path)))  # --export-at's, made before it stopped
        # worded for every command that loads generators (generate, eval --probe-generator)
        instead = ([f"its last checkpoint {latest}"] if latest is not None else []) + \
            ([f"one of its --export-at generators {exports}"] if exports else [])
        usable = f"; or pass {' or '.join(instead)} in its place" if instead else ""
        from softvq.run_lock import in_use

        if in_use(path):  # a rerun of train-generator would be refused by the lock
            raise CheckpointError(f"{path} is a train-generator run still training (another process holds its lock), "
                                  f"with no {GENERATOR_EXPORT}/ yet; wait until it finishes{usable}")
        raise CheckpointError(f"{path} is a train-generator run with no {GENERATOR_EXPORT}/ yet (it stopped before its "
                              f"last step); rerun the same train-generator command to finish it (it continues from "
                              f"its last checkpoint){usable}")
