"""Linear probing of a frozen tokenizer's latents (paper Sec. 4.4, Fig. 3; supplementary C.3).

C.3: "a parameter-free batch normalization layer and a linear layer [trained] for 90 epochs with
a batch size of 16,384 ... the Lamb optimizer with cosine decay learning rate scheduler where the
initial learning rate is set to 0.003" (the MAE / DAE / REPA setup). Those are the defaults here.
The tokenizer is frozen; its latents z (B, L, D) — or the pre-bottleneck ẑ with
``which="features"`` — are flattened to L·D features, computed once, then the probe trains on
them. Weight decay is not given in the paper: 0 (MAE's linear probe uses none either).

The labelled set is an image folder with one sub-folder per class (class = sub-folder name);
a stratified, seeded held-out split (or a separate validation folder) gives the accuracy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from softvq.data.images import ImageReadError, images_by_class, name_loose_images, read_image
from softvq.eval_mode import evaluating
from softvq.tokenizer import images_from_softvq_loaders

if TYPE_CHECKING:
    from softvq.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, Alg. 2): Adam's bias-corrected step plus decoupled weight decay,
    rescaled per parameter tensor by the trust ratio ‖w‖ / ‖step‖ (1 where either norm is 0)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One LAMB update of every parameter; ``closure`` recomputes the loss, as in ``torch.optim``."""
        if closure is not None:  # it recomputes the loss and calls backward: gradients must be on for it
            with torch.enable_grad():
                loss = closure()
        else:
            loss = None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1**t)
                v_hat = state["v"] / (1 - beta2**t)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * trust))
        return loss


class LinearProbe(nn.Module):
    """BatchNorm1d without affine parameters, then a linear classifier (C.3)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=1e-6)
        self.head = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE's probe initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))


@dataclass
class ProbeResult:
    """What one linear probe measured (paper supp. C.3), as written to ``probe.json``: accuracies in [0, 1],
    the labelled set's sizes, and what was left out of it."""
    top1: float            # held-out accuracy
    top5: float | None     # held-out top-5 (only with more than 5 classes)
    train_top1: float
    num_train: int
    num_val: int
    num_classes: int
    feature_dim: int
    epochs: int
    optimizer: str
    which: str = "latents"
    skipped_images: int = 0  # unreadable files left out of the labelled set(s)
    empty_classes: list[str] = field(default_factory=list)  # class folders with no readable training image

    def to_dict(self) -> dict:
        """The result as plain JSON-ready fields."""
        return asdict(self)


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, val): in every class round(val_fraction · n) samples (at least 1 when the
    class has 2 or more) go to validation, chosen by a seeded permutation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(val_fraction * len(idx))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


def train_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *,
                epochs: int = 90, batch_size: int = 16384, lr: float = 3e-3, weight_decay: float = 0.0,
                optimizer: Literal["lamb", "adamw", "sgd"] = "lamb", seed: int = 0,
                min_steps: int = 1000, which: str = "latents") -> ProbeResult:
    """Train the probe on fixed features (N, F) with integer labels; evaluate on the held-out set.

    The learning rate follows a per-step cosine decay from ``lr`` to 0 (C.3). On ImageNet the
    paper's 90 epochs at batch 16,384 are about 7,000 steps; on a small folder 90 epochs can be
    90 steps of one full batch, too few for LAMB's relative updates, so training runs for at least
    ``min_steps`` steps (more epochs; the result reports the epochs actually run). Everything random
    is drawn from ``seed``; torch's global random state is left as it was.
    """
    if train_x.dim() != 2 or val_x.dim() != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be (N, F) with the same F, got {tuple(train_x.shape)}, {tuple(val_x.shape)}")
    if len(train_x) < 2:
        raise ValueError(f"need at least 2 training samples, got {len(train_x)}")
    num_classes = int(max(train_y.max(), val_y.max() if len(val_y) else 0)) + 1
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's stream alone
        torch.manual_seed(seed)
        probe = LinearProbe(train_x.shape[1], num_classes)
    params = probe.parameters()
    if optimizer == "lamb":
        opt: torch.optim.Optimizer = Lamb(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use lamb (paper), adamw or sgd")
    batch = min(batch_size, len(train_x))
    steps_per_epoch = math.ceil(len(train_x) / batch)
    if len(train_x) % batch == 1:  # a batch of 1 cannot be batch-normalised: drop it
        steps_per_epoch -= 1
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    x, y = train_x.float(), train_y.long()
    step = 0
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        train_logits = probe(x)
        val_logits = probe(val_x.float()) if len(val_x) else torch.zeros(0, num_classes)
    vy = val_y.long()
    return ProbeResult(
        top1=_accuracy(val_logits, vy) if len(vy) else math.nan,
        top5=_accuracy(val_logits, vy, 5) if len(vy) and num_classes > 5 else None,
        train_top1=_accuracy(train_logits, y),
        num_train=len(x), num_val=len(vy), num_classes=num_classes,
        feature_dim=x.shape[1], epochs=epochs, optimizer=optimizer, which=which,
    )


def labelled_images(folder: str | Path) -> tuple[list[Path], Tensor, list[str]]:
    """(image paths, integer labels, class names) of a folder with one sub-folder per class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"labelled image folder {folder} does not exist")
    by_class, loose = images_by_class(folder)
    if len(by_class) < 2:
        raise ValueError(f"{folder} needs at least two class sub-folders with images, found {len(by_class)}")
    name_loose_images(folder, loose)
    paths, labels = [], []
    for c, files in enumerate(by_class.values()):
        paths += files
        labels += [c] * len(files)
    return paths, torch.tensor(labels), list(by_class)


@torch.inference_mode()
@images_from_softvq_loaders()
def tokenizer_features(model: Tokenizer, paths: list[Path], *, which: Literal["latents", "features"] = "latents",
                       batch_size: int = 32, device: str | torch.device = "cpu",
                       progress: bool = True, skipped: list[Path] | None = None,
                       state_file: str | Path | None = None) -> Tensor:
    """Flattened z (``latents``) or ẑ (``features``) of each image, (N, L·D) float32 on the CPU.

    Images are centre-cropped and resized to the model's resolution (the evaluation protocol).
    With ``skipped`` given, unreadable files are left out (rows follow the readable paths in
    order) and appended to it; without it they raise :class:`ImageReadError`. With
    ``state_file``, an interrupted extraction continues from the rows saved there (the caller
    removes it; :func:`~softvq.evaluation.saved_state.rows_resumably`).
    """
    from softvq.evaluation.saved_state import rows_resumably

    if which not in ("latents", "features"):
        raise ValueError(f"which must be 'latents' (z) or 'features' (ẑ), got {which!r}")
    model = model.to(device)
    size = model.config.image_size

    def compute(start: int, stop: int) -> tuple[Tensor | None, list[str]]:
        images, unreadable = [], []
        for path in paths[start:stop]:
            try:
                images.append(read_image(path, size, resize=True))
            except ImageReadError:
                if skipped is None:
                    raise
                unreadable.append(str(path))
        if not images:
            return None, unreadable
        enc = model.encode(torch.stack(images).to(device))
        return getattr(enc, which).flatten(1).float().cpu(), unreadable

    state_file = Path(state_file).expanduser() if state_file is not None else None
    identity = (_extraction_identity(model, paths, which=which, image_size=size, precision=model.precision)
                if state_file else {})
    with evaluating(model):  # the caller's model comes back in the mode it was given
        out, unreadable = rows_resumably(compute, len(paths), batch_size, state_file=state_file, identity=identity,
                                         desc=f"probe {which}", progress=progress)
    if skipped is not None:
        skipped += [Path(name) for name in unreadable]
    if not out:
        raise ImageReadError(f"none of the {len(paths)} labelled images could be read"
                             + (f", e.g. {skipped[0]}" if skipped else ""))
    return torch.cat(out)


def _extraction_identity(model, paths: list[Path], **options) -> dict:
    """What saved probe features depend on: the weights, the images in their order, the options."""
    from softvq.resume import listing_sha1, weights_sha1

    return {"weights_sha1": weights_sha1(model), "images": len(paths),
            "images_sha1": listing_sha1(str(p) for p in paths), **options}


def readable_features(model: Tokenizer, paths: list[Path], labels: Tensor, skipped: list[Path],
                      **options) -> tuple[Tensor, Tensor]:
    """(features, labels) of the readable ``paths``; the unreadable ones are appended to ``skipped``."""
    before = len(skipped)
    feats = tokenizer_features(model, paths, skipped=skipped, **options)
    if len(skipped) > before:
        unreadable = set(skipped[before:])
        labels = labels[[i for i, p in enumerate(paths) if p not in unreadable]]
    return feats, labels


def drop_empty_classes(labels: Tensor, val: tuple[Tensor, Tensor] | None,
                       classes: list[str]) -> tuple[Tensor, tuple[Tensor, Tensor] | None, list[str]]:
    """A class whose files all failed to read would still be a class (an output never trained, a
    num_classes that counts it): (training labels renumbered without it, the validation set without
    its images, the names of the classes left out, which are logged)."""
    present = labels.unique()
    empty = [name for c, name in enumerate(classes) if c not in present]
    if not empty:
        return labels, val, []
    log.warning("left out %d class(es) with no readable training image: %s", len(empty), ", ".join(empty))
    new_label = torch.full((len(classes),), -1, dtype=torch.long)
    new_label[present] = torch.arange(len(present))
    if val is not None:
        kept = new_label[val[1]] >= 0
        val = (val[0][kept], new_label[val[1][kept]])
    return new_label[labels], val, empty


def fit_probe(feats: Tensor, labels: Tensor, val: tuple[Tensor, Tensor] | None = None, *, val_fraction: float = 0.2,
              seed: int = 0, which: str = "latents", **train_kwargs) -> ProbeResult:
    """The probe trained on ``feats``, scored on ``val`` (features, labels) or, without one, on a
    stratified ``val_fraction`` of ``feats`` held out from training."""
    present = torch.unique(labels).numel()
    if present < 2:  # one class left once unreadable files are out: 100% accuracy that means nothing
        raise ValueError(f"the probe needs readable images of at least two classes, and {present} class(es) have "
                         f"any; replace the unreadable files or remove the classes that hold only those")
    if val is not None:
        return train_probe(feats, labels, *val, seed=seed, which=which, **train_kwargs)
    tr, va = stratified_split(labels, val_fraction, seed)
    return train_probe(feats[tr], labels[tr], feats[va], labels[va], seed=seed, which=which, **train_kwargs)


def probe_folder(model: Tokenizer, folder: str | Path, *, val_folder: str | Path | None = None,
                 val_fraction: float = 0.2, which: Literal["latents", "features"] = "latents",
                 device: str | torch.device = "cpu", batch_size: int = 32, seed: int = 0,
                 progress: bool = True, state_dir: str | Path | None = None, **train_kwargs) -> ProbeResult:
    """Linear-probe accuracy of a frozen tokenizer on a labelled image folder (C.3).

    ``state_dir``: where the features extracted so far are kept (``probe-*.pt``), so that an
    interrupted probe of the same weights and images continues; removed once the probe is trained.
    Unreadable images are skipped and counted; a class left with none to train on is left out, with
    its validation images, and named (``empty_classes``).
    """
    paths, labels, classes = labelled_images(folder)
    if val_folder is not None:
        vpaths, vlabels, vclasses = labelled_images(val_folder)
        if vclasses != classes:
            raise ValueError(f"validation classes {vclasses} differ from training classes {classes}")
    states = probe_state_files(state_dir, "train", "val")
    skipped: list[Path] = []
    options = dict(which=which, batch_size=batch_size, device=device, progress=progress)
    feats, labels = readable_features(model, paths, labels, skipped, state_file=states[0], **options)
    val = (readable_features(model, vpaths, vlabels, skipped, state_file=states[1], **options)
           if val_folder is not None else None)
    labels, val, empty = drop_empty_classes(labels, val, classes)
    result = fit_probe(feats, labels, val, val_fraction=val_fraction, seed=seed, which=which, **train_kwargs)
    result.skipped_images = len(skipped)
    result.empty_classes = empty
    remove_files(states)
    return result


def probe_state_files(state_dir: str | Path | None, *names: str) -> list[Path | None]:
    """``state_dir/probe-<name>.pt`` for each name (all None without a ``state_dir``)."""
    if state_dir is None:
        return [None] * len(names)
    return [Path(state_dir).expanduser() / f"probe-{name}.pt" for name in names]


def remove_files(paths: list[Path | None]) -> None:
    """Delete the given files where they exist; ``None`` entries are skipped."""
    for path in paths:
        if path is not None:
            path.unlink(missing_ok=True)
