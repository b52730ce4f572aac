"""encodec-jax: Meta's EnCodec neural audio codec in JAX/Flax, bit-exact with PyTorch."""

from .compilation import enable_compilation_cache
from .config import (
    ENCODEC_24KHZ,
    ENCODEC_32KHZ,
    ENCODEC_48KHZ,
    PRESETS,
    EncodecConfig,
    RuntimeSettings,
)
from .memory import reuse_freed_memory
from .model import EncodecDecoderOutput, EncodecEncoderOutput, EncodecModel, EncodecOutput

__all__ = [
    "ENCODEC_24KHZ",
    "ENCODEC_32KHZ",
    "ENCODEC_48KHZ",
    "PRESETS",
    "EncodecConfig",
    "EncodecDecoderOutput",
    "EncodecEncoderOutput",
    "EncodecFeatureExtractor",
    "EncodecModel",
    "EncodecOutput",
    "RuntimeSettings",
    "enable_compilation_cache",
    "reuse_freed_memory",
]


def __getattr__(name):
    # The feature extractor is imported on first use so that `import encodec_jax` stays light.
    if name == "EncodecFeatureExtractor":
        from .feature_extraction import EncodecFeatureExtractor

        return EncodecFeatureExtractor
    raise AttributeError(f"module 'encodec_jax' has no attribute {name!r}")
