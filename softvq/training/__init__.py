"""Training runs. The tokenizer's: typed YAML configs (:mod:`.config`), the Accelerate trainer
(:mod:`.trainer`), its logging, image grids and held-out metrics. Shared with the generator
trainer (and, for launching processes, ``pretokenize``, ``eval`` and ``generate``): processes and
launching (:mod:`.accelerator`), checkpoints, EMA, lr schedule, optimizer groups, stop requests.

    from softvq.training import load_config, Trainer
    cfg = load_config("demo", ["schedule.steps=500"])       # a bundled config name or a YAML path
    result = Trainer(cfg, "runs/mine").fit()                # result.metrics: held-out PSNR / LPIPS
"""

from softvq.training.config import TrainConfig, load_config, save_config

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "load_config", "save_config"]


def __getattr__(name: str):
    # The trainer imports Accelerate; load it only when asked for.
    if name == "NonFiniteLossError":  # both trainers raise it; its module imports no Accelerate
        from softvq.training.stopping import NonFiniteLossError

        return NonFiniteLossError
    if name in ("Trainer", "TrainResult"):
        from softvq.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'softvq.training' has no attribute {name!r}")
