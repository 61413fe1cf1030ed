"""softvq: SoftVQ-VAE 1D image tokenizers, their baselines, and generators on their latents."""

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput
from softvq.config import PRESETS, BottleneckConfig, TokenizerConfig, ViTConfig, preset
from softvq.tokenizer import Encoding, Tokenizer, TokenizerOutput

__version__ = "0.1.0"

__all__ = [
    "Bottleneck", "BottleneckOutput", "BottleneckConfig", "Encoding", "PRESETS", "Tokenizer",
    "TokenizerConfig", "TokenizerOutput", "ViTConfig", "preset", "__version__",
]
