"""softvq: SoftVQ-VAE 1D image tokenizers, their baselines, and generators on their latents."""

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput
from softvq.config import PRESETS, BottleneckConfig, TokenizerConfig, ViTConfig, preset
from softvq.tokenizer import Encoding, ImageRangeWarning, Tokenizer, TokenizerOutput

__version__ = "0.1.0"

__all__ = [
    "Bottleneck", "BottleneckOutput", "BottleneckConfig", "Encoding", "ImageRangeWarning", "PRESETS", "Tokenizer",
    "TokenizerConfig", "TokenizerOutput", "ViTConfig", "preset", "__version__",
]
