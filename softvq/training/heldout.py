"""Held-out reconstruction quality during and after training: PSNR and LPIPS-VGG, and the grids
of originals / EMA reconstructions / errors a run writes (:class:`HeldOutMonitor`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from softvq.data.images import to_unit_interval
from softvq.eval_mode import evaluating
from softvq.evaluation.metrics import psnr
from softvq.tokenizer import images_from_softvq_loaders

if TYPE_CHECKING:
    from softvq.data.loader import HeldOut
    from softvq.training.ema import EMA


def heldout_psnr(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Each reconstruction's PSNR (dB) on the [0, 1] scale of a saved image: what training logs (the
    mean) and writes under each column of its grid. The MSE floor caps PSNR at 100 dB, so an exact
    reconstruction logs a finite number, not inf."""
    return psnr(to_unit_interval(images.detach().cpu()), to_unit_interval(reconstructions.detach().cpu()),
                data_range=1.0, min_mse=1e-10)


@torch.no_grad()
@images_from_softvq_loaders()
def reconstruct_all(model: nn.Module, images: Tensor, *, batch_size: int = 16, autocast=None) -> Tensor:
    """Reconstructions of ``images`` (on the model's device) in eval mode, batch by batch."""
    device = next(model.parameters()).device
    outs = []
    with evaluating(model):
        for chunk in images.split(batch_size):
            chunk = chunk.to(device)
            if autocast is not None:
                with autocast():
                    outs.append(model(chunk).reconstruction.float().cpu())
            else:
                outs.append(model(chunk).reconstruction.float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def reconstruction_metrics(images: Tensor, reconstructions: Tensor, lpips: nn.Module | None = None,
                           *, batch_size: int = 16) -> dict[str, float]:
    """Mean PSNR (dB) and, when an LPIPS module is given, mean LPIPS over the held-out images."""
    out = {"psnr": float(heldout_psnr(images, reconstructions).mean())}
    if lpips is not None:
        device = next((b.device for b in lpips.buffers()), torch.device("cpu"))
        values = [lpips(a.to(device), b.clamp(-1, 1).to(device)).float().cpu()
                  for a, b in zip(images.split(batch_size), reconstructions.split(batch_size))]
        out["lpips"] = float(torch.cat(values).mean())
    return out


class HeldOutMonitor:
    """A run's fixed held-out images, measured with its EMA weights: ``grids/step-XXXXXXXX.png``
    (originals / reconstructions / |error|) and their PSNR, and LPIPS with ``eval_lpips``.

    Args:
        heldout: the images (``softvq.data.loader.build_data``).
        run_dir: where ``grids/`` goes.
        grid_images: how many of them a grid shows (all are measured).
        eval_lpips: also measure LPIPS-VGG (loaded at first use).
        batch_size: images per forward pass.
        autocast: the run's mixed-precision context, or None.
        device: the run's device (LPIPS runs there).
        is_main: the process that draws and measures (the others only reconstruct, as FSDP needs).
        log_image: called with (tag, grid path, step) for each grid (TensorBoard).
    """

    def __init__(self, heldout: HeldOut, run_dir: Path, *, grid_images: int, eval_lpips: bool, batch_size: int,
                 autocast: Callable[[], Any] | None, device: torch.device, is_main: bool,
                 log_image: Callable[[str, Path, int], None] = lambda tag, path, step: None) -> None:
        self.heldout, self.run_dir, self.grid_images = heldout, run_dir, grid_images
        self.eval_lpips, self.batch_size, self.autocast = eval_lpips, batch_size, autocast
        self.device, self.is_main, self.log_image = device, is_main, log_image
        self.last: tuple[int, dict[str, float]] = (-1, {})  # the step of the last grid, and its metrics
        self._lpips: nn.Module | None = None

    def reconstructions(self, model: nn.Module) -> Tensor:
        """``model``'s reconstructions of every held-out image. Call it through the wrapped model on
        every process: FSDP units must run under their root."""
        return reconstruct_all(model, self.heldout.images, batch_size=self.batch_size, autocast=self.autocast)

    def grid(self, model: nn.Module, ema: EMA, unwrapped: nn.Module, step: int) -> dict[str, float]:
        """The grid and metrics of the EMA weights at ``step`` (every process calls it); returns the
        metrics on the main process, {} on the others."""
        from softvq.training.grid import save_grid  # it draws each column's heldout_psnr: imported late

        # Measuring must not change what is trained: LPIPS' construction and a generative decoder's
        # noise draw from the global generators, which the run's data and losses also draw from.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            with ema.swapped_into(unwrapped):
                reconstructions = self.reconstructions(model)
            if not self.is_main:  # every process knows the step measured: the end must agree on reusing it
                self.last = (step, {})
                return {}
            images = self.heldout.images
            path = save_grid(images[:self.grid_images], reconstructions[:self.grid_images],
                             self.run_dir / "grids" / f"step-{step:08d}.png",
                             title=f"step {step}: EMA weights on held-out images")
            self.log_image("heldout/reconstruction", path, step)
            self.last = (step, self.metrics(reconstructions))
        return self.last[1]

    def metrics(self, reconstructions: Tensor) -> dict[str, float]:
        """PSNR (and LPIPS) of ``reconstructions`` of the held-out images."""
        return reconstruction_metrics(self.heldout.images, reconstructions, self.lpips())

    def lpips(self) -> nn.Module | None:
        """The LPIPS network the metrics use (loaded at first use), or None without ``eval_lpips``."""
        if not self.eval_lpips:
            return None
        if self._lpips is None:
            from softvq.losses.lpips import LPIPS

            self._lpips = LPIPS("vgg", check_values=False).to(self.device)  # NaN weights: a NaN metric
        return self._lpips
