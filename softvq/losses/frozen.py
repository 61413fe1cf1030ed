"""Frozen pretrained networks held *outside* a loss module's parameter tree.

A loss that uses a pretrained network as a fixed function (LPIPS' VGG16, the discriminator's
DINO/VGG backbone, the alignment target's DINOv2) must never train it. Keeping the network out
of ``named_modules()`` makes that structural rather than a convention:

* ``parameters()`` never yields it, so no optimizer (nor DDP/FSDP wrapping) can pick it up;
* ``state_dict()`` never contains it, so training checkpoints stay small and a resumed run
  does not depend on where the frozen weights came from;
* ``train()`` never switches it out of eval mode;
* ``.to()`` / ``.cuda()`` / ``.half()`` still move it, through :meth:`FrozenHolder._apply`.
"""

from __future__ import annotations

from torch import nn

from softvq.networks.vgg import freeze


class FrozenHolder(nn.Module):
    """Base for modules that own frozen networks; see the module docstring."""

    _frozen: dict[str, nn.Module]  # set with object.__setattr__: kept out of _modules

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_frozen", {})

    def hold(self, name: str, module: nn.Module) -> nn.Module:
        """Freeze ``module`` (eval, requires_grad False) and keep it under ``name``."""
        self._frozen[name] = freeze(module)
        return module

    def frozen(self, name: str) -> nn.Module:
        """The frozen module kept under ``name``."""
        return self._frozen[name]

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch hook
        super()._apply(fn, recurse)
        for held in self._frozen.values():
            held._apply(fn, recurse)
        return self
