"""Short-time Fourier transforms and mel spectrograms, as torchaudio computes them.

Everything that depends only on settings (windows, mel filterbanks, frame indices) is built in
NumPy at trace time, in the signal's dtype (float32, or float64 under `jax.enable_x64`), so it is
a constant of the compiled program; only the signal is traced.

Layout: signals are `[..., T]` (the losses pass `[B, C, T]`, like audiocraft). Spectrograms come
back time-major, `[..., frames, freq]` and `[..., frames, n_mels]`: the transpose of torchaudio's
`[..., freq, frames]`, because frames are what the framing produces and what the mel matmul and
the discriminator's channels-last convolutions want. The losses only average them, so only code
comparing against torchaudio needs to transpose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# torchaudio's `normalized`: True means "window".
Normalization = bool | str


def hann_window(length: int, dtype: type = np.float32) -> np.ndarray:
    """`torch.hann_window(length)` (periodic), `[length]`.

    Computed in float64 and rounded once to `dtype`; in float32 it can differ from torch's
    float32 arithmetic by one ulp of 1 (about 1.5e-7) in a few samples.
    """
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(dtype)


def hz_to_mel(freq: float | np.ndarray) -> float | np.ndarray:
    """HTK mel scale: `2595 log10(1 + f / 700)`."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq) / 700.0)


def mel_to_hz(mel: float | np.ndarray) -> float | np.ndarray:
    """Inverse of `hz_to_mel`."""
    mel = np.asarray(mel)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int,
    sample_rate: float,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    dtype: type = np.float32,
) -> np.ndarray:
    """torchaudio's `melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate)` with the HTK
    scale and no normalisation (norm=None), as a NumPy constant `[n_freqs, n_mels]`.

    Triangles whose corners are `n_mels + 2` points equally spaced in mel between `f_min` and
    `f_max`, evaluated at the frequencies of the STFT bins, `linspace(0, sample_rate // 2,
    n_freqs)`. Note the floor: torchaudio spaces the bins up to `sample_rate // 2`, and its
    `MelScale` takes `f_max=None` as `float(sample_rate // 2)` too (the same as `sample_rate / 2`
    for the even rates audio uses).

    Computed in float64 and rounded once to `dtype`. torchaudio computes in float32, which puts
    errors of up to about 1e-5 into its weights (a corner frequency off by an ulp, divided by a
    narrow band's width); these weights are the exact formula's, rounded.

    Args:
        n_freqs: STFT bins, `n_fft // 2 + 1`.
        sample_rate: in Hz.
        n_mels: mel bands. (With more bands than bins, as audiocraft's msspec has at n_fft 64,
            some bands are empty, all zeros; torchaudio warns, this does not.)
        f_min, f_max: band edges in Hz; `f_max=None` is `sample_rate // 2`.
        dtype: of the result.
    """
    if f_max is None:
        f_max = float(sample_rate // 2)
    if f_min > f_max:
        raise ValueError(f"f_min ({f_min}) must not exceed f_max ({f_max})")
    all_freqs = np.linspace(0.0, float(sample_rate // 2), n_freqs)
    m_pts = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    f_pts = mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -slopes[:, :-2] / f_diff[:-1]
    falling = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(dtype)


def frames(x: jax.Array, frame_length: int, hop_length: int) -> jax.Array:
    """Overlapping frames `[..., n_frames, frame_length]` of `x` `[..., T]`, as many whole frames
    as fit (`1 + (T - frame_length) // hop_length`).

    When the hop divides the frame length (every audiocraft setting but the MRSTFT's), frames are
    stacked from strided blocks (slices and a reshape, whose gradient is cheap everywhere); else a
    gather with static indices.
    """
    length = x.shape[-1]
    if length < frame_length:
        raise ValueError(f"Signal of {length} samples is shorter than one frame ({frame_length})")
    n_frames = 1 + (length - frame_length) // hop_length
    if frame_length % hop_length == 0:
        blocks_per_frame = frame_length // hop_length
        n_blocks = n_frames + blocks_per_frame - 1
        blocks = x[..., : n_blocks * hop_length].reshape(*x.shape[:-1], n_blocks, hop_length)
        return jnp.concatenate(
            [blocks[..., k : k + n_frames, :] for k in range(blocks_per_frame)], axis=-1
        )
    index = np.arange(n_frames)[:, None] * hop_length + np.arange(frame_length)[None, :]
    return x[..., index]


def _magnitude(spec: jax.Array, power: float) -> jax.Array:
    """`|spec| ** power`, with torch's gradient 0 (not NaN) where `spec` is exactly 0."""
    squared = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    if power == 2.0:
        return squared
    nonzero = squared > 0
    safe = jnp.where(nonzero, squared, 1.0)
    return jnp.where(nonzero, safe ** (power / 2.0), 0.0)


def stft(
    x: jax.Array,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    window: np.ndarray | jax.Array | None = None,
    center: bool = True,
    pad_mode: str = "reflect",
    normalized: Normalization = False,
    power: float | None = None,
) -> jax.Array:
    """torchaudio's `spectrogram` (`torch.stft` with a onesided output, then normalisation and
    power), time-major.

    Args:
        x: `[..., T]` real signal.
        n_fft: FFT size; `n_fft // 2 + 1` bins.
        hop_length: samples between frames.
        win_length: window length (default `n_fft`); a shorter window is zero-padded to `n_fft`
            on both sides, centred, as `torch.stft` does.
        window: `[win_length]`; default the periodic Hann window (`torch.hann_window`) in
            `x`'s dtype.
        center: pad `n_fft // 2` samples on both sides (`pad_mode`) so frame t is centred at
            `t * hop_length`; else frames start at 0 and only whole frames are kept.
        pad_mode: `jnp.pad` mode for `center` ("reflect" is torch's "reflect").
        normalized: as torchaudio: False; True or "window" divides by the window's L2 norm
            (`sqrt(sum(window ** 2))`); "frame_length" divides by `sqrt(n_fft)` (what
            `torch.stft(normalized=True)` does).
        power: None for the complex spectrum, else `|X| ** power` (1 magnitude, 2 power).

    Returns:
        `[..., frames, n_fft // 2 + 1]`, complex if `power` is None else real. Frames:
        `1 + T // hop_length` with `center`, else `1 + (T - n_fft) // hop_length`.
    """
    win_length = n_fft if win_length is None else win_length
    if window is None:
        window = hann_window(win_length, x.dtype)
    if window.shape != (win_length,):
        raise ValueError(f"window has shape {window.shape}, expected ({win_length},)")
    if normalized not in (False, True, "window", "frame_length"):
        raise ValueError(f"normalized must be a bool, 'window' or 'frame_length': {normalized!r}")
    left = (n_fft - win_length) // 2
    padded_window = jnp.pad(jnp.asarray(window, x.dtype), (left, n_fft - win_length - left))
    if center:
        if pad_mode == "reflect" and n_fft // 2 >= x.shape[-1]:
            # jnp.pad would reflect back and forth; torch refuses.
            raise ValueError(
                f"Signal of {x.shape[-1]} samples is too short to reflect-pad by {n_fft // 2}"
            )
        pad = [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)]
        x = jnp.pad(x, pad, mode=pad_mode)
    spec = jnp.fft.rfft(frames(x, n_fft, hop_length) * padded_window, n=n_fft, axis=-1)
    if normalized == "frame_length":
        spec = spec / math.sqrt(n_fft)
    elif normalized:
        spec = spec / jnp.sqrt(jnp.sum(jnp.asarray(window, x.dtype) ** 2))
    return spec if power is None else _magnitude(spec, power)


def mel_spectrogram(
    x: jax.Array,
    sample_rate: float,
    n_fft: int,
    n_mels: int,
    hop_length: int | None = None,
    win_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    power: float = 2.0,
    normalized: Normalization = False,
    center: bool = True,
    pad_mode: str = "reflect",
) -> jax.Array:
    """torchaudio's `MelSpectrogram` (Hann window, HTK scale, norm None), time-major.

    Args:
        x: `[..., T]`.
        sample_rate, n_mels, f_min, f_max: see `mel_filterbank`.
        n_fft, win_length, normalized, center, pad_mode, power: see `stft`; `power` defaults
            to 2 (a power spectrogram) as in torchaudio.
        hop_length: default `win_length // 2`, as torchaudio.

    Returns:
        `[..., frames, n_mels]`.
    """
    win_length = n_fft if win_length is None else win_length
    hop_length = win_length // 2 if hop_length is None else hop_length
    spec = stft(
        x,
        n_fft,
        hop_length,
        win_length,
        center=center,
        pad_mode=pad_mode,
        normalized=normalized,
        power=power,
    )
    fb = mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max, spec.dtype)
    # Full float32 precision: on GPUs XLA's default may round the operands to TF32.
    return jnp.matmul(spec, fb, precision=lax.Precision.HIGHEST)


def audiocraft_mel_spectrogram(
    x: jax.Array,
    sample_rate: float,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    win_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    normalized: bool = False,
    log: bool = True,
    floor_level: float = 1e-5,
) -> jax.Array:
    """audiocraft's `MelSpectrogramWrapper`: a power mel spectrogram of the padded signal.

    The signal is reflect-padded by `(n_fft - hop_length) // 2` on both sides, then zero-padded
    on the right until the last frame is whole, and transformed with `center=False`: that makes
    `ceil(T / hop_length)` frames. With `log`, `log10(floor_level + mel)`.

    Args:
        x: `[B, C, T]` (or `[B, T]`, taken as one channel).
        sample_rate, n_fft, hop_length, n_mels, win_length, f_min, f_max, normalized: as
            `mel_spectrogram` (power 2, Hann window).
        log, floor_level: the log10 compression.

    Returns:
        `[B, C, frames, n_mels]` (audiocraft returns `[B, C * n_mels, frames]`; the losses only
        average it).
    """
    if x.ndim == 2:
        x = x[:, None, :]
    length = x.shape[-1]
    side = (n_fft - hop_length) // 2
    if side >= length:
        raise ValueError(f"Signal of {length} samples is too short to reflect-pad by {side}")
    padded = length + 2 * side
    # audiocraft's pad_for_conv1d: the frames needed to cover the signal, rounded up.
    n_frames = -(-(padded - n_fft) // hop_length) + 1
    if n_frames < 1:
        raise ValueError(f"Signal of {length} samples is too short for n_fft={n_fft}")
    extra = (n_frames - 1) * hop_length + n_fft - padded
    pad = [(0, 0)] * (x.ndim - 1)
    x = jnp.pad(x, pad + [(side, side)], mode="reflect")
    x = jnp.pad(x, pad + [(0, extra)])
    mel = mel_spectrogram(
        x,
        sample_rate,
        n_fft,
        n_mels,
        hop_length,
        win_length,
        f_min,
        f_max,
        power=2.0,
        normalized=normalized,
        center=False,
    )
    return jnp.log10(floor_level + mel) if log else mel
