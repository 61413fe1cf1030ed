"""The SoftVQ-VAE tokenizer: ViT encoder -> bottleneck -> ViT decoder (paper Fig. 2).

    images (B,3,H,W) in [-1,1] --encoder--> ẑ (B,L,D) --bottleneck--> z (B,L,D) --decoder--> x̂

``to_latent`` / ``from_latent`` are the linear maps width -> D and D -> width (the release's
``quant_conv`` / ``post_quant_conv``).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from softvq.bottlenecks.base import BottleneckOutput, full_precision
from softvq.bottlenecks.factory import build_bottleneck
from softvq.config import PRESETS, TokenizerConfig, preset
from softvq.cpu_streams import split_over_cores
from softvq.messages import first_few
from softvq.networks.decoder import TokenDecoder
from softvq.networks.encoder import TokenEncoder
from softvq.precision import PRECISIONS, cpu_has_matrix_instructions
from softvq.resume import differences

_LOG = logging.getLogger(__name__)  # the CLI prints its warnings as "softvq: warning: ..."


class ImageRangeWarning(UserWarning):
    """Images given to a tokenizer lie in [0, 1], as ``torchvision``'s ``ToTensor`` makes them,
    where it takes [-1, 1]: they are valid values, so it is a warning, not an error."""


_FROM_SOFTVQ_LOADERS: ContextVar[bool] = ContextVar("images_from_softvq_loaders", default=False)


@contextmanager
def images_from_softvq_loaders() -> Iterator[None]:
    """Within it, the images given to tokenizers come from softvq's own loaders, in [-1, 1] by
    construction: a batch of bright images (all at or above mid-grey) raises no
    :class:`ImageRangeWarning`. Also a decorator."""
    token = _FROM_SOFTVQ_LOADERS.set(True)
    try:
        yield
    finally:
        _FROM_SOFTVQ_LOADERS.reset(token)


@dataclass
class Encoding:
    """Result of :meth:`Tokenizer.encode`.

    latents:  (B, L, D) the tokens (z); what a generator models and the decoder reads.
    features: (B, L, input_dim) the encoder projection before the bottleneck (ẑ).
    indices / probs: hard indices and soft posteriors where the bottleneck has them.
    losses / metrics: the bottleneck's unweighted losses and diagnostics.
    """

    latents: Tensor
    features: Tensor
    indices: Tensor | None = None
    probs: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TokenizerOutput:
    """Result of a full forward pass: the reconstruction and the encoding it came from."""

    reconstruction: Tensor
    encoding: Encoding


class Tokenizer(nn.Module):
    """A 1D image tokenizer. Build with :meth:`from_preset`, :meth:`from_pretrained` or
    :meth:`from_official`; see the README for the full API."""

    def __init__(self, config: TokenizerConfig | dict[str, Any]) -> None:
        """A randomly initialised tokenizer of ``config`` (a :class:`~softvq.config.TokenizerConfig` or
        its dict), in training mode as any new ``nn.Module``: call ``.eval()`` before inference, where
        the input checks also look at the values (NaN, [0, 255] pixels). :meth:`from_preset` and
        :meth:`from_pretrained` return it in eval mode."""
        super().__init__()
        if isinstance(config, dict):
            config = TokenizerConfig.from_dict(config)
        if not isinstance(config, TokenizerConfig):
            raise TypeError(f"Tokenizer takes a TokenizerConfig or a dict of its fields, got {config!r}; for a named "
                            f"preset use Tokenizer.from_preset, for a folder Tokenizer.from_pretrained")
        # its own copy: a shared one (softvq.PRESETS' own objects) edited through tok.config would
        # change the preset for every later tokenizer
        self.config = copy.deepcopy(config).validate()
        c = self.config
        self.encoder = TokenEncoder(
            c.encoder, image_size=c.image_size, patch_size=c.patch_size,
            num_tokens=c.num_tokens, in_channels=c.in_channels,
        )
        self.bottleneck = build_bottleneck(c.bottleneck)
        self.to_latent = nn.Linear(c.encoder.width, self.bottleneck.input_dim)
        self.from_latent = nn.Linear(self.bottleneck.latent_dim + c.decoder_noise_dim, c.decoder.width)
        self.decoder = TokenDecoder(
            c.decoder, image_size=c.image_size, patch_size=c.patch_size,
            num_tokens=c.num_tokens, out_channels=c.in_channels,
        )
        for linear in (self.to_latent, self.from_latent):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        with torch.no_grad():  # noise inputs start silent (WeTok Sec. 3.3)
            self.from_latent.weight[:, self.bottleneck.latent_dim:] = 0
        # Per-checkpoint latent statistics that generators normalise with: (z - mean) / std.
        self.latent_mean: float | None = None
        self.latent_std: float | None = None
        self.slice_size: int | None = None
        self.compute_dtype = torch.float32  # enable_autocast changes it
        self._said_emulated = False  # whether the slow emulated low precision on a CPU was warned of
        # Where the weights came from, for reports and messages (from_preset, from_pretrained and
        # from_official set it).
        self.source = "an in-memory Tokenizer"
        self.ignored_keys: list[str] = []  # release keys from_official dropped on purpose

    def enable_slicing(self, slice_size: int = 8) -> "Tokenizer":
        """Encode/decode large batches ``slice_size`` images at a time, bounding peak memory.

        Results equal the unsliced ones except for the bottleneck's batch-level statistics
        (losses/metrics are averaged over slices), which inference does not use.
        """
        if not isinstance(slice_size, numbers.Real) or isinstance(slice_size, bool) or int(slice_size) != slice_size \
                or slice_size < 1:
            raise ValueError(f"slice_size must be a positive number of images, got {slice_size!r}; "
                             "disable_slicing() turns slicing off")
        self.slice_size = int(slice_size)
        return self

    def disable_slicing(self) -> "Tokenizer":
        """Encode and decode whole batches again (undoes :meth:`enable_slicing`)."""
        self.slice_size = None
        return self

    def enable_autocast(self, dtype: torch.dtype | str = torch.bfloat16) -> "Tokenizer":
        """Run the encoder and decoder ViTs (and ``to_latent`` / ``from_latent``) under
        ``torch.autocast(device, dtype)``: mixed-precision inference, as the paper trains (bf16).

        Autocast runs the linear layers, attention and the patch convolution in ``dtype``; the
        residual stream, and so every LayerNorm's input, stays float32
        (:func:`softvq.networks.vit._residual` keeps the plain form under autocast), and the
        bottleneck always computes in float32. What leaves the model (latents, features, images)
        is float32. ``dtype``: ``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` or ``torch.float16`` /
        ``"fp16"`` / ``"float16"``; ``torch.float32`` / ``"fp32"`` / ``"float32"`` turns it off. In
        bf16 an H100 encodes softvq-s-64 3.5x and decodes it 4.8x faster than the fp32
        explicit-attention baseline at batch 64, and a 2-core CPU with AMX 2.2x and 2.7x at batch 8
        (README). A CPU without bf16 matrix instructions
        (AMX, AVX512-BF16) emulates it and is likely slower than float32.
        """
        if isinstance(dtype, str):
            by_name = {**PRECISIONS, **{str(d).removeprefix("torch."): d for d in PRECISIONS.values()}}
            if dtype not in by_name:  # "bf16" or torch's own name, "bfloat16"
                raise ValueError(f"unknown precision {dtype!r}; use one of {', '.join(by_name)}")
            dtype = by_name[dtype]
        if dtype not in PRECISIONS.values():
            raise ValueError(f"autocast runs in torch.bfloat16 or torch.float16 (torch.float32 turns it off), "
                             f"not {dtype!r}")
        self.compute_dtype = dtype
        return self

    def disable_autocast(self) -> "Tokenizer":
        """Compute in float32 again (undoes :meth:`enable_autocast`)."""
        self.compute_dtype = torch.float32
        return self

    @property
    def precision(self) -> str:
        """The compute precision of ``encode`` / ``decode``: ``fp32``, ``bf16`` or ``fp16``."""
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.compute_dtype)

    def _in_precision(self, network: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``network(x)``, under autocast when it is enabled, and then returned as float32 (in
        ``x``'s dtype: float64 for a float64 model), also under an autocast of the caller's own.
        Inference on a multi-core CPU runs one piece of the batch per core
        (:mod:`softvq.cpu_streams`): ``network`` reads each image alone."""
        return split_over_cores(lambda part: self._whole_in_precision(network, part), x)

    def _whole_in_precision(self, network: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.compute_dtype == torch.float32:
            y = network(x)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if x.device.type == "cpu" and not self._said_emulated and not cpu_has_matrix_instructions(self.precision):
            self._said_emulated = True  # once per tokenizer, at its first low-precision pass on a CPU
            _LOG.warning(f"this CPU has no {self.precision} matrix instructions (AMX or AVX512-"
                         f"{self.precision.upper()}): {self.precision} runs emulated and is likely slower than "
                         f"float32 (--precision fp32; from Python, Tokenizer.disable_autocast())")
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            return network(x).float()

    # returns self for chaining, where nn.Module.compile returns None
    def compile(self, *args: Any, **kwargs: Any) -> "Tokenizer":  # type: ignore[override]
        """``torch.compile`` the encoder and decoder ViTs, so ``encode``/``decode`` use them too.

        ``nn.Module.compile`` would only wrap ``forward``; ``encode`` and ``decode`` would stay
        eager. The bottleneck stays eager (its chunked soft assignment is a Python loop around a
        custom autograd function). Arguments go to ``torch.compile`` (e.g. ``mode="max-autotune"``).
        """
        self.encoder.compile(*args, **kwargs)
        self.decoder.compile(*args, **kwargs)
        return self

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Tokenizer":
        """A randomly initialised tokenizer of a named preset (``softvq.PRESETS``), in eval mode
        like :meth:`from_pretrained` (call ``.train()`` to train it yourself).

        ``overrides`` replace top-level config fields, e.g. ``num_tokens=32``; a dict is merged
        into a nested config, e.g. ``encoder={"depth": 2}`` keeps the encoder's other fields.
        """
        cfg = preset(name).to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        model = cls(TokenizerConfig.from_dict(cfg)).eval()
        model.source = f"preset {name.lower()} (random weights, untrained)"
        return model

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, map_location: str | torch.device = "cpu") -> "Tokenizer":
        """Load our format (``config.json`` + ``model.safetensors``) from a folder or hub id, in
        eval mode (a training run's weights are in ``RUN/export``)."""
        from softvq.checkpoint.pretrained import load_pretrained

        return load_pretrained(path_or_id, map_location=map_location)

    @classmethod
    def from_official(cls, path_or_id: str | Path, *, map_location: str | torch.device = "cpu",
                      encoder_heads: int | None = None, decoder_heads: int | None = None,
                      other_depths: bool = False) -> "Tokenizer":
        """Load a released SoftVQ-VAE checkpoint (``SoftVQVAE/softvq-*``: a folder or hub id with
        ``config.json`` and ``model.safetensors``, or an older ``pytorch_model.bin``), mapping its keys,
        in eval mode.

        The attention head counts are not in the weights; by default they are width / 64, the
        64-channel heads of every release (S 6, B 12, L 16). ``encoder_heads`` / ``decoder_heads``
        override them for a checkpoint of another head size. The depth is read from the block
        numbers; a file with a release's widths and fewer blocks is refused as cut short, unless
        ``other_depths`` says the model was trained at other depths.
        """
        from softvq.checkpoint.official import load_official

        return load_official(path_or_id, map_location=map_location, encoder_heads=encoder_heads,
                             decoder_heads=decoder_heads, other_depths=other_depths)

    def with_generative_decoder(self, noise_dim: int) -> "Tokenizer":
        """A copy whose decoder also reads ``noise_dim`` Gaussian channels per token: WeTok's
        generative decoder (WeTok Sec. 3.3), the starting point of its second training stage.

        The new input weights are zero, so the copy decodes exactly like this tokenizer until it
        is trained (``run.init_from`` does the same when training from a stage-1 export). It keeps
        this tokenizer's mode, device, dtype, slicing and compute precision.
        """
        if noise_dim <= self.config.decoder_noise_dim:
            raise ValueError(f"noise_dim must exceed the current decoder_noise_dim "
                             f"{self.config.decoder_noise_dim}, got {noise_dim}")
        config = TokenizerConfig.from_dict({**self.config.to_dict(), "decoder_noise_dim": noise_dim})
        weight = self.from_latent.weight
        with torch.random.fork_rng(devices=[]):  # its weights are copied in: leave the caller's stream
            widened = Tokenizer(config).to(device=weight.device, dtype=weight.dtype)
        widened.load_weights_of(self, self.source)
        widened.slice_size, widened.compute_dtype = self.slice_size, self.compute_dtype
        widened.source = self.source
        return widened.train(self.training)

    def load_weights_of(self, other: "Tokenizer", source: str, *, config_keys: Collection[str] = ()) -> "Tokenizer":
        """Copy ``other``'s weights into this tokenizer (same architecture, or a stage-1 one whose
        decoder takes fewer noise channels: those extra inputs get zero weights). Mismatches are a
        :class:`~softvq.checkpoint.pretrained.CheckpointError` that names the keys and the
        ``model.…=`` overrides that would reach ``other``'s config; ``config_keys``: the model keys
        the training config sets itself, which a ``model.preset=`` override leaves as they are."""
        from softvq.checkpoint.pretrained import CheckpointError, load_strict
        from softvq.networks.generative import widen_noise_inputs

        try:
            load_strict(self, widen_noise_inputs(other.state_dict(), self.state_dict()), source)
        except CheckpointError as error:
            differ = differences(other.config.to_dict(), self.config.to_dict(), ignore={"decoder_noise_dim"})
            if not differ:
                raise
            shown = first_few([f"{k} {theirs!r} (this config: {ours!r})" for k, theirs, ours in differ], 6, "; ")
            raise CheckpointError(f"{error}. Its model differs from this config's in {shown}: repeat the "
                                  f"overrides that made it: {_overrides_to_reach(other.config.to_dict(), differ, config_keys)}"
                                  ) from None
        self.latent_mean, self.latent_std = other.latent_mean, other.latent_std
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically into ``directory`` (made if missing;
        a tokenizer checkpoint already there is replaced, as ``save_pretrained`` does elsewhere, and the
        CLI's ``info --save`` refuses to; a folder holding anything else with a config.json, such as a
        generator, a train-generator run or a released checkpoint, or a latent set, is refused)."""
        from softvq.checkpoint.pretrained import save_pretrained

        return save_pretrained(self, directory)

    # --- the model ---------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """L, the number of 1D latent tokens per image (paper: 32 or 64)."""
        return self.config.num_tokens

    @property
    def latent_dim(self) -> int:
        """D, the width of each latent token."""
        return self.bottleneck.latent_dim

    def _check_placement(self, tensor: Tensor, what: str) -> None:
        """Name a device mismatch here instead of letting the first layer fail deep inside torch."""
        device = self.from_latent.weight.device
        if tensor.device != device:
            raise ValueError(f"{what} are on {tensor.device} but the tokenizer is on {device}; "
                             f"move one of them, e.g. {what}.to({str(device)!r})")

    def _check_recordable(self, tensor: Tensor, what: str) -> None:
        """An inference tensor (made under ``torch.inference_mode``) cannot be saved for backward:
        with gradients on, the first layer would fail deep inside torch."""
        if tensor.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and \
                any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"{what} were made under torch.inference_mode(), and gradients are on here, so autograd "
                             f"cannot record them; call this under torch.inference_mode() (or torch.no_grad()) too, "
                             f"or pass {what}.clone() made outside inference mode")

    def check_images(self, images: Tensor) -> None:
        """Fail early, naming the problem, on inputs the encoder cannot take: not a (B, C, H, W)
        float tensor, an empty batch, a size that is not a multiple of the patch, another device;
        and, outside training, NaN and values far outside [-1, 1] (8-bit pixels, ImageNet-normalised
        images). Images in [0, 1] are valid values: they get an :class:`ImageRangeWarning`. In
        training mode the value checks are skipped: they would read two numbers back from the
        device at every step."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, C, H, W) in [-1, 1], got {type(images).__name__}"
                            + _tensor_hint(images))
        c = self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            hint = ""
            if images.dim() == 3 and images.shape[0] == c:
                hint = "; one image: add the batch axis, images.unsqueeze(0)"
            elif images.dim() == 4 and images.shape[-1] == c:
                hint = "; channels last: images.permute(0, 3, 1, 2)"
            elif images.dim() == 3 and images.shape[-1] == c:
                hint = "; one channels-last image: images.permute(2, 0, 1).unsqueeze(0)"
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {tuple(images.shape)}{hint}")
        p = self.config.patch_size
        if images.shape[-1] % p or images.shape[-2] % p or 0 in images.shape[-2:]:
            raise ValueError(
                f"image size {images.shape[-2]}x{images.shape[-1]} is not a positive multiple of the "
                f"patch size {p}; crop or resize the images (the CLI's --resize does this)"
            )
        if not images.is_floating_point():
            fix = "divide uint8 by 127.5 and subtract 1" if images.dtype == torch.uint8 else "pass real float images"
            raise TypeError(f"images must be floating point in [-1, 1], got {images.dtype}; {fix}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0); pass at least one image")
        self._check_placement(images, "images")
        self._check_recordable(images, "images")
        if not self.training and not torch.compiler.is_compiling():
            # Inference only: the check reads two numbers back (a host sync a training step need not pay).
            lo, hi = (float(v) for v in torch.aminmax(images.detach()))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("images contain NaN or infinite values")
            if lo >= 0 and hi > 1.5:  # 8-bit values as floats
                raise ValueError(f"images range over [{lo:g}, {hi:g}], like 8-bit pixels; the tokenizer takes "
                                 f"[-1, 1]: pass images / 127.5 - 1")
            if lo < -1.5 or hi > 1.5:  # far outside [-1, 1]: resampling overshoots by a few percent at most
                raise ValueError(f"images range over [{lo:g}, {hi:g}]; the tokenizer takes [-1, 1] (x * 2 - 1 of "
                                 f"images in [0, 1]); ImageNet mean/std normalisation must be undone first")
            # [0, 1] images (ToTensor's) are valid values, and would give wrong latents without a word;
            # real [-1, 1] images rarely have no pixel darker than mid-grey (0), and a flat grey test
            # batch (hi <= 0.5) is left alone
            if lo >= 0 and 0.5 < hi <= 1 and not _FROM_SOFTVQ_LOADERS.get():
                warnings.warn("images lie in [0, 1] (no value below 0): if that is their range (as torchvision's "
                              "ToTensor makes them), pass images * 2 - 1; the tokenizer takes [-1, 1]",
                              ImageRangeWarning, stacklevel=_callers_stacklevel())

    def _as_input(self, images: Tensor) -> Tensor:
        """Checked images in the weights' dtype (float64 or float16 images of a float32 model
        would otherwise fail in the patch convolution with a dtype mismatch)."""
        self.check_images(images)
        return images.to(self.from_latent.weight.dtype)

    def encode(self, images: Tensor) -> Encoding:
        """Images (B, C, H, W) in [-1, 1] -> :class:`Encoding` with latents (B, L, D).

        Sizes other than ``config.image_size`` (multiples of the patch) are encoded with
        interpolated position embeddings, off the trained distribution; :meth:`decode` returns
        the trained size unless given ``image_size``. Images of another floating dtype (float64,
        float16) are computed in the weights' dtype; the latents are float32 (float64 for a
        float64 model), whatever :meth:`enable_autocast` computes in."""
        images = self._as_input(images)
        if self.slice_size and images.shape[0] > self.slice_size:  # checked once, not per slice
            return _concat_encodings([self._encode(part) for part in images.split(self.slice_size)])
        return self._encode(images)

    def _encode(self, images: Tensor) -> Encoding:
        features = self._in_precision(self._features, images)
        out: BottleneckOutput = self.bottleneck(features)
        return Encoding(
            latents=out.latents, features=features, indices=out.indices, probs=out.probs,
            losses=out.losses, metrics=out.metrics,
        )

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents (B, L, D) alone, equal to
        ``encode(images).latents``. Without gradients the bottleneck skips what only
        :class:`Encoding`'s other fields need (for SoftVQ the posterior, the argmax and the
        regulariser: 2-3% of an S encode on the project's CPUs, and a (B, L, K) tensor of memory)."""
        images = self._as_input(images)
        if self.slice_size and images.shape[0] > self.slice_size:  # checked once, not per slice
            return torch.cat([self._encode_latents(part) for part in images.split(self.slice_size)])
        return self._encode_latents(images)

    def _encode_latents(self, images: Tensor) -> Tensor:
        return self.bottleneck.latents(self._in_precision(self._features, images))

    def _features(self, images: Tensor) -> Tensor:
        """ẑ = to_latent(encoder(images)), before the bottleneck."""
        return self.to_latent(self.encoder(images))

    def decode(self, latents: Tensor, image_size: int | tuple[int, int] | None = None, *,
               noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Latents (B, L, D) -> images (B, C, H, W) in about [-1, 1] (default: the trained size),
        float32 whatever the compute precision (float64 for a float64 model), as ``encode``'s latents.

        With a generative decoder (``config.decoder_noise_dim > 0``, WeTok Sec. 3.3) each call
        samples noise (B, L, decoder_noise_dim) ~ N(0, I), from ``generator`` when given; pass
        ``noise`` to fix it. A deterministic decoder rejects ``noise`` and ignores ``generator`` (so
        one sampling loop serves both kinds).
        """
        from softvq.networks.generative import decoder_input

        if not isinstance(latents, Tensor):
            raise TypeError(f"latents must be a torch.Tensor (B, L, D), got {type(latents).__name__}")
        if not latents.is_floating_point():  # before the shape: indices have another shape too
            raise TypeError(f"latents must be floating point, got {latents.dtype}; decode takes the latents "
                            f"encode returns; for LFQ / VQ code indices use decode_indices")
        if latents.dim() != 3 or latents.shape[1:] != (self.num_tokens, self.latent_dim):
            raise ValueError(
                f"expected latents of shape (B, {self.num_tokens}, {self.latent_dim}), got {tuple(latents.shape)}"
            )
        if latents.shape[0] == 0:
            raise ValueError("latents is an empty batch (B = 0); pass at least one")
        self._check_placement(latents, "latents")
        if not self.config.decoder_noise_dim:  # a generative decoder's input is a fresh concatenation
            self._check_recordable(latents, "latents")
        if not self.training and not torch.compiler.is_compiling() and not bool(torch.isfinite(latents).all()):
            raise ValueError("latents contain NaN or infinite values")  # inference only: a host sync
        self._check_output_size(image_size)
        x = decoder_input(latents.to(self.from_latent.weight.dtype), self.config.decoder_noise_dim,
                          noise, generator)
        if self.slice_size and latents.shape[0] > self.slice_size:
            # Noise is drawn once for the whole batch above, so slicing does not change it.
            images = torch.cat([self._decode_input(part, image_size) for part in x.split(self.slice_size)])
        else:
            images = self._decode_input(x, image_size)
        return full_precision(images)  # float32 like the latents (float64 for a float64 model)

    def decode_indices(self, indices: Tensor, image_size: int | tuple[int, int] | None = None, *,
                       noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """A hard quantizer's (VQ, LFQ / WeTok GQ, and their groups, levels and segments) code
        indices, as ``encode(images).indices`` gives them, -> images: :meth:`decode` of the
        codewords they name (``bottleneck.indices_to_latents``). For an autoregressive model on the
        codes. SoftVQ's indices (an argmax) do not determine its latents: it refuses, naming why."""
        latents = self.bottleneck.indices_to_latents(indices)
        return self.decode(latents.to(self.from_latent.weight.device), image_size, noise=noise, generator=generator)

    def _check_output_size(self, image_size: int | tuple[int, int] | None) -> None:
        """The decoder paints whole patches, so a size that is not a positive multiple of the patch
        size would silently come back smaller (100 px from 16 px patches would give 96)."""
        if image_size is None:
            return
        if isinstance(image_size, numbers.Integral):
            sides = (image_size, image_size)
        else:
            sides = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
        p = self.config.patch_size
        if len(sides) != 2 or any(not isinstance(s, numbers.Integral) or s < p or s % p for s in sides):
            raise ValueError(f"image_size must be an int or (height, width), each a positive multiple of "
                             f"the patch size {p}; got {image_size!r}")

    def _decode_input(self, x: Tensor, image_size: int | tuple[int, int] | None) -> Tensor:
        grid = None
        if image_size is not None:
            # int spelled out for mypy, which does not know that int is an Integral
            h, w = (image_size, image_size) if isinstance(image_size, (int, numbers.Integral)) else image_size
            grid = (h // self.config.patch_size, w // self.config.patch_size)
        return self._in_precision(lambda t: self.decoder(self.from_latent(t), grid), x)

    def forward(self, images: Tensor) -> TokenizerOutput:
        """Encode and decode (what training calls): the reconstruction at the input's size, and the
        :class:`Encoding` with the bottleneck's losses and metrics."""
        enc = self.encode(images)
        return TokenizerOutput(self.decode(enc.latents, (images.shape[-2], images.shape[-1])), enc)

    @torch.inference_mode()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Encode and decode without gradients (images in and out in about [-1, 1]: clamp before
        saving or scoring). Runs under ``torch.inference_mode``, so the result is an inference
        tensor: read it freely, but ``.clone()`` it before changing it in place (``clamp_``) or
        using it in a graph that records gradients."""
        return self.forward(images).reconstruction

    def num_parameters(self) -> int:
        """All parameters: encoder, bottleneck (codebooks included) and decoder."""
        return sum(p.numel() for p in self.parameters())


def _callers_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function that calls this, that names the first
    frame outside softvq and torch: the user's line, whichever public method (or ``nn.Module``
    call) it went through."""
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("softvq", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _tensor_hint(value: Any) -> str:
    """How to turn a NumPy array or a PIL image into the tensor the tokenizer takes."""
    kind = type(value).__module__.split(".")[0]
    if kind == "numpy":
        return "; from a NumPy array (B, H, W, 3) of uint8: torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1"
    if kind == "PIL":
        return "; from a PIL image: softvq.data.images.to_tensor(img).unsqueeze(0)"
    return ""


def _concat_encodings(parts: list[Encoding]) -> Encoding:
    """Join per-slice encodings along the batch; scalar losses/metrics are averaged over the slices
    weighted by their images (a per-image mean comes out exact; batch statistics such as
    perplexity, usage and SoftVQ's H(E q) are the slices' weighted average, not the whole batch's)."""
    sizes = torch.tensor([float(p.latents.shape[0]) for p in parts])
    weights = sizes / sizes.sum()

    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    def mean(name: str) -> dict[str, Tensor]:
        keys = getattr(parts[0], name).keys()
        return {k: (torch.stack([getattr(p, name)[k].float() for p in parts])
                    * weights.to(parts[0].latents.device)).sum() for k in keys}

    latents, features = cat("latents"), cat("features")
    assert latents is not None and features is not None  # every Encoding has them
    return Encoding(latents=latents, features=features, indices=cat("indices"),
                    probs=cat("probs"), losses=mean("losses"), metrics=mean("metrics"))


def _overrides_to_reach(theirs: dict, differ: list[tuple[str, Any, Any]], config_keys: Collection[str] = ()) -> str:
    """The shortest ``model.…=`` overrides that turn this config into ``theirs``: every differing
    key, or a preset plus what still differs when that is shorter. ``model.preset=`` replaces only
    the preset: a key in ``config_keys`` keeps this config's value, so it is repeated where that
    differs from ``theirs``, and needs nothing where it already agrees."""
    best = [f"model.{key}={_as_override(value)}" for key, value, _ in differ]
    own, differing = set(config_keys), {key for key, _, _ in differ}
    for name, config in PRESETS.items():
        rest = differences(theirs, config.to_dict(), ignore={"decoder_noise_dim"})
        value_of = {key: value for key, value, _ in rest + differ}  # theirs, first in both
        from_preset = {key for key, _, _ in rest}
        keys = [key for key in value_of if (key in differing if key in own else key in from_preset)]
        if len(keys) + 1 < len(best):
            best = [f"model.preset={name}"] + [f"model.{key}={_as_override(value_of[key])}" for key in keys]
    return " ".join(best)


def _as_override(value: Any) -> str:
    """A config value as a ``key=value`` override is written (YAML: null, true, [1, 2])."""
    import json

    return value if isinstance(value, str) else json.dumps(value)
