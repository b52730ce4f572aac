"""EnCodec as pure, traceable functions: the model is an argument, arrays go in and come out.

Use these inside your own JAX program: under `jax.jit`, `jax.vmap`, `jax.grad`/`jax.vjp`, and on
a batch sharded over a `Mesh` with `NamedSharding`. Nothing here synchronises with the host or
branches in Python on array values; shapes and `num_quantizers` are static. `EncodecModel`'s
`encode`/`decode` are built on these functions: they add the input checks and the chunking of
long (48 kHz) inputs on the host, and give the same codes for the same chunk.

Layouts: audio `[B, C, L]` (channels first, as transformers); embeddings and quantized
embeddings `[B, frames, D]` (channels last, as the SEANet layers run); codes `[B, n_q, frames]`
int32; scale `[B, 1]` for models that normalise their input (the 48 kHz model), else None.
`frames = ceil(L / hop_length)` and decoded audio has `frames * hop_length` samples. A chunked
model's functions take one chunk (`config.chunk_length` samples or fewer) per item.

Every function traces under `jax.default_matmul_precision(model.settings.matmul_precision)` and
runs the SEANet networks in `model.settings.compute_dtype`, so results equal `EncodecModel`'s.

Example, tokenizing inside a jitted, data-parallel step:

    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.jit
    def step(model, audio):  # audio [B, 1, L], B split over the devices
        codes, _ = functional.encode(model, audio, num_quantizers=8)
        return codes  # [B, 8, frames], sharded like the batch

    codes = step(model, jax.device_put(audio, batch))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

if TYPE_CHECKING:
    from .model import EncodecModel

__all__ = [
    "decode",
    "decode_embeddings",
    "dequantize",
    "embed",
    "encode",
    "quantize",
    "quantize_st",
]


def encode(
    model: EncodecModel,
    audio: jax.Array,
    num_quantizers: int,
    padding_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Audio to codes: `embed` then `quantize`.

    Args:
        model: the codec.
        audio: `[B, C, L]` float audio (one chunk per item for chunked models).
        num_quantizers: codebooks to use (static), e.g.
            `model.config.num_quantizers_for_bandwidth(6.0)`.
        padding_mask: optional `[B, L]` or `[B, 1|C, L]`, 1 for real samples; padded samples
            are zeroed before encoding, as in transformers.

    Returns:
        (codes `[B, num_quantizers, frames]` int32, scale `[B, 1]` or None).
    """
    embeddings, scale = embed(model, audio, padding_mask)
    return quantize(model, embeddings, num_quantizers), scale


def decode(model: EncodecModel, codes: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """Codes `[B, n_q, frames]` to audio `[B, C, frames * hop_length]` (`dequantize` then
    `decode_embeddings`); `scale` `[B, 1]` multiplies the audio of models that normalise."""
    return decode_embeddings(model, dequantize(model, codes), scale)


def embed(
    model: EncodecModel, audio: jax.Array, padding_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """The encoder: audio `[B, C, L]` -> (embeddings `[B, frames, D]` float32, scale or None).

    Models with `config.normalize` divide each item by its RMS scale (over the mono mix, plus
    1e-8, as the reference) before encoding and return that scale `[B, 1]`.
    """
    with jax.default_matmul_precision(model.settings.matmul_precision):
        x, scale = prepare_audio(model, audio, padding_mask)
        encoder, x = in_compute_dtype(model, model.encoder, x)
        return encoder(x).astype(jnp.float32), scale


def quantize(model: EncodecModel, embeddings: jax.Array, num_quantizers: int) -> jax.Array:
    """Residual vector quantization: embeddings `[B, T, D]` -> codes `[B, num_quantizers, T]`.

    The codes are integers, so nothing flows back through them; see `quantize_st` for the
    straight-through form a loss on decoded audio needs.
    """
    with jax.default_matmul_precision(model.settings.matmul_precision):
        return model.quantizer.encode(embeddings.astype(jnp.float32), num_quantizers)


def quantize_st(
    model: EncodecModel, embeddings: jax.Array, num_quantizers: int
) -> tuple[jax.Array, jax.Array]:
    """Quantize with the straight-through estimator: (quantized `[B, T, D]`, codes).

    The forward value is the sum of the chosen codebook vectors (what `dequantize` gives); the
    gradient passes to `embeddings` unchanged, `x + stop_gradient(q - x)`, as the reference RVQ
    and big_vision's `quantize` do, so `jax.grad` of a loss on decoded audio reaches the encoder.
    The codebooks get no gradient (training updates them by EMA: `encodec_jax.train`).
    """
    codes = quantize(model, lax.stop_gradient(embeddings), num_quantizers)
    quantized = dequantize(model, codes)
    return embeddings + lax.stop_gradient(quantized - embeddings), codes


def dequantize(model: EncodecModel, codes: jax.Array) -> jax.Array:
    """Codes `[B, n_q, T]` -> quantized embeddings `[B, T, D]`: the chosen codebook vectors
    summed in codebook order (the reference's order of float additions)."""
    with jax.default_matmul_precision(model.settings.matmul_precision):
        return model.quantizer.decode(codes)


def decode_embeddings(
    model: EncodecModel, embeddings: jax.Array, scale: jax.Array | None = None
) -> jax.Array:
    """The decoder: embeddings `[B, frames, D]` -> audio `[B, C, frames * hop_length]` float32,
    multiplied by `scale` `[B, 1]` when given."""
    with jax.default_matmul_precision(model.settings.matmul_precision):
        decoder, embeddings = in_compute_dtype(model, model.decoder, embeddings)
        return finish_audio(decoder(embeddings), scale)


# ---- the steps the functions above share with `tiling` ----
def prepare_audio(
    model: EncodecModel, audio: jax.Array, padding_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """Mask and normalise `[B, C, L]` audio as the reference does: (`[B, L, C]`, scale or None)."""
    x = audio.astype(jnp.float32)
    if padding_mask is not None:
        mask = (padding_mask != 0).astype(jnp.float32)
        x = x * mask.reshape(x.shape[0], -1, x.shape[-1])
    scale = None
    if model.config.normalize:
        mono = jnp.sum(x, axis=1, keepdims=True) / x.shape[1]
        scale = jnp.sqrt(jnp.mean(mono * mono, axis=-1, keepdims=True)) + 1e-8
        x = x / scale
        scale = scale.reshape(-1, 1)
    return x.transpose(0, 2, 1), scale


def in_compute_dtype(model: EncodecModel, network, x: jax.Array):
    """`network` and `x` cast to the model's compute dtype (a no-op when they have it)."""
    dtype = jnp.dtype(model.settings.compute_dtype)
    if dtype == x.dtype and dtype == jnp.dtype(model.settings.param_dtype):
        return network, x
    cast = jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, network
    )
    return cast, x.astype(dtype)


def finish_audio(audio: jax.Array, scale: jax.Array | None) -> jax.Array:
    """Decoder output `[B, T, C]` -> float32 `[B, C, T]`, times the scale `[B, 1]` if given."""
    audio = audio.astype(jnp.float32).transpose(0, 2, 1)
    return audio if scale is None else audio * scale[:, :, None]
