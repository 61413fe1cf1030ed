"""What the generator tests train on: a tiny tokenizer and its latent set (12 random 32 px images
in 3 classes), and the settings of a tiny SiT run."""

from pathlib import Path

import torch

from softvq import Tokenizer
from softvq.generation.latent_sources import LatentSource
from softvq.generation.pretokenize import pretokenize

TINY = dict(objective="sit", width=32, depth=1, heads=2, batch_size=4, checkpoint_every=2, keep_checkpoints=3,
            cpu=True)


def tiny_latent_set(root: Path) -> Path:
    """``root/tok`` (a seeded tiny tokenizer) and its latents ``root/lat``, which it returns."""
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    tok.save_pretrained(root / "tok")
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(3, 32, 32, generator=g) * 2 - 1, i % 3, f"img{i}") for i in range(12)]
    pretokenize(tok, LatentSource(iter(samples), ["a", "b", "c"], 12), root / "lat", tokenizer_spec=str(root / "tok"),
                progress=False)
    return root / "lat"
