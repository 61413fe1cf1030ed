"""Held-out reconstruction quality during and after training: PSNR and LPIPS-VGG."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from softvq.data.images import to_unit_interval
from softvq.eval_mode import evaluating
from softvq.evaluation.metrics import psnr


def heldout_psnr(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Each reconstruction's PSNR (dB) on the [0, 1] scale of a saved image: what training logs (the
    mean) and writes under each column of its grid. The MSE floor caps PSNR at 100 dB, so an exact
    reconstruction logs a finite number, not inf."""
    return psnr(to_unit_interval(images.detach().cpu()), to_unit_interval(reconstructions.detach().cpu()),
                data_range=1.0, min_mse=1e-10)


@torch.no_grad()
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
