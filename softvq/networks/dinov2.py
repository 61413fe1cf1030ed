"""The DINOv2 ViT (Oquab et al. 2023), our own implementation, which also holds DINO v1 ViTs.

Used frozen, twice in SoftVQ-VAE training: as the representation-alignment target (paper
Sec. 3.3, Eq. 6; Tab. 4 compares DINOv2-B/L, CLIP, EVA) and, as DINO v1 ViT-S/16, inside the
discriminator (supplementary C.1). The paper also initialises the encoder from DINOv2 (Sec. 4.1;
:func:`init_encoder_from_dino`).

Architecture (matching the official ``dinov2.models.vision_transformer`` key layout one to one):

    patch_embed.proj (conv p x p, stride p) -> [cls, registers, patches] (+ pos_embed on cls and
    patches; registers take none) -> blocks (pre-LN, fused qkv, LayerScale ls1/ls2, MLP or
    SwiGLU for ViT-g) -> norm

Sizes: ViT-S/14 384x12 (6 heads), B/14 768x12 (12), L/14 1024x24 (16), g/14 1536x40 (24, SwiGLU);
position embeddings are stored for a 518-px image (37x37 grid) and bicubically resized with
DINOv2's +0.1 offset for other grids. DINO v1 checkpoints (e.g. ``dino_deitsmall16_pretrain.pth``)
have the same key names without ``ls1``/``ls2``/``register_tokens`` (a 224-px, 14x14 grid).

Key layouts accepted by :func:`load_dino`:

* official DINOv2 / DINO v1 ``.pth`` (``blocks.{i}.attn.qkv.weight`` ...): used as is;
  ``mask_token`` (iBOT masking, unused at inference) and DINO heads ``head.*`` are ignored.
* timm (``timm/vit_*_dinov2*`` on the hub): as official, ``reg_token`` -> ``register_tokens``.
* Hugging Face transformers (``facebook/dinov2-*``): ``embeddings.*``, ``encoder.layer.{i}.*``
  with separate ``attention.attention.{query,key,value}`` (or, in transformers 5 state dicts,
  ``attention.{q,k,v}_proj``), concatenated here into ``attn.qkv`` in q, k, v order;
  ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``; ``layernorm`` -> ``norm``;
  ViT-g's ``mlp.weights_in``/``weights_out`` -> ``mlp.w12``/``w3``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softvq.checkpoint.pretrained import CheckpointError, read_state_dict
from softvq.checkpoint.specs import looks_like_hub_id
from softvq.messages import first_few
from softvq.networks.vit import Block

if TYPE_CHECKING:
    from softvq.networks.encoder import TokenEncoder

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Official release files (torch hub), fetched only when a user is online and names them.
HUB_URLS: dict[str, str] = {
    **{f"dinov2_vit{s}14": f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14_pretrain.pth"
       for s in "sblg"},
    **{f"dinov2_vit{s}14_reg": f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14_reg4_pretrain.pth"
       for s in "sblg"},
    "dino_vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vits8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vitb16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dino_vitb8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}

SIZES: dict[str, tuple[int, int, int]] = {  # name: (width, depth, heads)
    "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24),
}


@dataclass
class DinoConfig:
    """Shape of a DINO / DINOv2 ViT. Defaults: DINOv2 ViT-S/14."""

    width: int = 384
    depth: int = 12
    heads: int = 6
    patch_size: int = 14
    pos_grid: int = 37  # stored position-embedding grid (518 px / 14; DINO v1: 224 / 16 = 14)
    registers: int = 0
    layerscale: bool = True  # DINOv2 yes, DINO v1 no
    swiglu: bool = False  # ViT-g/14
    norm_eps: float = 1e-6
    interpolate_offset: float = 0.1

    @classmethod
    def named(cls, size: str, *, registers: int = 0) -> "DinoConfig":
        """The config of a DINOv2 size (``s``, ``b``, ``l``, ``g``)."""
        width, depth, heads = SIZES[size]
        return cls(width, depth, heads, registers=registers, swiglu=size == "g")


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU FFN (ViT-g): w3(silu(a) * b) with [a, b] = w12(x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _PatchEmbed(nn.Module):
    """Holds ``proj`` under the official key ``patch_embed.proj``."""

    proj: nn.Conv2d  # set by DinoViT


class DinoViT(nn.Module):
    """DINO / DINOv2 vision transformer (eval use; no dropout, no drop-path)."""

    mean: Tensor  # buffers registered in __init__
    std: Tensor

    def __init__(self, config: DinoConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or DinoConfig()
        self.patch_size = c.patch_size
        self.num_registers = c.registers
        self.patch_embed = _PatchEmbed()
        self.patch_embed.proj = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.pos_grid**2, c.width))
        if c.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, c.registers, c.width))
        blocks = []
        for _ in range(c.depth):
            block = Block(c.width, c.heads, layerscale_init=1.0, norm_eps=c.norm_eps)
            if not c.layerscale:
                block.ls1, block.ls2 = nn.Identity(), nn.Identity()
            if c.swiglu:
                block.mlp = SwiGLU(c.width, 4 * c.width)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        """Feature width."""
        return self.config.width

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [−1, 1] -> ImageNet-normalised input, as DINO / DINOv2 were trained on."""
        return ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, 1 + h*w, C) embedding for a ``grid`` of patches (DINOv2's bicubic resize, +0.1 offset)."""
        stored = self.config.pos_grid
        if tuple(grid) == (stored, stored):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        square = patches.reshape(1, stored, stored, -1).permute(0, 3, 1, 2).float()
        off = self.config.interpolate_offset
        if off:
            scale = ((grid[0] + off) / stored, (grid[1] + off) / stored)
            resized = F.interpolate(square, scale_factor=scale, mode="bicubic", align_corners=False)
        else:
            resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
        if tuple(resized.shape[-2:]) != tuple(grid):  # rounding of the scale factor
            resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
        resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(patches.dtype)
        return torch.cat([cls, resized], dim=1)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Normalised images -> token sequence [cls, registers, patches] before the blocks."""
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DINO input {h}x{w} is not a multiple of its patch size {p}; resize it first")
        grid = (h // p, w // p)
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self.position_embedding(grid)
        if self.num_registers:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        return tokens, grid

    def intermediate(self, x: Tensor, taps: tuple[int, ...]) -> list[Tensor]:
        """Full token sequences (B, 1+R+N, C) at ``taps``: −1 is the embedding, i the output of
        block i (0-based, no final norm). Stops after the deepest tap."""
        tokens, _ = self.embed(x)
        wanted = set(taps)
        out = {-1: tokens} if -1 in wanted else {}
        for i, block in enumerate(self.blocks):
            if i > max(taps):
                break
            tokens = block(tokens)
            if i in wanted:
                out[i] = tokens
        return [out[t] for t in taps]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Normalised images -> final-normed ``cls`` (B, C), ``registers`` (B, R, C) and
        ``patches`` (B, N, C) in row-major patch order (DINOv2's ``x_norm_*`` outputs)."""
        tokens, _ = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        r = self.num_registers
        return {"cls": tokens[:, 0], "registers": tokens[:, 1 : 1 + r], "patches": tokens[:, 1 + r :]}


# --- checkpoints -------------------------------------------------------------------------------

IGNORED_PREFIXES = ("mask_token", "head.", "embeddings.mask_token", "pooler.")


def _from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` keys -> official keys (see the module docstring)."""
    out: dict[str, Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
    }
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("dinov2.")
        if key in simple:
            out[simple[key]] = value
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if not m:
            out[key] = value  # reported as unexpected by the strict load, if not ignored
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name.startswith("attention.attention."):  # checkpoint files
            qkv.setdefault((i, kind), {})[name.rsplit(".", 1)[-1]] = value
        elif name in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):  # transformers >= 5 in memory
            qkv.setdefault((i, kind), {})[{"q": "query", "k": "key", "v": "value"}[name[-6]]] = value
        elif name in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{i}.ls{name[-1]}.gamma"] = value
        elif name in layer:
            out[f"blocks.{i}.{layer[name]}.{kind}"] = value
        else:
            out[key] = value
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def normalize_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Any accepted layout -> official keys; returns (state, ignored keys)."""
    state = dict(state.get("teacher", state)) if isinstance(state.get("teacher"), dict) else dict(state)
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state):
        state = _from_transformers(state)
    # DINO v1 training checkpoints prefix "backbone." / "module."; timm calls the registers reg_token.
    state = {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in state.items()}
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    return {k: v for k, v in state.items() if k not in ignored}, ignored


def config_from_state_dict(state: dict[str, Tensor]) -> DinoConfig:
    """Infer the architecture from the tensors' shapes (no config file needed). The head count
    is width / 64: every released DINO and DINOv2 ViT uses 64-channel heads."""
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        positions = state["pos_embed"].shape[1] - 1
    except KeyError as exc:
        raise CheckpointError(f"not a DINO/DINOv2 ViT state dict (no {exc.args[0]!r})") from None
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = int(round(math.sqrt(positions)))
    return DinoConfig(
        width=width, depth=depth, heads=width // 64, patch_size=patch, pos_grid=grid,
        registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        layerscale="blocks.0.ls1.gamma" in state, swiglu="blocks.0.mlp.w12.weight" in state,
    )


def dino_from_state_dict(state: dict[str, Tensor], source: str = "state dict") -> DinoViT:
    """Build and strictly load a :class:`DinoViT` from any accepted layout."""
    from softvq.checkpoint.pretrained import load_strict

    state, ignored = normalize_state_dict(state)
    model = DinoViT(config_from_state_dict(state))
    load_strict(model, {k: v.float() for k, v in state.items()}, source)
    if ignored:
        log.info("%s: ignored keys not used at inference: %s", source, first_few(ignored, 6))
    return model.eval()


def load_dino(source: str | Path, fix: str = "pass the local file path") -> DinoViT:
    """A frozen-ready DINO/DINOv2 ViT from a local file or folder, a torch-hub name (see
    :data:`HUB_URLS`, e.g. ``dinov2_vitb14``, ``dino_vits16``) or a Hugging Face hub id
    (``facebook/dinov2-base``, ``timm/vit_base_patch14_dinov2.lvd142m``).

    ``fix`` ends the error for a failed download: it names the config key that named ``source``."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return dino_from_state_dict(read_state_dict(path), str(path))
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
            if (path / name).is_file():
                return dino_from_state_dict(read_state_dict(path / name), str(path / name))
        raise CheckpointError(f"{path} holds no model.safetensors / pytorch_model.bin / model.pth")
    if text in HUB_URLS:
        try:
            state = torch.hub.load_state_dict_from_url(HUB_URLS[text], map_location="cpu", progress=True)
        except Exception as exc:
            raise CheckpointError(
                f"could not download {text!r} ({type(exc).__name__}); offline, download "
                f"{HUB_URLS[text]} elsewhere and {fix}"
            ) from None
        return dino_from_state_dict(state, text)
    if looks_like_hub_id(text):
        from softvq.checkpoint.pretrained import resolve

        folder = resolve(text, ["model.safetensors", "pytorch_model.bin", "config.json"])
        return load_dino(folder)
    raise CheckpointError(
        f"no DINO weights at {text!r}: give a local .pth/.safetensors file or folder, a torch-hub "
        f"name ({', '.join(sorted(HUB_URLS))}) or a Hugging Face id such as facebook/dinov2-base"
    )


# --- encoder initialisation (paper Sec. 4.1) -------------------------------------------------

def resample_patch_kernel(kernel: Tensor, size: int) -> Tensor:
    """Resize a (O, I, p, p) patch-embedding kernel to ``size`` so that, on a bilinearly resized
    patch, it gives the same response (FlexiViT's pseudo-inverse resize; timm does this when a
    DINOv2 model is created at another patch size, as the release's patch-16 DINOv2 is)."""
    p = kernel.shape[-1]
    if p == size:
        return kernel
    basis = torch.eye(p * p, dtype=torch.float64).reshape(p * p, 1, p, p)
    resize = F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False)
    matrix = resize.reshape(p * p, size * size).T  # new_patch = matrix @ old_patch
    # want <x, k> = <matrix x, k'> for all x: k = matrix^T k'  ->  k' = pinv(matrix^T) k
    pinv = torch.linalg.pinv(matrix.T)
    flat = kernel.double().reshape(-1, p * p).T
    return (pinv @ flat).T.reshape(*kernel.shape[:2], size, size).to(kernel.dtype)


def dinov2_for_width(width: int) -> str:
    """Hub name of the DINOv2 an encoder of ``width`` can start from: the plain-MLP sizes S/B/L
    (ViT-g's SwiGLU blocks do not map onto ours). A ValueError lists the widths there are."""
    names = {w: f"dinov2_vit{size}14" for size, (w, _, _) in SIZES.items() if size != "g"}
    if width not in names:
        raise ValueError(f"no DINOv2 has the encoder's width {width} (only {', '.join(map(str, names))})")
    return names[width]


@torch.no_grad()
def init_encoder_from_dino(encoder: TokenEncoder, dino: DinoViT) -> list[str]:
    """Copy DINOv2 weights into a :class:`~softvq.networks.encoder.TokenEncoder` (paper Sec. 4.1:
    "we initialize our encoder from the pre-trained DINOv2 weights"). Returns the copied names.

    Mapping: ``patch_embed.proj`` -> ``patch_embed`` (kernel resampled when the patch sizes
    differ), ``cls_token`` -> ``cls_token``, ``pos_embed`` (cls row kept, grid resized to the
    encoder's grid) -> ``pos_embed``, ``blocks.{i}`` -> ``blocks.{i}`` for every encoder block,
    ``norm`` -> ``norm``. The latent tokens and their position embedding stay as initialised;
    registers are not used. Needs equal width and heads and at least as many DINO blocks.
    """
    blocks = encoder.blocks
    width = encoder.cls_token.shape[-1]
    heads = cast(Block, blocks[0]).attn.heads  # ModuleList is untyped; stack_blocks fills it with Blocks
    c = dino.config
    if c.width != width or c.heads != heads or c.swiglu:
        raise ValueError(
            f"cannot initialise a width-{width}/{heads}-head encoder from DINO width {c.width}/{c.heads} heads"
            f"{' (SwiGLU)' if c.swiglu else ''}; pick the DINOv2 size with the same width (S=384, B=768, L=1024)"
        )
    if c.depth < len(blocks):
        raise ValueError(f"the encoder has {len(blocks)} blocks but the DINO model only {c.depth}")
    copied = []
    encoder.patch_embed.weight.copy_(resample_patch_kernel(dino.patch_embed.proj.weight, encoder.patch_embed.weight.shape[-1]))
    assert encoder.patch_embed.bias is not None and dino.patch_embed.proj.bias is not None  # both built with bias
    encoder.patch_embed.bias.copy_(dino.patch_embed.proj.bias)
    encoder.cls_token.copy_(dino.cls_token)
    encoder.pos_embed.copy_(dino.position_embedding(encoder.grid))
    copied += ["patch_embed", "cls_token", "pos_embed"]
    for i, block in enumerate(blocks):
        source = dino.blocks[i].state_dict()
        if not c.layerscale:  # DINO v1: identity residual scaling
            source["ls1.gamma"] = torch.ones(width)
            source["ls2.gamma"] = torch.ones(width)
        block.load_state_dict(source, strict=True)
        copied.append(f"blocks.{i}")
    encoder.norm.load_state_dict(dino.norm.state_dict())
    copied.append("norm")
    return copied
