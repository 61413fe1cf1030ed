"""Load the released SoftVQ-VAE checkpoints (``SoftVQVAE/softvq-*`` on the Hugging Face hub).

A release folder holds ``config.json`` (the training code's flat ``ModelArgs``) and
``model.safetensors`` in the research code's key layout (timm ViTs under ``.model``). This module

1. infers the architecture from the tensors (widths, depths, MLP ratio, patch, grid, tokens,
   latent dim, codebook count and size) and from ``config.json`` (τ, latent statistics);
2. builds a :class:`~softvq.config.TokenizerConfig` with the *released* bottleneck semantics
   (cosine SoftVQ on L2-normalised vectors, detached codebook in the logits, entropy at
   temperature 0.01, one codebook per sequence segment; see ``softvq.config._released_bottleneck``);
3. renames every key to ours and loads **strictly**: a needed key the file lacks, or a key it
   has that nothing explains, is a :class:`CheckpointError` naming it. Keys that are known and
   not needed to encode or decode are ignored on purpose and listed (``Tokenizer.ignored_keys``).

Rename rules (release -> ours)::

    encoder.model.patch_embed.proj.*  -> encoder.patch_embed.*
    encoder.model.*                   -> encoder.*          (cls_token, pos_embed, blocks, norm)
    quant_conv.*                      -> to_latent.*
    quantize.embedding (S, K, D)      -> bottleneck.parts.{s}.codebook (K, D)   (S = 1: bottleneck.codebook)
    post_quant_conv.*                 -> from_latent.*
    decoder.to_pixel.model.*          -> decoder.to_pixel.*
    decoder.model.*                   -> decoder.*
    encoder.latent_tokens / latent_pos_embed, decoder.mask_token / latent_pos_embed: unchanged

Ignored on purpose: ``quantize.codebook_used`` (a usage counter), ``decoder.model.patch_embed.*``
(present in the file, never used by the decoder's forward pass), ``projection.*`` (the alignment
MLP of Sec. 3.3) and ``repa_model.*`` (the frozen alignment target encoder).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from softvq.checkpoint.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    latent_statistics,
    load_strict,
    read_state_dict,
    resolve,
    save_pretrained,
    usable_device,
)
from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig, preset
from softvq.messages import first_few

if TYPE_CHECKING:
    from softvq.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# (release prefix, our prefix), first match wins, so the more specific prefixes come first.
RENAMES: tuple[tuple[str, str], ...] = (
    ("encoder.model.patch_embed.proj.", "encoder.patch_embed."),
    ("encoder.model.", "encoder."),
    ("encoder.latent_tokens", "encoder.latent_tokens"),
    ("encoder.latent_pos_embed", "encoder.latent_pos_embed"),
    ("quant_conv.", "to_latent."),
    ("post_quant_conv.", "from_latent."),
    ("decoder.to_pixel.model.", "decoder.to_pixel."),
    ("decoder.model.", "decoder."),
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.latent_pos_embed", "decoder.latent_pos_embed"),
)

# Known keys that encoding and decoding do not need, with the reason shown to the user.
IGNORED: tuple[tuple[str, str], ...] = (
    ("quantize.codebook_used", "codebook usage counter"),
    ("decoder.model.patch_embed.", "decoder patch embedding, unused by the decoder's forward pass"),
    ("projection.", "alignment projector (training only)"),
    ("repa_model.", "frozen alignment target encoder (training only)"),
)

CODEBOOK_KEY = "quantize.embedding"
# Every released model uses 64-channel attention heads (timm ViT-S/B/L: 6/12/16 heads).
HEAD_DIM = 64
# Released defaults where config.json is silent (official-checkpoint-format.md).
RELEASED_TAU = 0.07
RELEASED_ENTROPY_TEMPERATURE = 0.01


@dataclass
class ConvertedState:
    """A state dict renamed to our layout plus what the conversion left out or filled in."""

    state: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)  # release keys dropped on purpose
    derived: list[str] = field(default_factory=list)  # our keys set from the config, not the file


def official_key(ours: str) -> str:
    """The release's name for one of our keys (used to name missing keys in errors)."""
    m = re.fullmatch(r"bottleneck\.(?:parts\.(\d+)\.)?codebook", ours)
    if m:
        return f"{CODEBOOK_KEY}[{m.group(1) or 0}]"
    # The longest matching prefix of ours is the specific rule ("decoder.to_pixel." before "decoder.").
    for theirs, mine in sorted(RENAMES, key=lambda rule: -len(rule[1])):
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    return ours


def _rename(key: str) -> str | None:
    for theirs, mine in RENAMES:
        if key.startswith(theirs):
            return mine + key[len(theirs):]
    return None


def _ignored_reason(key: str) -> str | None:
    for prefix, reason in IGNORED:
        if key.startswith(prefix):
            return reason
    return None


def _need(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the released checkpoint has no {key!r}; is it a SoftVQ-VAE ViT tokenizer?")
    return state[key]


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    keys: dict[int, int] = {}  # block index -> how many keys it has
    for k in state:
        if m := re.match(re.escape(prefix) + r"(\d+)\.", k):
            keys[int(m.group(1))] = keys.get(int(m.group(1)), 0) + 1
    if not keys:
        raise CheckpointError(f"the released checkpoint has no {prefix}* blocks")
    missing = sorted(set(range(max(keys) + 1)) - set(keys))
    if missing:
        raise CheckpointError(f"the released checkpoint lacks block(s) {missing} under {prefix}*")
    last = max(keys)
    full = min((n for i, n in keys.items() if i < last), default=0)
    if last > 0 and 2 * keys[last] < full:  # a block of mostly missing keys: a stray key reads better
        raise CheckpointError(f"{prefix}{last}.* has {keys[last]} of the {full} keys every other block has: a "
                              f"stray key, or a file cut inside its last block")
    return last + 1


def _vit(state: dict[str, torch.Tensor], stack: str, width: int, heads: int | None) -> ViTConfig:
    depth = _depth(state, f"{stack}.model.blocks.")
    # the MLP width of every block, so that one odd block is named, not the others it would make look wrong
    hiddens = [_need(state, f"{stack}.model.blocks.{i}.mlp.fc1.weight").shape[0] for i in range(depth)]
    hidden = max(set(hiddens), key=lambda h: (hiddens.count(h), h == 4 * width))  # a tie: the release's ratio 4
    odd = [i for i, h in enumerate(hiddens) if h != hidden]
    if odd:
        raise CheckpointError(f"{stack}.model.blocks.{odd[0]}.mlp.fc1.weight has {hiddens[odd[0]]} rows where "
                              f"{hiddens.count(hidden)} of the {depth} blocks have {hidden}: a damaged or "
                              f"mixed-up file")
    if heads is None:
        if width % HEAD_DIM:
            raise CheckpointError(
                f"cannot infer the {stack}'s attention heads: width {width} is not a multiple of "
                f"{HEAD_DIM}; pass {stack}_heads=..."
            )
        heads = width // HEAD_DIM
    return ViTConfig(width=width, depth=depth, heads=heads, mlp_ratio=hidden / width, norm_eps=1e-6)


def read_official_config(folder: Path) -> dict[str, Any]:
    """The release's ``config.json`` as a flat dict ({} when absent).

    ``PyTorchModelHubMixin`` writes the ``ModelArgs`` fields either flat or under ``"config"``.
    """
    file = folder / CONFIG_NAME
    if not file.exists():
        log.warning("%s has no %s: using the released defaults (tau %.2f, no latent statistics)",
                    folder, CONFIG_NAME, RELEASED_TAU)
        return {}
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    if meta.get("format") == "softvq-tokenizer":
        raise CheckpointError(f"{folder} is already in softvq's own format: load it with Tokenizer.from_pretrained "
                              f"(on the command line, drop the official: prefix)")
    flat = dict(meta)
    if isinstance(meta.get("config"), dict):
        flat.update(meta["config"])
    return flat


def infer_config(
    state: dict[str, torch.Tensor],
    official: dict[str, Any] | None = None,
    *,
    encoder_heads: int | None = None,
    decoder_heads: int | None = None,
    other_depths: bool = False,
) -> TokenizerConfig:
    """Our :class:`TokenizerConfig` for a state dict in the released layout.

    Shapes come from the tensors; heads are not stored in any tensor, so they are
    ``width // 64`` unless given; τ comes from ``config.json``'s ``tau`` (default 0.07).
    Depth is the highest block number plus one, so a file cut after a whole block would read as a
    shallower model: where the widths are a release's, its depths are required too, unless
    ``other_depths`` (a model trained at other depths: the research code takes them from timm's
    ``vit_small`` / ``vit_base`` / ``vit_large``, so only an edited copy makes one).
    """
    official = official or {}
    patch_w = _need(state, "encoder.model.patch_embed.proj.weight")
    enc_width, in_channels, patch, patch_b = patch_w.shape
    if patch != patch_b:
        raise CheckpointError(f"non-square patches {patch}x{patch_b} are not supported")
    grid_tokens = _need(state, "encoder.model.pos_embed").shape[1] - 1  # first row: cls position
    side = math.isqrt(grid_tokens)
    if side * side != grid_tokens:
        raise CheckpointError(f"encoder.model.pos_embed has {grid_tokens + 1} rows, not 1 + a square grid")
    num_tokens = _need(state, "encoder.latent_tokens").shape[1]
    dec_width = _need(state, "decoder.mask_token").shape[-1]
    pixels = _need(state, "decoder.to_pixel.model.weight").shape[0]
    if pixels != in_channels * patch * patch:
        raise CheckpointError(
            f"decoder.to_pixel.model.weight predicts {pixels} values per patch, but the encoder's "
            f"{patch}x{patch} patches of {in_channels} channels have {in_channels * patch * patch}"
        )
    latent_dim = _need(state, "quant_conv.weight").shape[0]
    book = _need(state, CODEBOOK_KEY)
    if book.dim() == 2:
        book = book.unsqueeze(0)
    if book.dim() != 3 or book.shape[-1] != latent_dim:
        raise CheckpointError(
            f"{CODEBOOK_KEY} has shape {tuple(book.shape)}; expected (codebooks, K, {latent_dim})"
        )
    for key, ours in _FORWARD_FIELDS.items():  # what the weights cannot tell: said only in config.json
        if key in official and official[key] != ours:
            raise CheckpointError(f"config.json: {key} {json.dumps(official[key])}: this checkpoint's forward pass "
                                  f"is not the released SoftVQ-VAE's, which softvq implements ({key} "
                                  f"{json.dumps(ours)}), so its outputs would be wrong; it cannot be loaded")
    if official.get("codebook_l2_norm") is False:
        raise CheckpointError("this release was trained without codebook_l2_norm; only the cosine "
                              "(l2-normalised) SoftVQ of the released models is supported")
    tau = _number(official, "tau", RELEASED_TAU)
    image_size = side * patch
    # config.json's own account of the shapes: the tensors decide, a disagreement is said
    for name, from_tensors in (("num_latent_tokens", num_tokens), ("codebook_embed_dim", latent_dim),
                               ("codebook_size", book.shape[1]), ("num_codebooks", book.shape[0])):
        if name in official and not _says(official[name], from_tensors):
            log.warning("config.json says %s %s but the weights have %s; using the weights'", name,
                        json.dumps(official[name]), from_tensors)
    if "image_size" in official and not _says(official["image_size"], image_size):
        log.warning("config.json says image_size %s but the position embeddings are for %d px; using %d",
                    json.dumps(official["image_size"]), image_size, image_size)
    encoder, decoder = _vit(state, "encoder", enc_width, encoder_heads), _vit(state, "decoder", dec_width, decoder_heads)
    if not other_depths:
        _refuse_short_of_a_release(encoder, decoder)
    return TokenizerConfig(
        image_size=image_size,
        patch_size=patch,
        num_tokens=num_tokens,
        in_channels=in_channels,
        encoder=encoder,
        decoder=decoder,
        bottleneck=BottleneckConfig(
            kind="softvq",
            latent_dim=latent_dim,
            codebook_size=book.shape[1],
            temperature=tau,
            distance="cosine",
            detach_codebook_in_logits=True,
            entropy_temperature=RELEASED_ENTROPY_TEMPERATURE,
            segments=book.shape[0],
        ),
    ).validate()


# The research code's ModelArgs fields that change the forward pass without changing any tensor's
# name or shape, at the released models' values: learned absolute positions, no rotary ones, cls
# tokens in both ViTs, a linear to_pixel head, ViT encoder and decoder.
_FORWARD_FIELDS: dict[str, Any] = {"use_rope": False, "use_ape": True, "enc_cls_token": True, "dec_cls_token": True,
                                   "to_pixel": "linear", "enc_type": "vit", "dec_type": "vit"}


def _says(value: Any, number: int) -> bool:
    """Whether a config.json field states ``number`` (also as "64" or 64.0: only a field the tensors
    contradict, or that is no number at all, is worth a warning)."""
    try:
        return not isinstance(value, bool) and float(value) == number
    except (TypeError, ValueError):
        return False


def _released_shapes() -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(encoder width, depth), (decoder width, depth) of the S, B, BL and L presets, which are the
    release's shapes (the format document's table)."""
    configs = [preset(f"softvq-{size}-64") for size in ("s", "b", "bl", "l")]
    return [((c.encoder.width, c.encoder.depth), (c.decoder.width, c.decoder.depth)) for c in configs]


def _refuse_short_of_a_release(encoder: "ViTConfig", decoder: "ViTConfig") -> None:
    """A file whose widths are a release's but whose block count is not: most likely cut short
    (the format asks a loader to fail on any missing key)."""
    shape = ((encoder.width, encoder.depth), (decoder.width, decoder.depth))
    for released in _released_shapes():
        widths_match = (released[0][0], released[1][0]) == (encoder.width, decoder.width)
        if widths_match and released != shape:
            raise CheckpointError(
                f"the file's blocks give encoder depth {encoder.depth} and decoder depth {decoder.depth}, but the "
                f"released model of these widths has {released[0][1]} and {released[1][1]}: the file lacks whole "
                f"blocks (download it again); a model trained at other depths loads in Python with "
                f"Tokenizer.from_official(..., other_depths=True), and its .save_pretrained(DIR) is a folder every "
                f"command takes")


def convert_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> ConvertedState:
    """Rename a released state dict to the keys of ``model`` (a :class:`Tokenizer`).

    Raises :class:`CheckpointError` naming (in the release's spelling) any key the file has that
    neither maps onto a key of ``model`` nor is a known extra. Keys the model needs but the file lacks are reported by :func:`load_official`.
    """
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key == CODEBOOK_KEY:
            out.update(_split_codebooks(value, own))
        elif _ignored_reason(key) is not None:
            ignored.append(key)
        elif (mine := _rename(key)) is not None and mine in own:
            out[mine] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"the released checkpoint has unexpected keys {first_few(sorted(unknown))}; softvq does "
                              f"not know what they are")
    # The temperature is fixed in the release and lives in config.json, not in the weights.
    derived = [k for k in own if k.startswith("bottleneck.") and k.endswith("log_temperature") and k not in out]
    for key in derived:
        out[key] = own[key].detach().clone()
    return ConvertedState(out, sorted(ignored), derived)


def _split_codebooks(embedding: torch.Tensor, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(S, K, D) -> one (K, D) codebook per sequence segment, as the model lays them out."""
    books = embedding.unsqueeze(0) if embedding.dim() == 2 else embedding
    parts = sorted((int(m.group(1)), k) for k in own if (m := re.fullmatch(r"bottleneck\.parts\.(\d+)\.codebook", k)))
    if parts:
        if len(parts) != books.shape[0]:
            raise CheckpointError(
                f"{CODEBOOK_KEY} holds {books.shape[0]} codebooks but the model has {len(parts)} segments"
            )
        return {key: books[i].clone() for i, key in parts}
    if "bottleneck.codebook" in own:
        if books.shape[0] != 1:
            raise CheckpointError(
                f"{CODEBOOK_KEY} holds {books.shape[0]} per-segment codebooks but this build of softvq "
                f"made a single-codebook bottleneck (segments not supported by build_bottleneck)"
            )
        return {"bottleneck.codebook": books[0].clone()}
    raise CheckpointError("the model's bottleneck has no codebook to receive quantize.embedding")


# The release's weights file, then the pickle PyTorchModelHubMixin wrote before safetensors.
RELEASE_WEIGHTS = (WEIGHTS_NAME, "pytorch_model.bin")


def looks_released(folder: str | Path) -> bool:
    """Whether a local folder holds a release's weights and no config.json of softvq's own format."""
    folder = Path(folder).expanduser()
    if not any((folder / name).is_file() for name in RELEASE_WEIGHTS):
        return False
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return True  # a release without config.json loads too
    return not (isinstance(meta, dict) and "format" in meta)


def release_weights(folder: Path) -> Path:
    """The weights file of a release folder, or a one-line error listing what the folder holds."""
    for name in RELEASE_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    held = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder} holds no {' or '.join(RELEASE_WEIGHTS)} (it holds: "
                          f"{first_few(held) or 'nothing'}); "
                          f"a release folder has config.json and model.safetensors (or pytorch_model.bin)")


def load_official(
    path_or_id: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    encoder_heads: int | None = None,
    decoder_heads: int | None = None,
    other_depths: bool = False,
) -> "Tokenizer":
    """Build a :class:`Tokenizer` from a released checkpoint folder or hub id, loading strictly.

    The returned model has ``ignored_keys`` (release keys dropped on purpose), ``latent_mean`` /
    ``latent_std`` from ``config.json``'s ``vq_mean`` / ``vq_std`` and is in eval mode.
    """
    from softvq.tokenizer import Tokenizer

    folder = resolve(path_or_id, [CONFIG_NAME, *RELEASE_WEIGHTS])
    weights = release_weights(folder)
    official = read_official_config(folder)
    state = read_state_dict(weights)
    config = infer_config(state, official, encoder_heads=encoder_heads, decoder_heads=decoder_heads,
                          other_depths=other_depths)
    with torch.random.fork_rng(devices=[]):  # a random initialisation the weights replace: leave the caller's stream
        model = Tokenizer(config)
    converted = convert_state_dict(state, model)
    missing = [k for k in model.state_dict() if k not in converted.state]
    if missing:
        names = [official_key(k) for k in missing]
        raise CheckpointError(f"{weights} is missing needed key(s) {first_few(names)}")
    load_strict(model, converted.state, str(weights), spelling=official_key)
    model.ignored_keys = converted.ignored
    model.source = f"released SoftVQ-VAE checkpoint {path_or_id}"
    if converted.ignored:
        log.info("ignored %d release key(s) not needed to encode or decode: %s",
                 len(converted.ignored), ", ".join(_summarise(converted.ignored)))
    if "vq_mean" in official or "vq_std" in official:  # the pair generators divide by: checked as from_pretrained does
        try:
            model.latent_mean, model.latent_std = latent_statistics(
                _number(official, "vq_mean", 0.0), _number(official, "vq_std", 1.0), "vq_mean / vq_std",
                fix="fix or remove them")
        except ValueError as exc:
            raise CheckpointError(f"{CONFIG_NAME}: {exc}") from None
    return model.to(usable_device(map_location)).eval()


def _number(official: dict[str, Any], key: str, default: float | None = None) -> float:
    """``config.json``'s ``key`` as a float, or a one-line error that names the field."""
    value = official.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{CONFIG_NAME}: {key} must be a number, got {json.dumps(value)}; fix or remove it")
    return float(value)


def _summarise(keys: list[str]) -> list[str]:
    """Group ignored keys by their ignore rule: 'decoder.model.patch_embed.* (2 keys)'."""
    groups: dict[str, int] = {}
    for key in keys:
        prefix = next((p for p, _ in IGNORED if key.startswith(p)), key)
        label = prefix + "*" if prefix.endswith(".") else prefix
        groups[label] = groups.get(label, 0) + 1
    return [f"{label} ({n} key{'s' if n > 1 else ''})" for label, n in groups.items()]


def ignored_summary(keys: list[str]) -> list[str]:
    """Human-readable lines for ignored keys, each with the reason it is not needed."""
    reasons = dict(IGNORED)
    lines = []
    for item in _summarise(keys):
        prefix = item.split(" (")[0].rstrip("*")
        lines.append(f"{item}: {reasons.get(prefix, 'not needed')}")
    return lines


def convert_official(src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """Convert a released checkpoint (folder or hub id) to softvq's own format in ``dst``."""
    model = load_official(src, **kwargs)
    return save_pretrained(model, dst)
