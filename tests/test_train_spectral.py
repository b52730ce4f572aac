"""encodec_jax.train.spectral against torchaudio's own Python code (Spectrogram, MelSpectrogram,
melscale_fbanks), audiocraft's MelSpectrogramWrapper, and an independent HTK filterbank.

Errors are measured as max |a - b| / max |b| over the whole array (`train_helpers.errors`).
float64 runs (`jax.enable_x64`, torch's default dtype float64 for the reference's
windows and filterbanks) check the formulas to ~1e-12; float32 runs check what training uses.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from encodec_jax.train import spectral

from .audiocraft_reference import audiocraft, torchaudio_functional, torchaudio_transforms
from .train_helpers import SAMPLE_RATE, assert_close, signal_pairs, torch_default_dtype

torch = pytest.importorskip("torch")
# torchaudio warns when some mel bands are empty (msspec's 64 bands over 33 bins at n_fft 64).
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filterbank")


def htk_filterbank(n_freqs, sample_rate, n_mels, f_min, f_max):
    """Written from the HTK formula, band by band (not torchaudio's vectorised slopes)."""

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0.0, sample_rate // 2, n_freqs)
    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bins):
            if lo <= f <= mid:
                fb[k, m] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                fb[k, m] = (hi - f) / (hi - mid)
    return fb


# (n_fft, sample_rate, n_mels, f_min, f_max): msspec's and mel's at the three codec rates, the
# defaults of torchaudio, an explicit f_max, an odd rate (sample_rate // 2 is floored).
FILTERBANKS = [
    (64, 16000, 64, 64.0, None),
    (256, 24000, 64, 64.0, None),
    (1024, 32000, 64, 64.0, None),
    (2048, 48000, 80, 0.0, None),
    (400, 16000, 128, 0.0, 6000.0),
    (512, 22051, 40, 20.0, None),
]


@pytest.mark.parametrize("n_fft, sample_rate, n_mels, f_min, f_max", FILTERBANKS)
def test_mel_filterbank(n_fft, sample_rate, n_mels, f_min, f_max):
    """float64: equal to the independent HTK formula and to torchaudio run in float64 (1e-12);
    float32: equal to torchaudio's float32 filterbank within its own float32 rounding (1e-5 abs
    on weights <= 1: torchaudio's corner frequencies are off by an ulp, divided by the bands'
    widths; see `mel_filterbank`)."""
    n_freqs = n_fft // 2 + 1
    ours64 = spectral.mel_filterbank(n_freqs, sample_rate, n_mels, f_min, f_max, np.float64)
    ours32 = spectral.mel_filterbank(n_freqs, sample_rate, n_mels, f_min, f_max)
    assert ours32.dtype == np.float32 and ours64.shape == (n_freqs, n_mels)
    top = float(sample_rate // 2) if f_max is None else f_max
    htk = htk_filterbank(n_freqs, sample_rate, n_mels, f_min, top)
    assert htk.max() > 0.5  # the bands are not all empty
    assert_close(ours64, htk, 1e-12, "float64 vs HTK formula")
    functional = torchaudio_functional()
    with torch_default_dtype(torch.float64):
        ta64 = functional.melscale_fbanks(n_freqs, f_min, top, n_mels, sample_rate).numpy()
    assert ta64.dtype == np.float64
    assert_close(ours64, ta64, 1e-12, "float64 vs torchaudio float64")
    ta32 = functional.melscale_fbanks(n_freqs, f_min, top, n_mels, sample_rate).numpy()
    assert_close(ours32, ta32, 1e-5, "float32 vs torchaudio float32")


def test_mel_filterbank_f_max_default_is_floored_half_rate():
    odd = spectral.mel_filterbank(257, 22051, 40, 0.0)
    assert np.array_equal(odd, spectral.mel_filterbank(257, 22051, 40, 0.0, 11025.0))
    with pytest.raises(ValueError, match="f_min"):
        spectral.mel_filterbank(257, 16000, 40, 9000.0)


def _signal(dtype):
    pred, target = signal_pairs()["random"]
    return np.concatenate([pred, target], axis=1).astype(dtype)  # [2, 2, 4000]: stereo


# Every setting the training code uses, and a few more: (kwargs, who uses it).
STFTS = [
    (dict(n_fft=1024, hop_length=256, center=False, normalized=True, power=None), "msstftd"),
    (
        dict(n_fft=128, hop_length=32, win_length=96, center=False, normalized=True, power=None),
        "msstftd",
    ),
    (dict(n_fft=1024, hop_length=120, win_length=600, power=2.0), "mrstft"),
    (
        dict(n_fft=2048, hop_length=240, win_length=1200, normalized="frame_length", power=2.0),
        "mrstft",
    ),
    (dict(n_fft=64, hop_length=16, center=False, normalized=True, power=2.0), "msspec"),
    (dict(n_fft=400, hop_length=100, power=1.0), "magnitude"),
    (dict(n_fft=256, hop_length=64, power=0.5), "other power"),
]


@pytest.mark.parametrize("dtype, rel", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("kwargs, user", STFTS, ids=[u for _, u in STFTS])
def test_stft_matches_torchaudio_spectrogram(kwargs, user, dtype, rel):
    """torchaudio's Spectrogram with a Hann window; our output transposed to its layout.
    float32 tolerance 2e-6: two FFT libraries' rounding."""
    x = _signal(dtype)
    with torch_default_dtype(torch.float64 if dtype == np.float64 else torch.float32):
        transform = torchaudio_transforms().Spectrogram(window_fn=torch.hann_window, **kwargs)
        ref = transform(torch.from_numpy(x)).numpy()
    with enable_x64(dtype == np.float64):
        out = np.asarray(jax.jit(lambda s: spectral.stft(s, **kwargs))(jnp.asarray(x)))
    assert out.dtype == ref.dtype
    assert_close(np.swapaxes(out, -1, -2), ref, rel, f"{user} {dtype.__name__}")


@pytest.mark.parametrize("power", [None, 1.0, 2.0])
def test_stft_gradient_at_silence_is_finite(power):
    """torch's |X| has gradient 0 where X = 0; a plain sqrt would give NaN."""

    def total(x):
        spec = spectral.stft(x, 64, 16, power=power)
        return jnp.sum(jnp.abs(spec)) if power is None else jnp.sum(spec)

    grad = jax.jit(jax.grad(total))(jnp.zeros((1, 256)))
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)


def test_stft_rejects_short_signals_and_bad_settings():
    with pytest.raises(ValueError, match="shorter than one frame"):
        spectral.stft(jnp.zeros((1, 100)), 128, 32, center=False)
    with pytest.raises(ValueError, match="reflect-pad"):  # torch refuses too
        spectral.stft(jnp.zeros((1, 64)), 128, 32)
    with pytest.raises(ValueError, match="normalized"):
        spectral.stft(jnp.zeros((1, 1000)), 128, 32, normalized="energy")
    with pytest.raises(ValueError, match="window"):
        spectral.stft(jnp.zeros((1, 1000)), 128, 32, window=np.ones(100))


# (kwargs of MelSpectrogram): msspec's five scales' settings (as audiocraft's wrapper builds
# them), mel's, and torchaudio's centred default.
MELS = [
    dict(n_fft=2**i, hop_length=2**i // 4, n_mels=64, f_min=64.0, normalized=True, center=False)
    for i in range(6, 11)
] + [
    dict(n_fft=1024, hop_length=256, n_mels=64, f_min=64.0, center=False),
    dict(n_fft=400, n_mels=128),
]


@pytest.mark.parametrize("dtype, rel", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("kwargs", MELS, ids=[f"n_fft{m['n_fft']}" for m in MELS])
def test_mel_spectrogram_matches_torchaudio(kwargs, dtype, rel):
    """float32 tolerance 2e-5: torchaudio's float32 filterbank (see test_mel_filterbank)."""
    x = _signal(dtype)
    with torch_default_dtype(torch.float64 if dtype == np.float64 else torch.float32):
        transform = torchaudio_transforms().MelSpectrogram(
            sample_rate=SAMPLE_RATE, window_fn=torch.hann_window, **kwargs
        )
        ref = transform(torch.from_numpy(x)).numpy()
    with enable_x64(dtype == np.float64):
        fn = jax.jit(lambda s: spectral.mel_spectrogram(s, SAMPLE_RATE, **kwargs))
        out = np.asarray(fn(jnp.asarray(x)))
    assert out.dtype == ref.dtype
    assert_close(np.swapaxes(out, -1, -2), ref, rel, f"mel {kwargs['n_fft']} {dtype.__name__}")


@pytest.mark.parametrize("length, log", [(4000, True), (3999, False), (200, False)])
def test_audiocraft_mel_spectrogram_matches_wrapper(length, log):
    """audiocraft's MelSpectrogramWrapper (reflect and frame padding, center=False) at msspec's
    five scales: ceil(T / hop) frames, equal values. float64 (1e-12) with the reference built
    in float64; float32 is checked through the losses. 200 samples: shorter than the largest
    frames (n_fft 1024's reflect padding does not fit, in torch either)."""
    specloss = audiocraft("losses.specloss")
    x = _signal(np.float64)[..., :length]
    for i in range(6, 11):
        n_fft = 2**i
        if (n_fft - n_fft // 4) // 2 >= length:
            with pytest.raises(ValueError, match="too short"):
                spectral.audiocraft_mel_spectrogram(x, SAMPLE_RATE, n_fft, n_fft // 4, 64)
            continue
        with torch_default_dtype(torch.float64), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchaudio: empty mel bands
            wrapper = specloss.MelSpectrogramWrapper(
                n_fft=n_fft,
                hop_length=n_fft / 4,
                win_length=n_fft,
                n_mels=64,
                sample_rate=SAMPLE_RATE,
                f_min=64.0,
                log=log,
                normalized=True,
            )
            ref = wrapper(torch.from_numpy(x)).numpy()  # [B, C * n_mels, frames]

        def mel(s, n_fft=n_fft):
            return spectral.audiocraft_mel_spectrogram(
                s, SAMPLE_RATE, n_fft, n_fft // 4, 64, n_fft, 64.0, normalized=True, log=log
            )

        with enable_x64(True):
            out = np.asarray(jax.jit(mel)(jnp.asarray(x)))
        b, c, frames, mels = out.shape
        assert frames == -(-length // (n_fft // 4))
        out = np.swapaxes(out, -1, -2).reshape(b, c * mels, frames)
        assert_close(out, ref, 1e-12, f"wrapper n_fft {n_fft} T {length} log {log}")


def test_audiocraft_mel_spectrogram_accepts_b_t_and_rejects_short():
    x = jnp.asarray(_signal(np.float32)[:, 0])
    mel = spectral.audiocraft_mel_spectrogram(x, SAMPLE_RATE, 256, 64, 32)
    assert mel.shape == (2, 1, 4000 // 64 + 1, 32)
    with pytest.raises(ValueError, match="too short"):
        spectral.audiocraft_mel_spectrogram(x[:, :96], SAMPLE_RATE, 256, 64, 32)
