"""``softvq info`` for what generation writes: a latent set (``pretokenize``) and a generator
(``train-generator``'s export, its run folder, or one of its checkpoints).

A latent set is described from its ``meta.json`` alone (no shard is read); a generator is loaded
to count its parameters, and its per-sample forward multiply-accumulates are counted on the meta
device, the "GFLOPs" of paper Tab. 1 and ``softvq bench gen``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from softvq.cli.info import millions, table
from softvq.messages import first_few


def describe_latent_set(folder: str | Path) -> str:
    """The ``softvq info`` table of a finished latent set, from its ``meta.json``."""
    from softvq.generation.latents import META_NAME

    meta: dict[str, Any] = json.loads((Path(folder).expanduser() / META_NAME).read_text())
    classes = list(meta.get("classes") or [])
    counts = meta.get("class_counts")
    spread = ""
    if counts and len(counts) > 1:
        spread = f"; {min(counts):,}{'' if min(counts) == max(counts) else f' to {max(counts):,}'} images per class"
    sha1 = meta.get("tokenizer_sha1")
    skipped = meta.get("skipped") or []  # the unreadable files, each with its reason
    skipped = len(skipped) if isinstance(skipped, list) else int(skipped)
    rows = [
        ("latent set", f"{folder} (softvq pretokenize)"),
        ("images", f"{meta.get('count', 0):,}" + (f" ({skipped:,} unreadable, skipped)" if skipped else "")),
        ("latents (L x D)", f"{meta.get('num_tokens')} x {meta.get('latent_dim')} per image, of "
                            f"{meta.get('image_size')} px images"),
        ("classes", f"{len(classes)}: {first_few(classes)}{spread}" if classes else "none"),
        ("latent mean / std", f"{float(meta['latent_mean']):g} / {float(meta['latent_std']):g} (generators train "
                              f"on (z - mean) / std)"),
        ("tokenizer", f"{meta.get('tokenizer') or 'not recorded: pass generate --tokenizer'}"
                      + (f" (weights sha1 {sha1[:10]})" if sha1 else "")
                      + (f", encoded in {meta['tokenizer_precision']}" if meta.get("tokenizer_precision") else "")),
        ("shards", str(len(meta.get("shards") or []))),
    ]
    return table(rows)


def _step(path: Path) -> int | str | None:
    """The training step of the generator at ``path`` (an export, a run, or ``step-N.pt``)."""
    from softvq.generation.checkpoint import generator_run_export
    from softvq.generation.run_folder import exported_step
    from softvq.training.checkpointing import checkpoint_step

    if path.is_file():
        return checkpoint_step(path)
    step = exported_step(generator_run_export(path) or path)
    return None if step == "unknown" else step  # saved by save_generator without a step


def _objective_line(meta: Any, config: Any) -> str:
    if meta.objective == "sit":
        return f"SiT: velocity of the {meta.path} interpolant"
    if meta.objective == "dit":
        sigma = " and the learned variance" if config.sigma_learned else ""
        return f"DiT: noise ε{sigma}, {meta.schedule} schedule, T = {meta.diffusion_steps}"
    return (f"MAR: masked autoregressive, a {config.head_depth}-block diffusion head {config.head_width} wide "
            f"({config.schedule} schedule, T = {config.diffusion_steps})")


def describe_generator(spec: str) -> str:
    """The ``softvq info`` table of a generator: what it models, its size, parameters, one forward
    pass's GFLOPs, its classes and the tokenizer that decodes its samples. A run that has not
    exported yet is described by its newest checkpoint (the EMA weights sampling would use)."""
    from softvq.generation.checkpoint import folder_kind, load_generator
    from softvq.generation.flops import count_macs, count_mar_macs
    from softvq.generation.mar import MARConfig
    from softvq.training.checkpointing import latest_checkpoint

    path, unfinished = Path(spec).expanduser(), ""
    if folder_kind(path) == "unfinished generator run" and (newest := latest_checkpoint(path)) is not None:
        path, unfinished = newest, f", no export yet: its newest checkpoint {newest.name}"
    model, meta = load_generator(path, "cpu", tokenizer_flag="a tokenizer SPEC")
    c = model.config
    step = _step(path)
    tokens = f"{c.num_tokens} latent tokens x {c.latent_dim} channels (1D)"
    if isinstance(c, MARConfig):
        shape, blocks = tokens, f"{c.depth} + {c.depth} (encoder + decoder)"
        macs, per = count_mar_macs(c), "one sampling step (MAR Tab. 1's convention)"
    else:
        shape, blocks = tokens, str(c.depth)
        if c.layout == "2d":
            shape = (f"a {c.grid}x{c.grid} latent grid of {c.latent_dim} channels, patch {c.patch_size} -> "
                     f"{c.sequence_length} tokens (2D)")
        macs, per = count_macs(c), "one forward pass"
    guided = c.class_dropout > 0  # sampling's rule: MAR keeps a null row even without label dropout
    sha1 = meta.tokenizer_sha1
    rows = [
        ("generator", f"{spec}" + (f" (step {step}{unfinished})" if step is not None else "")),
        ("objective", _objective_line(meta, c)),
        ("input", shape),
        ("transformer", f"width {c.width}, depth {blocks}, heads {c.heads}, MLP ratio {c.mlp_ratio:g}"),
        ("params", millions(model.num_parameters())),
        ("GFLOPs", f"{macs.total / 1e9:.4g} per image for {per} (multiply-accumulates, as paper Tab. 1 "
                   f"and bench gen count them)"),
        ("classes", f"{c.num_classes}" + (f": {first_few(meta.classes)}" if meta.classes else "")),
        ("guidance", f"null class {c.num_classes} (label dropout {c.class_dropout:g}): classifier-free guidance "
                     f"works" if guided else "trained without label dropout: no classifier-free guidance"),
        ("latent mean / std", f"{meta.latent_mean:g} / {meta.latent_std:g} (samples are de-normalised with them)"),
        ("tokenizer", f"{meta.tokenizer or 'not recorded: pass generate --tokenizer'}"
                      + (f" (weights sha1 {sha1[:10]})" if sha1 else "")),
    ]
    return table(rows)
