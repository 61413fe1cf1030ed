"""``softvq info [SPEC] [--save DIR]``: what a tokenizer is and how much it compresses.

``softvq info CONFIG [KEY=VALUE ...]`` checks a training config whole (every section, as ``train``
does) and describes its model without training or writing anything.

Without SPEC, one line per preset and a legend of the columns. With SPEC, a table: image and
token shapes, parameters of encoder / bottleneck / decoder, and the compression ratio, i.e. bits
of an 8-bit RGB image (H·W·3·8) over bits of its latents, plus pixels per token. The latents'
bits are L·D floats at 16 or 32 bits for softvq, gmmvq, kl and ae, and the bits of the discrete
code for lfq (one sign bit per channel, as WeTok counts) and vq (log2 K bits per index).
``--save DIR`` writes the model in softvq's format: with ``official:...`` this converts a
released checkpoint once so later loads skip the conversion.

``softvq info LATENTS`` describes a latent set (``pretokenize``'s output): images, shape, classes,
statistics, tokenizer; ``softvq info GENERATOR`` a generator (an export, its ``train-generator``
run, or ``RUN/checkpoints/step-N.pt``): objective, size, parameters, GFLOPs, classes, tokenizer.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from softvq.checkpoint.specs import OFFICIAL_PREFIX, is_preset
from softvq.cli.common import SPEC_HELP, load_tokenizer, refuse_to_overwrite, seed_int
from softvq.config import PRESETS, SOFT_KINDS, BottleneckConfig, TokenizerConfig
from softvq.tokenizer import Tokenizer


@dataclass
class Summary:
    """The numbers ``info`` prints, computed from a model (weights not needed)."""

    image_size: int
    patch_size: int
    num_tokens: int
    latent_dim: int
    encoder_params: int
    bottleneck_params: int
    decoder_params: int
    code_bits_per_token: float | None = None  # None: the latents are floats

    @property
    def total_params(self) -> int:
        """Encoder, bottleneck and decoder parameters together."""
        return self.encoder_params + self.bottleneck_params + self.decoder_params

    @property
    def image_bits(self) -> int:
        """Bits of one 8-bit RGB image at the model's resolution."""
        return self.image_size * self.image_size * 3 * 8

    def latent_bits(self, float_bits: int) -> int:
        """Bits of one image's latents stored as ``float_bits``-bit floats."""
        return self.num_tokens * self.latent_dim * float_bits

    def ratio(self, float_bits: int) -> float:
        """Compression of the raw image into latents stored as ``float_bits``-bit floats."""
        return self.image_bits / self.latent_bits(float_bits)

    @property
    def code_bits(self) -> float | None:
        """Bits of one image's discrete codes; None for a continuous bottleneck."""
        return None if self.code_bits_per_token is None else self.num_tokens * self.code_bits_per_token

    @property
    def code_ratio(self) -> float | None:
        """Compression of the raw image into discrete codes; None for a continuous bottleneck."""
        return None if self.code_bits is None else self.image_bits / self.code_bits

    @property
    def pixels_per_token(self) -> float:
        """Pixels each latent token stands for."""
        return self.image_size * self.image_size / self.num_tokens


def code_bits_per_token(b: BottleneckConfig) -> float | None:
    """Bits of one token's discrete code, or None where the latents are floats.

    lfq stores the sign of each channel (WeTok states compression in these bits); vq one index of
    log2 K bits per channel group and residual level (segments only pick the codebook). softvq and
    gmmvq mix codewords with soft weights, and kl and ae pass floats: no code to count."""
    if b.kind == "lfq":
        return float(b.latent_dim)
    if b.kind == "vq":
        return b.groups * b.residual_levels * math.log2(b.codebook_size)
    return None


def _count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def summarize(model: Tokenizer) -> Summary:
    """Parameter split: encoder (+ projection to the latent), bottleneck, decoder (+ projection back)."""
    c = model.config
    return Summary(
        image_size=c.image_size, patch_size=c.patch_size, num_tokens=c.num_tokens,
        latent_dim=model.latent_dim,
        encoder_params=_count(model.encoder, model.to_latent),
        bottleneck_params=_count(model.bottleneck),
        decoder_params=_count(model.from_latent, model.decoder),
        code_bits_per_token=code_bits_per_token(c.bottleneck),
    )


def architecture(config: TokenizerConfig) -> Tokenizer:
    """A model on the meta device: shapes and parameter counts without allocating weights."""
    with torch.device("meta"):
        return Tokenizer(config)


def _lfq_line(b: BottleneckConfig) -> str:
    """LFQ has no learned codebook: name its groups of sign channels and the implicit codes."""
    groups = b.groups * b.lfq_groups
    bits = b.latent_dim // groups
    channels = "1 sign channel" if bits == 1 else f"{bits} sign channels"
    if groups == 1:
        text = f"lfq, {channels} (2^{bits} = {2**bits} implicit codes)"
    else:
        text = (f"lfq, {groups} groups of {channels} "
                f"(2^{bits} = {2**bits} implicit codes each; 2^{b.latent_dim} per token)")
    if b.groups > 1:
        text += f", as {b.groups} channel groups (PQ) x lfq_groups {b.lfq_groups}"
    if b.segments > 1:  # each segment has its own entropy term; the codes are the same fixed ones
        text += f", {b.segments} sequence segments (entropy per segment, no extra codebooks)"
    if b.lfq_entropy == "pooled":
        text += ", entropy pooled over the groups (the released GFQ)"
    return text


def _bottleneck_line(model: Tokenizer) -> str:
    b = model.config.bottleneck
    if b.kind == "lfq":
        return _lfq_line(b)
    text: str = b.kind
    if b.kind in SOFT_KINDS:
        text += f", {b.distance} distance, tau {b.temperature:g}{' (learnable)' if b.learnable_temperature else ''}"
    if model.bottleneck.codebook_size:
        text += f", K = {model.bottleneck.codebook_size} codewords"
    for name, value, what in (("segments", b.segments, "sequence-segment codebooks (release)"),
                              ("groups", b.groups, "channel groups (PQ)"),
                              ("residual_levels", b.residual_levels, "residual levels (RQ)")):
        if value > 1:
            text += f", {value} {what}"
    return text


def _bits(n: float) -> str:
    """A bit count: whole (log2 K is whole for the usual power-of-two K), else to a tenth."""
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _size_rows(s: Summary, b: BottleneckConfig) -> list[tuple[str, str]]:
    """Latent bits and compression: code bits for discrete latents, else floats at 32 and 16 bits."""
    if s.code_bits is None:
        return [("latent bits", f"{s.latent_bits(32):,} at 32-bit, {s.latent_bits(16):,} at 16-bit (L*D floats)"),
                ("compression", f"{s.ratio(32):.1f}x at 32-bit, {s.ratio(16):.1f}x at 16-bit")]
    if b.kind == "lfq":
        how = f"L*D = {s.num_tokens} x {s.latent_dim} sign bits: each channel is +1 or -1"
    else:
        indices = b.groups * b.residual_levels
        how = (f"L x {indices} code ind{'ices' if indices > 1 else 'ex'} per token, "
               f"log2 K = {math.log2(b.codebook_size):.3g} bits each")
    return [("latent bits", f"{_bits(s.code_bits)} ({how})"),
            ("compression", f"{s.code_ratio:.1f}x (code bits)")]


def millions(n: int) -> str:
    """A parameter count in millions, with the exact count: "1.23 M (1,234,567)"."""
    return f"{n / 1e6:.2f} M ({n:,})"


def table(rows: list[tuple[str, str]]) -> str:
    """Two columns, names left-aligned to the longest."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def describe(model: Tokenizer, source: str) -> str:
    """The ``softvq info`` table of a tokenizer: layout, parameters, compression and FLOPs."""
    s = summarize(model)
    grid = s.image_size // s.patch_size
    rows = [
        ("model", source),
        ("image", f"{s.image_size}x{s.image_size} px, patch {s.patch_size} -> {grid * grid} image tokens"),
        ("latents (L x D)", f"{s.num_tokens} x {s.latent_dim}"),
        ("encoder / decoder", f"width {model.config.encoder.width} depth {model.config.encoder.depth} heads "
                              f"{model.config.encoder.heads} / width {model.config.decoder.width} depth "
                              f"{model.config.decoder.depth} heads {model.config.decoder.heads}"),
        ("bottleneck", _bottleneck_line(model)),
        ("params encoder", millions(s.encoder_params)),
        ("params bottleneck", millions(s.bottleneck_params)),
        ("params decoder", millions(s.decoder_params)),
        ("params total", millions(s.total_params)),
        ("image bits", f"{s.image_bits:,} (H*W*3*8)"),
        *_size_rows(s, model.config.bottleneck),
        ("pixels per token", f"{s.pixels_per_token:g}"),
    ]
    if model.config.decoder_noise_dim:
        rows.insert(5, ("decoder noise", f"{model.config.decoder_noise_dim} Gaussian channels per token "
                                          f"(WeTok generative decoder)"))
    if model.latent_mean is not None:
        rows.append(("latent mean / std", f"{model.latent_mean:g} / {model.latent_std:g}"))
    ignored = model.ignored_keys
    if ignored:
        from softvq.checkpoint.official import ignored_summary

        rows += [("ignored keys" if i == 0 else "", line) for i, line in enumerate(ignored_summary(ignored))]
    return table(rows)


def _legend(discrete: bool) -> list[str]:
    """What the overview's columns mean; ``discrete``: some row has code bits (the x codes column)."""
    lines = ["K: codewords per codebook; each sequence segment and channel group has its own "
             "(lfq: 2^(channels per group) fixed codes)",
             "x 32-bit, x 16-bit: image bits (H*W*3*8) over the latents' bits as L*D floats of 32 / 16 bits"]
    if discrete:
        lines[-1] += " (- for discrete latents)"
        lines.append("x codes: image bits over the discrete code's bits (lfq: 1 per channel; vq: log2 K per index)")
    return lines + ["px/token: image pixels per latent token"]


def presets_table(configs: Mapping[str, TokenizerConfig] = PRESETS) -> str:
    """One row per config, then a legend of the columns (``x codes`` only when a row is discrete)."""
    models = {name: architecture(configs[name]) for name in sorted(configs)}
    summaries = {name: summarize(model) for name, model in models.items()}
    discrete = any(s.code_bits is not None for s in summaries.values())
    header = ("preset", "image", "patch", "L", "D", "K", "params", "x 32-bit", "x 16-bit",
              *(("x codes",) if discrete else ()), "px/token")
    lines = [header]
    for name, s in summaries.items():
        floats = ("-", "-") if s.code_bits is not None else (f"{s.ratio(32):.1f}", f"{s.ratio(16):.1f}")
        codes = (f"{s.code_ratio:.1f}" if s.code_bits is not None else "-",) if discrete else ()
        lines.append((name, str(s.image_size), str(s.patch_size), str(s.num_tokens), str(s.latent_dim),
                      str(models[name].bottleneck.codebook_size or "-"), f"{s.total_params / 1e6:.2f} M",
                      *floats, *codes, f"{s.pixels_per_token:g}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    return "\n".join(table + [""] + _legend(discrete))


def is_training_config(spec: str) -> bool:
    """A YAML file, or a bundled training config's name that is not a preset's (a preset's config
    builds the preset's own model) nor an existing checkpoint folder."""
    from softvq.training.config import CONFIG_DIR

    if spec.endswith((".yaml", ".yml")):
        return True
    return not is_preset(spec) and not Path(spec).exists() and (CONFIG_DIR / f"{spec}.yaml").is_file()


def _is_generator_checkpoint(file: Path) -> bool:
    """Whether a ``.pt`` file is a train-generator checkpoint: by its run folder (the path as
    written or resolved: a bare name inside RUN/checkpoints, a symlink), else by its contents (a
    checkpoint copied out of its run)."""
    from softvq.checkpoint.pretrained import checkpoint_run
    from softvq.generation.checkpoint import RUN_KINDS, folder_kind, holds_generator_checkpoint

    for where in (Path(os.path.abspath(file)), file.resolve()):
        if folder_kind(where.parent.parent) in RUN_KINDS:
            return True
        if checkpoint_run(where) is not None:
            return False
    try:
        # mapped, not read: only the keys are looked at, and describing it loads the file again
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or not a checkpoint: the tokenizer loader names it
        return False
    return holds_generator_checkpoint(state)


def _generation_kind(spec: str) -> str | None:
    """``"latent set"`` or ``"generator"`` where ``spec`` is what pretokenize or train-generator
    wrote (a generator's export, its run, or a checkpoint of the run); None for anything else. An
    unfinished latent set is refused, naming how to finish it."""
    from softvq.generation.checkpoint import RUN_KINDS, folder_kind
    from softvq.generation.latents import META_NAME, PROGRESS_GLOB

    path = Path(spec).expanduser()
    if path.is_file():
        return "generator" if path.suffix == ".pt" and _is_generator_checkpoint(path) else None
    kind = folder_kind(path)
    if kind == "latent set":
        return kind
    if kind == "generator" or kind in RUN_KINDS:
        return "generator"
    if path.is_dir() and not (path / META_NAME).exists() and any(path.glob(PROGRESS_GLOB)):
        raise ValueError(f"{spec} is an unfinished latent set (pretokenize was interrupted); rerun the same "
                         f"pretokenize command to finish it, then describe it")
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="parameters, tokens and compression ratio of a model; "
                              "what a latent set or generator holds",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP + "; or a training config (a bundled name such "
                   "as ablation-pq4, or a .yaml file), checked whole without training; or a latent set (pretokenize) or "
                   "generator (train-generator's export, run or checkpoint); omit to list the presets")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with a training config: overrides, as for train")
    p.add_argument("--save", metavar="DIR", help=f"write the model in softvq's format (converts {OFFICIAL_PREFIX}...)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random weights when saving a preset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.spec is None:
        if args.save:
            raise ValueError("--save needs a SPEC to save")
        print(presets_table())
        return 0
    generation = _generation_kind(args.spec)
    if generation is not None:
        if args.save or args.overrides:
            raise ValueError(f"{args.spec} is a {generation}: info describes it as it is (--save and overrides "
                             f"are for tokenizers and training configs); drop them")
        from softvq.cli.info_generation import describe_generator, describe_latent_set

        print(describe_latent_set(args.spec) if generation == "latent set" else describe_generator(args.spec))
        return 0
    if args.save:  # refused before a release is loaded and converted
        from softvq.checkpoint.pretrained import CONFIG_NAME, FORMAT, WEIGHTS_NAME, check_folder_takes

        check_folder_takes(Path(args.save).expanduser(), FORMAT)
        refuse_to_overwrite([Path(args.save) / WEIGHTS_NAME, Path(args.save) / CONFIG_NAME],
                            "choose another --save folder")
    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise ValueError(f"unexpected argument {stray[0]!r}: after SPEC, info takes only key=value overrides "
                         f"of a training config")
    if is_training_config(args.spec) or args.overrides:
        if args.save:
            raise ValueError("--save writes a model's weights; a training config has none: train it, or pass a preset")
        from softvq.training.config import load_config

        cfg = load_config(args.spec, args.overrides)  # every section checked, as train checks it
        print(describe(architecture(cfg.model), f"config {args.spec} (architecture only; every setting valid)"))
        s, o = cfg.schedule, cfg.optim
        print(f"training: {s.steps} steps at batch {s.batch_size} (grad_accum {s.grad_accum}), lr {o.lr:g}"
              f"{' x batch/256' if o.scale_lr else ''}, warm-up {s.warmup_steps} steps; data: {cfg.data.source}"
              f"{' ' + str(cfg.data.path) if cfg.data.source != 'bundled' else ''}"
              f"{'; frozen: ' + ', '.join(cfg.run.freeze) if cfg.run.freeze else ''}")
        return 0
    if is_preset(args.spec) and not args.save:
        model = architecture(PRESETS[args.spec.lower()])
        source = f"preset {args.spec.lower()} (architecture only, no weights)"
    else:
        torch.manual_seed(args.seed)
        from softvq.checkpoint.pretrained import newest_run_checkpoint, training_run_export

        # a run not yet exported (still training, or stopped early) is described by its newest checkpoint
        newest = None if args.save or training_run_export(args.spec) else newest_run_checkpoint(args.spec)
        spec = str(newest) if newest else args.spec
        model = load_tokenizer(spec, "cpu", name_ignored_keys=False)  # its table lists them
        source = model.source + (" (the run has no export/ yet: its newest checkpoint)" if spec != args.spec else "")
    print(describe(model, source))
    if args.save:
        path = model.save_pretrained(args.save)
        print(f"wrote {path} in softvq's format; use it with --model {path}")
    return 0
