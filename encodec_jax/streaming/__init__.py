"""Streaming EnCodec: encode and decode live audio chunk by chunk, equal to offline coding.

Host streams (push what arrives, get what is ready):

- `Encoder` / `Decoder`: frame by frame, for models without chunking (the 24 kHz model, causal:
  one frame of latency after a 7-frame start; the 32 kHz model, with the fixed look-ahead its
  receptive field needs). See `info(model)` for a model's warmup, lags and look-ahead.
- `ChunkEncoder` / `ChunkDecoder`: chunk by chunk, for chunked models (48 kHz, 1 s chunks).

The pure form beneath them (`encodec_jax.streaming.codec`): `prepare`, `init_encoder_state`,
`encode_step`, `encode_flush`, `init_decoder_state`, `decode_step`, `decode_flush` (and the
embedding-level `embed_step`, `decode_embeddings_step`, ...): jittable, a fixed-shape pytree
state, `lax.scan`-able. Each layer's part (`encodec_jax.streaming.layers`) keeps what its
receptive field needs.
"""

from .codec import (
    StreamInfo,
    StreamingModel,
    StreamState,
    check_frame_streamable,
    decode_embeddings_flush,
    decode_embeddings_step,
    decode_flush,
    decode_step,
    dequantize,
    embed_flush,
    embed_step,
    encode_flush,
    encode_step,
    info,
    init_decoder_state,
    init_encoder_state,
    prepare,
    quantize,
)
from .layers import StreamingError
from .streams import ChunkDecoder, ChunkEncoder, Decoder, EncodedChunk, Encoder

__all__ = [
    "ChunkDecoder",
    "ChunkEncoder",
    "Decoder",
    "EncodedChunk",
    "Encoder",
    "StreamInfo",
    "StreamState",
    "StreamingError",
    "StreamingModel",
    "check_frame_streamable",
    "decode_embeddings_flush",
    "decode_embeddings_step",
    "decode_flush",
    "decode_step",
    "dequantize",
    "embed_flush",
    "embed_step",
    "encode_flush",
    "encode_step",
    "info",
    "init_decoder_state",
    "init_encoder_state",
    "prepare",
    "quantize",
]
