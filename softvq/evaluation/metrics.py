"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage / perplexity, latent moments.

PSNR and SSIM take the images' real data range as a required argument (1.0 for [0, 1], 255 for
[0, 255]) and check the images fit in it. The LlamaGen-derived evaluation script that SoftVQ's
release builds on passes ``data_range=2.0`` for images in [0, 1], which lowers C1, C2 four-fold
relative to the true range and changes SSIM; that is not reproduced here.

SSIM follows Wang et al. (2004) as scikit-image computes it with ``gaussian_weights=True,
sigma=1.5, use_sample_covariance=False``: an 11x11 Gaussian window (σ = 1.5, truncated at
3.5σ), K1 = 0.01, K2 = 0.03, the SSIM map averaged over the region the window fits in
(a 5-pixel border is dropped), channels averaged. Both metrics are per image, float64; a data
set's value is the mean over its images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from softvq.bottlenecks.base import entropy


def _check_range(x: Tensor, data_range: float, name: str) -> None:
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN would come back as a NaN score
        raise ValueError(f"{name} contains NaN or infinite values")
    slack = 1e-3 * data_range
    if lo < -slack or hi > data_range + slack:
        if -0.25 * data_range <= lo and hi <= 1.25 * data_range:  # the right scale, overshooting a little
            hint = (f" (a decoder's output overshoots its range a little: clamp it first, "
                    f"x.clamp(0, {data_range:g}), as a saved image would be)")
        elif lo < 0:
            hint = " (images in [-1, 1]: map them with (x + 1) / 2 first)"
        else:
            hint = " (looks like [0, 255] images: pass data_range=255)" if hi > 1.5 and data_range == 1 else ""
        raise ValueError(f"{name} values span [{lo:.3g}, {hi:.3g}], outside [0, {data_range}]{hint}")


def _pair(x: Tensor, y: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    for name, value in (("first", x), ("second", y)):
        if not isinstance(value, Tensor):
            raise TypeError(f"the {name} image batch must be a torch.Tensor (B, C, H, W), got {type(value).__name__}"
                            + ("; from NumPy (B, H, W, C): torch.from_numpy(a).permute(0, 3, 1, 2)"
                               if type(value).__module__ == "numpy" else ""))
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    _check_range(x, data_range, "first image batch")
    _check_range(y, data_range, "second image batch")
    return x.double(), y.double()


def psnr(x: Tensor, y: Tensor, *, data_range: float, min_mse: float = 0.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10·log10(range² / MSE), (B,) float64; inf if equal.

    The one PSNR of the package. ``min_mse`` > 0 floors the MSE, capping PSNR at
    10·log10(range² / min_mse) instead of inf (for logs that must stay finite JSON)."""
    x, y = _pair(x, y, data_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    if min_mse > 0:
        mse = mse.clamp_min(min_mse)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    """Normalised 1D Gaussian taps with radius int(truncate·σ + 0.5): 11 taps for σ = 1.5."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable 'valid' filtering of (N, 1, H, W) with 1D taps (no padding: the border is cropped)."""
    k = taps.to(x)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return F.conv2d(x, k.view(1, 1, 1, -1))


def ssim(x: Tensor, y: Tensor, *, data_range: float, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity per image (module docstring), (B,) float64."""
    x, y = _pair(x, y, data_range)
    taps = gaussian_window(sigma)
    if min(x.shape[-2:]) < taps.numel():
        raise ValueError(f"SSIM needs images of at least {taps.numel()}x{taps.numel()} pixels, got {tuple(x.shape[-2:])}")
    b, c, h, w = x.shape
    stack = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * b * c, 1, h, w)
    filtered = _filter_valid(stack, taps)
    mu_x, mu_y, xx, yy, xy = filtered.reshape(5, b, c, *filtered.shape[-2:])
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


# --- codebook ------------------------------------------------------------------------------------


class CodebookUsage:
    """Exact code counts over a whole data set (the "Codebook Usage" of WeTok Tab. 3).

    ``update`` takes hard indices of shape (N,) or (N, P), where P indexes parallel codebooks
    (product / residual / per-segment codebooks); each codebook keeps its own counts.

    usage:      fraction of the K codes chosen at least once (per codebook, then averaged);
    perplexity: exp(H(p)) of the empirical code distribution p = counts / total, in [1, K];
    soft perplexity: exp(H(p̄)) of the averaged soft posterior, when ``update_probs`` is fed.
    """

    def __init__(self, codebook_size: int, num_codebooks: int = 1) -> None:
        if codebook_size < 1 or num_codebooks < 1:
            raise ValueError(f"codebook_size and num_codebooks must be positive, got {codebook_size}, {num_codebooks}")
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64)
        self.prob_sums = torch.zeros(num_codebooks, codebook_size, dtype=torch.float64)
        self.prob_rows = 0

    def update(self, indices: Tensor) -> None:
        """Count the codes of a batch: indices (N,) for one codebook, (N, P) for P parallel ones."""
        idx = indices.detach().long().cpu()
        if idx.dim() == 1:
            idx = idx.unsqueeze(1)
        if idx.dim() != 2 or idx.shape[1] != self.num_codebooks:
            shapes = "(N,) or (N, 1)" if self.num_codebooks == 1 else f"(N, {self.num_codebooks}): one column per codebook"
            raise ValueError(f"indices must be {shapes}, got {tuple(indices.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.codebook_size):
            raise ValueError(f"indices outside [0, {self.codebook_size})")
        offsets = torch.arange(self.num_codebooks) * self.codebook_size
        flat = (idx + offsets).reshape(-1)
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)

    def update_probs(self, probs: Tensor) -> None:
        """Soft posteriors (N, K) or (N, P, K)."""
        p = probs.detach().double().cpu()
        if p.dim() == 2:
            p = p.unsqueeze(1)
        if p.dim() != 3 or p.shape[1:] != (self.num_codebooks, self.codebook_size):
            raise ValueError(f"probs must be (N, {self.codebook_size}) or (N, {self.num_codebooks}, "
                             f"{self.codebook_size}), got {tuple(probs.shape)}")
        self.prob_sums += p.sum(0)
        self.prob_rows += p.shape[0]

    @property
    def total(self) -> int:
        """Codes counted so far (per codebook)."""
        return int(self.counts[0].sum())

    def usage_per_codebook(self) -> Tensor:
        """Fraction of each codebook's K codes chosen at least once."""
        return (self.counts > 0).double().mean(1)

    def perplexity_per_codebook(self) -> Tensor:
        """exp(H(p)) of each codebook's empirical code distribution."""
        return torch.exp(entropy_of_weights(self.counts.double()))

    def summary(self) -> dict[str, float]:
        """``codebook_usage`` and ``codebook_perplexity`` averaged over the codebooks, the sizes, the codes
        counted and, when posteriors were added, ``soft_perplexity``."""
        out = {
            "codebook_usage": float(self.usage_per_codebook().mean()),
            "codebook_perplexity": float(self.perplexity_per_codebook().mean()),
            "codebook_size": self.codebook_size,
            "num_codebooks": self.num_codebooks,
            "codes_counted": int(self.counts.sum()),
        }
        if self.prob_rows:
            out["soft_perplexity"] = float(torch.exp(entropy_of_weights(self.prob_sums)).mean())
        return out


def codebook_rows(indices: Tensor, segments: int = 1) -> Tensor:
    """Hard indices (B, L) / (B, L, P) -> (rows, codebooks) for :class:`CodebookUsage`.

    With per-segment codebooks (the release's ``segments``) token l of S segments uses codebook
    l // (L / S), so (B, L) becomes (B·L/S, S), and (B, L, P) (P groups or residual levels per
    token, each its own codebook) becomes (B·L/S, S·P), segment-major.
    """
    if indices.dim() == 2:
        indices = indices.unsqueeze(-1)
    b, length, parts = indices.shape
    return indices.reshape(b, segments, length // segments, parts).transpose(1, 2).reshape(-1, segments * parts)


def probs_rows(probs: Tensor, segments: int = 1) -> Tensor:
    """Soft posteriors (B, L, K) / (B, L, P, K) -> (rows, codebooks, K), like :func:`codebook_rows`."""
    if probs.dim() == 3:
        probs = probs.unsqueeze(-2)
    b, length, parts, k = probs.shape
    return probs.reshape(b, segments, length // segments, parts, k).transpose(1, 2).reshape(-1, segments * parts, k)


def entropy_of_weights(weights: Tensor) -> Tensor:
    """Entropy (nats) of each row of non-negative weights (counts) normalised to a distribution;
    0·log 0 = 0, and a row of zeros has entropy 0."""
    weights = weights.double()  # counts may be integers, and 1e-300 would underflow to 0 in float32
    return entropy(weights / weights.sum(-1, keepdim=True).clamp_min(1e-300))


# --- latents -------------------------------------------------------------------------------------


class RunningMoments:
    """Mean and standard deviation of every latent value over a data set, float64.

    Generators normalise latents with these two scalars, (z − mean) / std
    (``Tokenizer.latent_mean`` / ``latent_std``). Per-channel moments are kept too.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def update(self, latents: Tensor) -> None:
        """Add latents (..., D): per-channel sums and sums of squares in float64."""
        x = latents.detach().double().cpu().reshape(-1, latents.shape[-1])
        if self.sum is None or self.sumsq is None:  # both set together, at the first update
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sumsq = torch.zeros(x.shape[1], dtype=torch.float64)
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.n += x.shape[0]

    def summary(self) -> dict[str, object]:
        """Mean and std over all values and per channel of everything added so far."""
        if not self.n:
            raise ValueError("no latents were accumulated")
        assert self.sum is not None and self.sumsq is not None  # set by the first update
        mean_c = self.sum / self.n
        var_c = (self.sumsq / self.n - mean_c**2).clamp_min(0)
        mean = float(self.sum.sum() / (self.n * len(self.sum)))
        var = float(self.sumsq.sum() / (self.n * len(self.sum)) - mean**2)
        return {
            "latent_mean": mean,
            "latent_std": math.sqrt(max(var, 0.0)),
            "latent_channel_mean": mean_c.tolist(),
            "latent_channel_std": var_c.sqrt().tolist(),
        }
