"""Streaming encode and decode as pure functions: a fixed-shape state, one step per chunk.

    codec = prepare(model)                       # weights laid out once for small steps
    state = init_encoder_state(codec, batch_size)
    state, codes = encode_step(codec, state, audio, num_quantizers)  # first: >= warmup frames
    state, codes = encode_step(codec, state, audio, num_quantizers)  # then any whole frames
    codes, count = encode_flush(codec, state, tail, tail_length, num_quantizers)

Every function traces under `jax.jit` and takes the prepared model (a pytree, passed as an
argument like the model itself) or an `EncodecModel` (prepared inside the trace: the same
result, slower per step). After the first step the state keeps its structure and shapes, so
`lax.scan` carries it over a stream of equal chunks. Whether the stream has started is static
(part of the state's tree structure): the first step compiles its own program, which fills each
layer's start padding from the chunk itself, and it must hold at least
`info(model).encoder_warmup_frames` frames (decoder: `decoder_warmup_frames`).

Concatenated, the steps' and the flush's outputs equal `functional.encode` /
`functional.decode` of the whole signal (codes equal; audio to float32 rounding, since a step's
sums run in other shapes and orders than the whole signal's; to 1e-12 in float64). Models whose
layers look ahead (non-causal convolutions) return fewer outputs on the first step: every
step's outputs lag its inputs by a fixed number of frames (encoder) or samples (decoder), and
the flush returns what is still owed.

Layouts as in `functional`: audio `[B, C, samples]`, codes `[B, n_q, frames]` int32,
embeddings `[B, frames, D]`. Frame-by-frame streaming needs a model without chunking, input
normalisation or time_group_norm (the 24 and 32 kHz presets); the 48 kHz model streams in its
own chunks (`streaming.ChunkEncoder`).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from .. import functional, ops
from ..config import EncodecConfig, RuntimeSettings
from ..modules import stack_receptive_field
from . import layers as stream_layers
from .layers import Plan, StreamingError

if TYPE_CHECKING:
    from ..model import EncodecModel

ENCODER, DECODER = "encoder", "decoder"


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["encoder", "decoder", "codebooks"],
    meta_fields=["config", "settings", "encoder_plan", "decoder_plan", "encoder_lookahead"],
)
@dataclasses.dataclass(frozen=True)
class StreamingModel:
    """A model laid out for streaming (`prepare`): a pytree of its weights in the compute dtype,
    with the plans of its two networks and its config as static fields.

    Attributes:
        encoder, decoder: the networks' weights (`streaming.layers.weights`).
        codebooks: all codebooks stacked, `[num_quantizers, bins, D]` float32.
        config, settings: the model's.
        encoder_plan: input in audio samples (hop per frame), output in frames.
        decoder_plan: input in frames, output in audio samples.
        encoder_lookahead: samples past a frame's end that its code depends on.
    """

    encoder: Any
    decoder: Any
    codebooks: jax.Array
    config: EncodecConfig
    settings: RuntimeSettings
    encoder_plan: Plan
    decoder_plan: Plan
    encoder_lookahead: int


@partial(
    jax.tree_util.register_dataclass, data_fields=["layers"], meta_fields=["network", "started"]
)
@dataclasses.dataclass(frozen=True)
class StreamState:
    """The state of a batch of encoder or decoder streams: a pytree of fixed-shape arrays.

    Attributes:
        layers: what each layer keeps between steps (`streaming.layers.init`); under 64 KB per
            stream for the 24 kHz model.
        network: "encoder" or "decoder" (static).
        started: whether the first step has run (static: the first step is its own program).
    """

    layers: Any
    network: str
    started: bool = False


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """What a model's streams need and how late their outputs come, from the layers' receptive
    fields.

    Attributes:
        sampling_rate: Hz.
        hop_length: samples per frame.
        encoder_warmup_frames: frames the encoder's first step must hold (reflect padding makes
            a layer's first outputs depend on its later inputs).
        encoder_lag_frames: the codes of frame t come with the step whose audio completes
            frame t + lag (0 for causal models).
        encoder_lookahead_samples: how far past a frame's last sample its code depends on the
            audio (the encoder's receptive field; the lag is this in whole frames).
        decoder_warmup_frames: code frames the decoder's first step must hold.
        decoder_lag_samples: audio sample q comes with the step whose codes reach sample
            q + lag (0 for causal models).
    """

    sampling_rate: int
    hop_length: int
    encoder_warmup_frames: int
    encoder_lag_frames: int
    encoder_lookahead_samples: int
    decoder_warmup_frames: int
    decoder_lag_samples: int

    def ms(self, samples: int) -> float:
        """`samples` in milliseconds."""
        return 1000.0 * samples / self.sampling_rate

    def encoder_latency_samples(self, chunk_frames: int = 1) -> int:
        """From a chunk's first sample arriving to its codes, compute time not included."""
        return (chunk_frames + self.encoder_lag_frames) * self.hop_length

    def codec_latency_samples(self, chunk_frames: int = 1) -> int:
        """From a chunk's first sample arriving to its reconstruction, encoder then decoder
        stepping `chunk_frames` frames, compute time not included."""
        return self.encoder_latency_samples(chunk_frames) + self.decoder_lag_samples


def check_frame_streamable(config: EncodecConfig) -> None:
    """Raise `StreamingError` unless models of `config` stream frame by frame."""
    if config.chunk_length is not None:
        raise StreamingError(
            f"this model encodes its input in chunks of {config.chunk_length} samples "
            f"({config.chunk_length_s:g} s), each with its own normalisation: stream it chunk by "
            "chunk with streaming.ChunkEncoder / ChunkDecoder"
        )
    if config.normalize:
        raise StreamingError(
            "this model normalises its input by the RMS of the whole signal, which is not known "
            "before the signal ends: it cannot stream frame by frame"
        )
    stream_layers.check_settings(config.norm_type == "time_group_norm", config.pad_mode)


def prepare(model: EncodecModel | StreamingModel) -> StreamingModel:
    """The model laid out for streaming steps: weight norm combined and every weight in the
    layout of a small step, once, in the model's compute dtype (see `StreamingModel`).

    Raises:
        StreamingError: if the model does not stream frame by frame.
    """
    if isinstance(model, StreamingModel):
        return model
    check_frame_streamable(model.config)
    encoder_plan = stream_layers.plan(model.encoder.layers, model.config.hop_length)
    decoder_plan = stream_layers.plan(model.decoder.layers, 1)
    dtype = jnp.dtype(model.settings.compute_dtype)

    def lay_out(layers, p):
        w = stream_layers.weights(layers, p)
        return jax.tree.map(lambda a: a.astype(dtype), w)

    # One compiled program lays out a network (op by op, each new shape would compile its own).
    lay_out = jax.jit(lay_out, static_argnums=1)

    # The LSTM looks back over the whole past and never ahead: the encoder's look-ahead is that
    # of the convolutions before it (in samples) plus that of the layers after it (in frames).
    hop = model.config.hop_length
    before = model.encoder.convs_receptive_field
    after = stack_receptive_field(model.encoder.layers[model.encoder.lstm_index + 1 :])
    lookahead = max(0, math.ceil(before.right + after.right * before.stride) - (hop - 1))
    return StreamingModel(
        encoder=lay_out(model.encoder.layers, encoder_plan),
        decoder=lay_out(model.decoder.layers, decoder_plan),
        codebooks=model.quantizer.embeds(model.config.num_quantizers),
        config=model.config,
        settings=model.settings,
        encoder_plan=encoder_plan,
        decoder_plan=decoder_plan,
        encoder_lookahead=lookahead,
    )


def info(model: EncodecModel | StreamingModel) -> StreamInfo:
    """The `StreamInfo` of a model's frame streams (warmups, lags and look-ahead).

    Raises:
        StreamingError: if the model does not stream frame by frame.
    """
    codec = prepare(model)
    return StreamInfo(
        sampling_rate=codec.config.sampling_rate,
        hop_length=codec.config.hop_length,
        encoder_warmup_frames=codec.encoder_plan.frames,
        encoder_lag_frames=codec.encoder_plan.lag_out,
        encoder_lookahead_samples=codec.encoder_lookahead,
        decoder_warmup_frames=codec.decoder_plan.frames,
        decoder_lag_samples=codec.decoder_plan.lag_out,
    )


# ---- the encoder ----
def init_encoder_state(model: EncodecModel | StreamingModel, batch_size: int) -> StreamState:
    """The state of `batch_size` encoder streams before their first step."""
    codec = prepare(model)
    dtype = jnp.dtype(codec.settings.compute_dtype)
    return StreamState(stream_layers.init(codec.encoder_plan, batch_size, dtype), ENCODER)


def embed_step(
    model: EncodecModel | StreamingModel, state: StreamState, audio: jax.Array
) -> tuple[StreamState, jax.Array]:
    """One encoder step: audio `[B, C, n * hop]` -> (state, embeddings `[B, frames, D]` float32).

    frames = n, except on the first step: n - `encoder_lag_frames` (n must be at least
    `encoder_warmup_frames` there).
    """
    codec = prepare(model)
    p = codec.encoder_plan
    _check_state(state, ENCODER)
    _check_audio(codec, state, audio)
    with jax.default_matmul_precision(codec.settings.matmul_precision):
        x = _audio_in(codec, audio)
        layers, y = stream_layers.step(p, codec.encoder, state.layers, x, not state.started)
    if not state.started:
        y = y[:, p.lag_out :]
    return StreamState(layers, ENCODER, True), y.astype(jnp.float32)


def encode_step(
    model: EncodecModel | StreamingModel,
    state: StreamState,
    audio: jax.Array,
    num_quantizers: int,
) -> tuple[StreamState, jax.Array]:
    """One encoder step: audio `[B, C, n * hop]` -> (state, codes `[B, num_quantizers, frames]`),
    frames as in `embed_step`. `num_quantizers` is static."""
    codec = prepare(model)
    state, embeddings = embed_step(codec, state, audio)
    return state, quantize(codec, embeddings, num_quantizers)


def embed_flush(
    model: EncodecModel | StreamingModel, state: StreamState, audio: jax.Array, length
) -> tuple[jax.Array, jax.Array]:
    """The end of an encoder stream: its last `length` samples (traced; 0 <= length <= L) at the
    start of `audio` `[B, C, L]` (the rest is ignored), padded at the end as offline encoding
    pads the whole signal. Returns (embeddings `[B, F, D]`, traced count): the first `count`
    frames are the stream's last, `ceil(length / hop) + encoder_lag_frames` of them."""
    codec = prepare(model)
    _check_state(state, ENCODER, flush=True)
    _check_audio(codec, state, audio, flush=True)
    with jax.default_matmul_precision(codec.settings.matmul_precision):
        x = _audio_in(codec, audio)
        y, count = stream_layers.flush(codec.encoder_plan, codec.encoder, state.layers, x, length)
    return y.astype(jnp.float32), count


def encode_flush(
    model: EncodecModel | StreamingModel,
    state: StreamState,
    audio: jax.Array,
    length,
    num_quantizers: int,
) -> tuple[jax.Array, jax.Array]:
    """`embed_flush`, quantized: (codes `[B, num_quantizers, F]`, traced count of real frames)."""
    codec = prepare(model)
    embeddings, count = embed_flush(codec, state, audio, length)
    return quantize(codec, embeddings, num_quantizers), count


def quantize(model: EncodecModel | StreamingModel, embeddings: jax.Array, num_quantizers: int):
    """`functional.quantize` with the prepared model's stacked codebooks (same arithmetic)."""
    codec = prepare(model)
    _check_num_quantizers(codec, num_quantizers)
    with jax.default_matmul_precision(codec.settings.matmul_precision):
        return ops.rvq_encode(embeddings.astype(jnp.float32), codec.codebooks[:num_quantizers])


def dequantize(model: EncodecModel | StreamingModel, codes: jax.Array) -> jax.Array:
    """`functional.dequantize` with the prepared model's stacked codebooks (same arithmetic)."""
    codec = prepare(model)
    _check_codes(codec, codes)
    with jax.default_matmul_precision(codec.settings.matmul_precision):
        return ops.rvq_decode(codes, codec.codebooks[: codes.shape[1]])


# ---- the decoder ----
def init_decoder_state(model: EncodecModel | StreamingModel, batch_size: int) -> StreamState:
    """The state of `batch_size` decoder streams before their first step."""
    codec = prepare(model)
    dtype = jnp.dtype(codec.settings.compute_dtype)
    return StreamState(stream_layers.init(codec.decoder_plan, batch_size, dtype), DECODER)


def decode_embeddings_step(
    model: EncodecModel | StreamingModel, state: StreamState, embeddings: jax.Array
) -> tuple[StreamState, jax.Array]:
    """One decoder step: embeddings `[B, n, D]` -> (state, audio `[B, C, samples]` float32).

    samples = n * hop, except on the first step: n * hop - `decoder_lag_samples` (n must be at
    least `decoder_warmup_frames` there).
    """
    codec = prepare(model)
    p = codec.decoder_plan
    _check_state(state, DECODER)
    _check_frames(codec, state, embeddings.shape)
    with jax.default_matmul_precision(codec.settings.matmul_precision):
        x = embeddings.astype(codec.settings.compute_dtype)
        layers, y = stream_layers.step(p, codec.decoder, state.layers, x, not state.started)
    if not state.started:
        y = y[:, p.lag_out :]
    return StreamState(layers, DECODER, True), functional.finish_audio(y, None)


def decode_step(
    model: EncodecModel | StreamingModel, state: StreamState, codes: jax.Array
) -> tuple[StreamState, jax.Array]:
    """One decoder step: codes `[B, n_q, n]` -> (state, audio), as `decode_embeddings_step`."""
    codec = prepare(model)
    return decode_embeddings_step(codec, state, dequantize(codec, codes))


def decode_embeddings_flush(
    model: EncodecModel | StreamingModel, state: StreamState, embeddings: jax.Array, count
) -> tuple[jax.Array, jax.Array]:
    """The end of a decoder stream: its last `count` frames (traced; the rest of `embeddings`
    `[B, F, D]` is ignored). Returns (audio `[B, C, S]`, traced count): the first
    `count * hop + decoder_lag_samples` samples are the stream's last."""
    codec = prepare(model)
    _check_state(state, DECODER, flush=True)
    _check_frames(codec, state, embeddings.shape, flush=True)
    with jax.default_matmul_precision(codec.settings.matmul_precision):
        x = embeddings.astype(codec.settings.compute_dtype)
        y, samples = stream_layers.flush(codec.decoder_plan, codec.decoder, state.layers, x, count)
    return functional.finish_audio(y, None), samples


def decode_flush(
    model: EncodecModel | StreamingModel, state: StreamState, codes: jax.Array, count
) -> tuple[jax.Array, jax.Array]:
    """`decode_embeddings_flush` of codes `[B, n_q, F]` (the first `count` frames real)."""
    codec = prepare(model)
    return decode_embeddings_flush(codec, state, dequantize(codec, codes), count)


def _audio_in(codec: StreamingModel, audio: jax.Array) -> jax.Array:
    x, _ = functional.prepare_audio(codec, audio, None)  # [B, L, C] float32
    return x.astype(codec.settings.compute_dtype)


# ---- static checks: errors at trace time that say what is accepted ----
def _check_state(state, network: str, flush: bool = False) -> None:
    if not isinstance(state, StreamState) or state.network != network:
        got = state.network if isinstance(state, StreamState) else type(state).__name__
        raise StreamingError(f"expected the state of {network} streams, got {got}")
    if flush and not state.started:
        raise StreamingError(
            f"the {network} stream has not started, so there is nothing to flush; a signal "
            f"shorter than the first step's warmup runs offline "
            f"(functional.{'encode' if network == ENCODER else 'decode'}) instead"
        )


def _batch(state: StreamState) -> int:
    return jax.tree.leaves(state.layers)[0].shape[0]


def _check_audio(codec: StreamingModel, state: StreamState, audio, flush: bool = False) -> None:
    config = codec.config
    shape = tuple(audio.shape)
    if len(shape) != 3 or shape[1] != config.audio_channels:
        raise StreamingError(
            f"audio must be [batch, {config.audio_channels}, samples] for this model, got {shape}"
        )
    if not jnp.issubdtype(audio.dtype, jnp.floating):
        raise StreamingError(f"audio must be floating point, got {audio.dtype}")
    if shape[0] != _batch(state):
        raise StreamingError(f"audio has batch {shape[0]}, the stream state {_batch(state)}")
    if flush:
        return
    hop = config.hop_length
    if shape[2] % hop or shape[2] == 0:
        raise StreamingError(
            f"a step takes whole frames of {hop} samples, got {shape[2]} samples; a last, "
            f"partial frame goes to the flush"
        )
    _check_first(state, shape[2] // hop, codec.encoder_plan, "audio")


def _check_frames(codec: StreamingModel, state: StreamState, shape, flush: bool = False) -> None:
    hidden = codec.config.hidden_size
    if len(shape) != 3 or shape[-1] != hidden:
        raise StreamingError(f"embeddings must be [batch, frames, {hidden}], got {tuple(shape)}")
    if shape[0] != _batch(state):
        raise StreamingError(f"codes have batch {shape[0]}, the stream state {_batch(state)}")
    if not flush:
        if shape[1] == 0:
            raise StreamingError("a step takes at least one frame")
        _check_first(state, shape[1], codec.decoder_plan, "codes")


def _check_first(state: StreamState, frames: int, p: Plan, name: str) -> None:
    if not state.started and frames < p.frames:
        raise StreamingError(
            f"the first {state.network} step needs at least {p.frames} frames (the model's "
            f"padding makes its first outputs depend on later inputs), got {name} of "
            f"{frames} frames"
        )


def _check_num_quantizers(codec: StreamingModel, num_quantizers: int) -> None:
    if not 1 <= num_quantizers <= codec.config.num_quantizers:
        raise StreamingError(
            f"num_quantizers must be in 1..{codec.config.num_quantizers}, got {num_quantizers}"
        )


def _check_codes(codec: StreamingModel, codes) -> None:
    config = codec.config
    if codes.ndim != 3 or not 1 <= codes.shape[1] <= config.num_quantizers:
        raise StreamingError(
            f"codes must be [batch, n_q, frames] with 1 <= n_q <= {config.num_quantizers} for "
            f"this model, got shape {tuple(codes.shape)}"
        )
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise StreamingError(f"codes must be integers, got {codes.dtype}")
