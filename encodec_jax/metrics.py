"""How good is a reconstruction, and how are the codes used: the metrics that the trainer's
validation and `encodec-jax eval` report, as pure JAX functions of the audio and the codes.

Audio metrics compare a reconstruction with its reference item by item, `[B, C, T]` -> `[B]`:
- `si_snr`: scale-invariant signal-to-noise ratio in dB over the whole item (channels
  concatenated), higher is better;
- `mel_distance`: audiocraft's multi-scale mel-spectrogram distance (`msspec`, n_fft 64 to 1024),
  lower is better;
- `stft_distance`: audiocraft's multi-resolution STFT distance (`mrstft`), lower is better;
- `l1`: mean absolute difference of the samples.
The spectral distances are those of `encodec_jax.train.losses`, so a validation number and a
training loss of the same name mean the same thing.

Code statistics count how often each entry of each codebook is used (`code_counts`) and give
per codebook the perplexity (exp of the entropy, `bins` at best), the entropy in bits per code
(the rate an ideal entropy coder would reach), and the share of entries in use; `entropy_kbps`
and `nominal_kbps` turn them into bitrates.

Speech metrics from outside packages run on the host, on NumPy arrays mixed down to mono and
resampled to 16 kHz (what they are defined at): `pesq_wb` (ITU-T P.862.2 wide band, the `pesq`
package), `stoi` (the `pystoi` package) and `visqol_speech` (ViSQOL v3's speech mode through
`visqol-python`, a Python port of Google's C++ ViSQOL). They are optional dependencies (the
`eval` extra), imported when called.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .train import losses


def si_snr(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Scale-invariant SNR in dB of each item: `[B, C, T]` -> `[B]`.

    Both signals are made zero-mean; `s = <pred, t> t / |t|^2` is the part of the prediction
    along the target `t`, `e = pred - s` the rest, and the result is `10 log10(|s|^2 / |e|^2)`
    (each energy plus `eps`, so silence against silence gives 0 dB rather than a NaN).
    """
    pred = pred.reshape(pred.shape[0], -1)
    target = target.reshape(target.shape[0], -1)
    pred = pred - jnp.mean(pred, axis=-1, keepdims=True)
    target = target - jnp.mean(target, axis=-1, keepdims=True)
    dot = jnp.sum(pred * target, axis=-1, keepdims=True)
    energy = jnp.sum(target * target, axis=-1, keepdims=True)
    s = dot / (energy + eps) * target
    e = pred - s
    return 10 * jnp.log10((jnp.sum(s * s, axis=-1) + eps) / (jnp.sum(e * e, axis=-1) + eps))


def mel_distance(pred: jax.Array, target: jax.Array, sample_rate: int) -> jax.Array:
    """audiocraft's multi-scale mel distance (`msspec` with its defaults) of each item `[B]`."""
    return jax.vmap(lambda p, t: losses.msspec_loss(p[None], t[None], sample_rate))(pred, target)


def stft_distance(pred: jax.Array, target: jax.Array) -> jax.Array:
    """audiocraft's multi-resolution STFT distance (`mrstft` with its defaults) of each item."""
    return jax.vmap(lambda p, t: losses.mrstft_loss(p[None], t[None]))(pred, target)


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute sample difference of each item `[B]`."""
    return jnp.mean(jnp.abs(pred - target).reshape(pred.shape[0], -1), axis=-1)


def reconstruction_metrics(
    pred: jax.Array, target: jax.Array, sample_rate: int
) -> dict[str, jax.Array]:
    """Every audio metric of each item: `[B, C, T]` -> {name: `[B]`}, names as in
    `AUDIO_METRICS`. Pure; jit it with `sample_rate` static."""
    return {
        "si_snr": si_snr(pred, target),
        "mel_distance": mel_distance(pred, target, sample_rate),
        "stft_distance": stft_distance(pred, target),
        "l1": l1(pred, target),
    }


# The audio metrics and whether higher is better.
AUDIO_METRICS = {"si_snr": True, "mel_distance": False, "stft_distance": False, "l1": False}


def code_counts(codes: jax.Array, bins: int, valid: jax.Array | None = None) -> jax.Array:
    """How often each entry of each codebook occurs: codes `[B, n_q, T]` -> `[n_q, bins]`.

    Args:
        codes: integer codes; negative values (unused codebooks) are not counted.
        bins: entries per codebook.
        valid: optional `[B, T]` mask of the frames to count (padding excluded).
    """
    n_q = codes.shape[1]
    weights = jnp.ones(codes.shape, jnp.float32)
    if valid is not None:
        weights = weights * valid[:, None, :].astype(jnp.float32)
    weights = jnp.where(codes >= 0, weights, 0.0)
    flat = jnp.clip(codes, 0, bins - 1).transpose(1, 0, 2).reshape(n_q, -1)
    flat_w = weights.transpose(1, 0, 2).reshape(n_q, -1)
    return jax.vmap(lambda c, w: jnp.zeros(bins, jnp.float32).at[c].add(w))(flat, flat_w)


def entropy_bits(counts: jax.Array) -> jax.Array:
    """Entropy in bits per code of each codebook's empirical distribution `[n_q, bins]` ->
    `[n_q]` (0 for a codebook with no counts)."""
    total = jnp.sum(counts, axis=-1, keepdims=True)
    p = counts / jnp.where(total > 0, total, 1.0)
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(safe), 0.0), axis=-1)


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of each codebook's usage `[n_q, bins]` -> `[n_q]`: the number of equally used
    entries that would give the same entropy (`bins` when all are used equally)."""
    return jnp.where(jnp.sum(counts, axis=-1) > 0, 2.0 ** entropy_bits(counts), 0.0)


def usage(counts: jax.Array) -> jax.Array:
    """Share of each codebook's entries that occur at least once `[n_q, bins]` -> `[n_q]`."""
    return jnp.mean(counts > 0, axis=-1)


def entropy_kbps(counts: jax.Array, frame_rate: float) -> jax.Array:
    """The bitrate in kbps an ideal entropy coder would reach coding each codebook on its own
    with its empirical code distribution: the summed entropies `[n_q, bins]` x frames per
    second / 1000 (a scalar). It ignores dependencies between codebooks and frames, as the
    simplest coder does (a model of the codes, as EnCodec's language model, saves more)."""
    return jnp.sum(entropy_bits(counts)) * frame_rate / 1000


def nominal_kbps(num_quantizers: int, bins: int, frame_rate: float) -> float:
    """The bitrate of the codes as stored, `log2(bins)` bits per code: `num_quantizers` x
    `log2(bins)` x frames per second / 1000 (a model's target bandwidth)."""
    return num_quantizers * math.log2(bins) * frame_rate / 1000


# ---- speech metrics from outside packages (host, NumPy) ----
SPEECH_SAMPLE_RATE = 16000
# The speech metrics and whether higher is better.
SPEECH_METRICS = {"pesq": True, "stoi": True, "visqol": True}


def to_speech_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """`[C, T]` (or `[T]`) audio -> mono float64 `[T']` at 16 kHz: channels averaged, resampled
    with soxr at high quality (as `encodec_jax.audio.load_audio` resamples)."""
    import soxr

    mono = np.asarray(audio, np.float64)
    if mono.ndim == 2:
        mono = mono.mean(axis=0)
    if mono.ndim != 1:
        raise ValueError(f"Expected audio [channels, samples] or [samples], got {audio.shape}")
    if sample_rate != SPEECH_SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SPEECH_SAMPLE_RATE, quality="HQ")
    return mono


def pesq_wb(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """Wide-band PESQ (P.862.2, MOS-LQO from about 1.04 to 4.64) of `degraded` against
    `reference`, both `[C, T]` or `[T]` at `sample_rate`.

    Raises:
        pesq.PesqError: e.g. `NoUtterancesError` when the reference holds no speech.
    """
    from pesq import pesq

    ref, deg = _speech_pair(reference, degraded, sample_rate)
    return float(pesq(SPEECH_SAMPLE_RATE, ref, deg, "wb"))


def stoi(
    reference: np.ndarray, degraded: np.ndarray, sample_rate: int, extended: bool = False
) -> float:
    """Short-time objective intelligibility (0 to 1; `extended`: ESTOI) of `degraded` against
    `reference`, both `[C, T]` or `[T]` at `sample_rate`, computed at 16 kHz by `pystoi` (which
    resamples to its own 10 kHz)."""
    from pystoi import stoi as pystoi_stoi

    ref, deg = _speech_pair(reference, degraded, sample_rate)
    return float(pystoi_stoi(ref, deg, SPEECH_SAMPLE_RATE, extended=extended))


def visqol_available() -> bool:
    """Whether `visqol-python` is installed (`visqol_speech` needs it)."""
    import importlib.util

    return importlib.util.find_spec("visqol") is not None


def visqol_speech(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """ViSQOL v3 speech-mode MOS-LQO (1 to 5) of `degraded` against `reference`, both `[C, T]`
    or `[T]` at `sample_rate`, computed at 16 kHz by `visqol-python` (its deep-lattice mapper,
    C++ ViSQOL's default, when `ai-edge-litert` is installed; its polynomial fallback
    otherwise, which reads higher on degraded speech)."""
    ref, deg = _speech_pair(reference, degraded, sample_rate)
    return float(_visqol_api().measure_from_arrays(ref, deg, SPEECH_SAMPLE_RATE).moslqo)


@functools.cache
def _visqol_api():
    from visqol import VisqolApi

    api = VisqolApi()
    api.create(mode="speech")
    return api


def _speech_pair(reference, degraded, sample_rate) -> tuple[np.ndarray, np.ndarray]:
    if np.shape(reference) != np.shape(degraded):
        raise ValueError(
            f"Expected reference and degraded audio of one shape: {np.shape(reference)}, "
            f"{np.shape(degraded)}"
        )
    return to_speech_rate(reference, sample_rate), to_speech_rate(degraded, sample_rate)
