"""encodec_jax.metrics: each metric against an independent definition.

- SI-SNR and L1 against float64 NumPy written from the formula;
- the mel and STFT distances against audiocraft 1.3.0's `MultiScaleMelSpectrogramLoss` and
  `MRSTFTLoss` (default.yaml's settings) applied to each item alone, in float64 (the formula,
  to 1e-10) and float32 (what `eval` computes);
- the code statistics against a direct count (`collections.Counter`) and the entropy formula;
- PESQ, STOI and ViSQOL against their known values: identical signals give PESQ 4.644 (the top
  of the wide-band scale), STOI 1 and ViSQOL's maximum; a noisy copy scores lower; the wrappers
  pass the reference first (PESQ is not symmetric).

The speech metrics are checked on a synthetic voiced signal (a harmonic series with a moving
pitch, in syllable-like bursts), so nothing here needs espeak-ng.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from encodec_jax import metrics

from .train_helpers import SAMPLE_RATE, assert_close, signal_pairs, torch_default_dtype

CASES = list(signal_pairs())


def speech_like(rate: int, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """`[1, T]` float32: a voiced sound (harmonics of a pitch moving around 120 Hz) in bursts
    of about 0.3 s with a pause in the middle, peak 0.3. PESQ's voice activity detection
    takes it for speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30) if k * 150 < rate / 2)
    envelope = np.sin(np.pi * 3.5 * t) ** 2 * (np.abs(t - seconds / 2) > 0.15)
    x = voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)[None]


def noisy(x: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


# ---- SI-SNR and L1: NumPy from the formula ----
def si_snr_reference(pred: np.ndarray, target: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    out = []
    for p, t in zip(pred, target, strict=True):
        p = p.reshape(-1).astype(np.float64)
        t = t.reshape(-1).astype(np.float64)
        p, t = p - p.mean(), t - t.mean()
        s = (p @ t) / (t @ t + eps) * t
        e = p - s
        out.append(10 * math.log10((s @ s + eps) / (e @ e + eps)))
    return np.array(out)


@pytest.mark.parametrize("case", CASES)
def test_si_snr_and_l1_match_the_formula(case):
    """float64: to 1e-12 relative; float32: SI-SNR within 1e-3 dB, L1 to 1e-6 relative."""
    pred, target = signal_pairs()[case]
    with enable_x64(True):
        got = np.asarray(metrics.si_snr(jnp.asarray(pred), jnp.asarray(target)))
        got_l1 = np.asarray(metrics.l1(jnp.asarray(pred), jnp.asarray(target)))
    expected = si_snr_reference(pred, target)
    expected_l1 = np.abs(pred - target).reshape(len(pred), -1).mean(axis=-1)
    assert_close(got, expected, 1e-12, f"si_snr {case} float64")
    assert_close(got_l1, expected_l1, 1e-12, f"l1 {case} float64")
    p32, t32 = pred.astype(np.float32), target.astype(np.float32)
    got32 = np.asarray(metrics.si_snr(jnp.asarray(p32), jnp.asarray(t32)))
    np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-3)
    assert_close(metrics.l1(jnp.asarray(p32), jnp.asarray(t32)), expected_l1, 1e-6, "l1 f32")


def test_si_snr_ignores_scale_and_offset():
    """The defining property: a scaled, shifted copy scores the same (float64, 1e-9 dB)."""
    pred, target = signal_pairs()["random"]
    with enable_x64(True):
        a = np.asarray(metrics.si_snr(jnp.asarray(pred), jnp.asarray(target)))
        b = np.asarray(metrics.si_snr(jnp.asarray(3.0 * pred + 0.2), jnp.asarray(target)))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert np.all(a > 10)  # a noisy copy: about 12 dB


# ---- mel and STFT distances: audiocraft, item by item ----
@pytest.fixture(scope="module")
def audiocraft_distances():
    pytest.importorskip("torch")
    from .audiocraft_reference import audiocraft
    from .test_train_losses import DEFAULT_YAML

    refs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchaudio: empty mel bands at n_fft 64
        for dtype_name in ("float32", "float64"):
            import torch

            dtype = getattr(torch, dtype_name)
            with torch_default_dtype(dtype):
                refs["mel_distance", dtype_name] = audiocraft(
                    "losses.specloss"
                ).MultiScaleMelSpectrogramLoss(**DEFAULT_YAML["msspec"])
                refs["stft_distance", dtype_name] = audiocraft("losses.stftloss").MRSTFTLoss(
                    **DEFAULT_YAML["mrstft"]
                )
    return refs


def _per_item_reference(module, pred, target):
    import torch

    dtype = torch.float64 if pred.dtype == np.float64 else torch.float32
    with torch_default_dtype(dtype), torch.no_grad():
        return np.array(
            [
                float(module(torch.tensor(p[None]), torch.tensor(t[None])).sum())
                for p, t in zip(pred, target, strict=True)
            ]
        )


# jitted: one compile per dtype (run op by op, the first call costs seconds).
_JITTED = {
    "mel_distance": jax.jit(lambda p, t: metrics.mel_distance(p, t, SAMPLE_RATE)),
    "stft_distance": jax.jit(metrics.stft_distance),
}
# float32 tolerance: the losses' value tolerances of tests/test_train_losses.py (FLOAT32_TOL).
_FLOAT32_TOL = {"mel_distance": 1e-6, "stft_distance": 1e-5}


@pytest.mark.filterwarnings("ignore:At least one mel filterbank")
@pytest.mark.parametrize("name", ["mel_distance", "stft_distance"])
@pytest.mark.parametrize("case", ["random", "unrelated", "silence_pred", "clipping"])
def test_spectral_distances_match_audiocraft(audiocraft_distances, name, case):
    """Per item, audiocraft's loss on that item alone: float64 to 1e-10, float32 as the
    training losses' values (1e-6 mel, 1e-5 STFT, relative)."""
    pred, target = signal_pairs()[case]

    def ours(p, t):
        return np.asarray(_JITTED[name](jnp.asarray(p), jnp.asarray(t)))

    with enable_x64(True):
        got = ours(pred, target)
    expected = _per_item_reference(audiocraft_distances[name, "float64"], pred, target)
    assert got.shape == (len(pred),)
    assert_close(got, expected, 1e-10, f"{name} {case} float64")
    p32, t32 = pred.astype(np.float32), target.astype(np.float32)
    expected32 = _per_item_reference(audiocraft_distances[name, "float32"], p32, t32)
    assert_close(ours(p32, t32), expected32, _FLOAT32_TOL[name], f"{name} {case} float32")


# ---- code statistics: a direct count ----
def test_code_statistics_match_a_direct_count():
    """Counts with a frame mask and unused (negative) codes, exactly; entropy, perplexity,
    usage and the bitrates from the counted distribution in float64, to 1e-5 relative
    (float32 sums)."""
    rng = np.random.default_rng(0)
    bins, n_q = 16, 3
    # skewed distributions, one codebook using only 3 entries
    codes = np.stack(
        [
            rng.choice(bins, size=(4, 50), p=np.arange(1, bins + 1) / np.sum(np.arange(1, 17))),
            rng.integers(0, bins, size=(4, 50)),
            rng.choice([2, 5, 7], size=(4, 50)),
        ],
        axis=1,
    )  # [B, n_q, T]
    codes[0, 1, :5] = -1  # unused
    valid = np.ones((4, 50), bool)
    valid[3, 40:] = False  # padding
    counts = np.asarray(metrics.code_counts(jnp.asarray(codes), bins, jnp.asarray(valid)))
    assert counts.shape == (n_q, bins)
    frame_rate = 75
    total_bits = 0.0
    for q in range(n_q):
        seen = Counter(
            int(codes[b, q, t])
            for b in range(4)
            for t in range(50)
            if valid[b, t] and codes[b, q, t] >= 0
        )
        expected = np.array([seen.get(i, 0) for i in range(bins)], np.float64)
        np.testing.assert_array_equal(counts[q], expected)
        p = expected[expected > 0] / expected.sum()
        entropy = float(-(p * np.log2(p)).sum())
        total_bits += entropy
        assert_close(metrics.entropy_bits(jnp.asarray(counts))[q], entropy, 1e-5, f"H q{q}")
        assert_close(metrics.perplexity(jnp.asarray(counts))[q], 2**entropy, 1e-5, f"ppl q{q}")
        assert float(metrics.usage(jnp.asarray(counts))[q]) == len(seen) / bins
    assert_close(
        metrics.entropy_kbps(jnp.asarray(counts), frame_rate),
        total_bits * frame_rate / 1000,
        1e-5,
        "entropy kbps",
    )
    # the third codebook: 3 entries, log2(3) bits at most
    assert float(metrics.entropy_bits(jnp.asarray(counts))[2]) <= math.log2(3) + 1e-6


def test_nominal_kbps_is_the_target_bandwidth():
    """The published models: 24 kHz 8 x 10 bits x 75 Hz = 6 kbps; 32 kHz 4 x 11 bits x 50 Hz
    = 2.2 kbps; 48 kHz 2 x 10 bits x 150 Hz = 3 kbps."""
    assert metrics.nominal_kbps(8, 1024, 75) == 6.0
    assert metrics.nominal_kbps(4, 2048, 50) == pytest.approx(2.2, abs=1e-12)
    assert metrics.nominal_kbps(2, 1024, 150) == 3.0


def test_entropy_of_no_counts_is_zero():
    counts = jnp.zeros((2, 8))
    np.testing.assert_array_equal(metrics.entropy_bits(counts), 0.0)
    np.testing.assert_array_equal(metrics.perplexity(counts), 0.0)


# ---- PESQ, STOI, ViSQOL ----
@pytest.mark.parametrize("rate", [16000, 8000, 24000])
def test_pesq_and_stoi_known_values(rate):
    """Identical: PESQ 4.643888 (the wide-band maximum, to 1e-5), STOI 1 (to 1e-9). A noisy
    copy (10 dB SNR): PESQ below 2.5, STOI below 0.99. Any input rate (resampled to 16 kHz)."""
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    x = speech_like(rate)
    n = noisy(x, 10)
    assert metrics.pesq_wb(x, x, rate) == pytest.approx(4.643888, abs=1e-5)
    assert metrics.stoi(x, x, rate) == pytest.approx(1.0, abs=1e-9)
    p, s = metrics.pesq_wb(x, n, rate), metrics.stoi(x, n, rate)
    print(f"{rate} Hz, 10 dB SNR: PESQ {p:.3f}, STOI {s:.4f}")
    assert 1.0 < p < 2.5
    assert 0.5 < s < 0.99
    # more noise, lower scores
    assert metrics.pesq_wb(x, noisy(x, 0), rate) < p
    assert metrics.stoi(x, noisy(x, 0), rate) < s


def test_pesq_and_stoi_take_the_reference_first():
    """At 16 kHz the wrappers are the packages' own calls, reference first: PESQ of (clean,
    noisy) is what `pesq.pesq(16000, clean, noisy, 'wb')` gives and differs from the swapped
    call; `stoi` equals `pystoi.stoi(clean, noisy, 16000)`; `extended` gives ESTOI."""
    pesq = pytest.importorskip("pesq")
    pystoi = pytest.importorskip("pystoi")
    x = speech_like(16000)
    n = noisy(x, 5)
    ref, deg = x[0].astype(np.float64), n[0].astype(np.float64)
    assert metrics.pesq_wb(x, n, 16000) == pesq.pesq(16000, ref, deg, "wb")
    assert abs(pesq.pesq(16000, deg, ref, "wb") - pesq.pesq(16000, ref, deg, "wb")) > 0.01
    # (ESTOI differs in the last bit from call to call)
    assert metrics.stoi(x, n, 16000) == pytest.approx(pystoi.stoi(ref, deg, 16000), rel=1e-12)
    estoi = pystoi.stoi(ref, deg, 16000, True)
    assert metrics.stoi(x, n, 16000, extended=True) == pytest.approx(estoi, rel=1e-12)
    assert abs(estoi - pystoi.stoi(ref, deg, 16000)) > 0.01


def test_speech_metrics_mix_channels_down_and_check_shapes():
    """Stereo is averaged to mono first: a stereo pair of identical channels scores as mono."""
    pytest.importorskip("pystoi")
    x = speech_like(16000)
    n = noisy(x, 10)
    stereo_x, stereo_n = np.concatenate([x, x]), np.concatenate([n, n])
    assert metrics.stoi(stereo_x, stereo_n, 16000) == pytest.approx(metrics.stoi(x, n, 16000))
    with pytest.raises(ValueError, match="one shape"):
        metrics.stoi(x, n[:, :-1], 16000)


def test_visqol_known_values():
    """visqol-python's speech mode: identical signals score above 4.3 (its maximum is about
    4.6 with the lattice mapper), a 0 dB noisy copy below 2.5."""
    if not metrics.visqol_available():
        pytest.skip("visqol-python is not installed")
    x = speech_like(16000)
    same = metrics.visqol_speech(x, x, 16000)
    bad = metrics.visqol_speech(x, noisy(x, 0), 16000)
    print(f"ViSQOL identical {same:.3f}, 0 dB noise {bad:.3f}")
    assert 4.3 < same <= 5.0
    assert 1.0 <= bad < 2.5
