"""EnCodec's training losses, value for value as audiocraft 1.3.0 computes them.

Reconstruction losses take the prediction and the target as `[B, C, T]` (audiocraft's layout)
and return a scalar; they are pure and differentiable, so `jax.grad` with respect to the
prediction gives the gradient the balancer needs. Defaults are those of audiocraft's
`config/solver/compression/default.yaml` (which differ from the loss classes' own defaults).

The adversarial losses take the discriminator's outputs: one logit map per sub-discriminator and
one list of feature maps per sub-discriminator (any layout, as long as fake and real agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .spectral import audiocraft_mel_spectrogram, frames, stft

# torch.finfo(torch.float32).eps: the epsilon of audiocraft's SI-SNR and STFT losses.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
# The floor audiocraft's STFT losses clamp |X|^2 to, so that log and sqrt stay finite.
_STFT_FLOOR = 1e-7


def _abs(x: jax.Array) -> jax.Array:
    """|x| with torch's gradient sign(x), 0 at x = 0 (jnp.abs's is 1 there). Ties are common:
    clipped samples equal to their target, silent bands of both spectrograms."""
    return x * jnp.sign(x)


def _mean_abs(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(_abs(a - b))


def _mean_squared(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((a - b) ** 2)


def _norm(x: jax.Array) -> jax.Array:
    """Frobenius norm with torch's gradient at 0 (zero; the plain sqrt gives NaN). The spectral
    convergence of identical signals is exactly there."""
    squared = jnp.sum(x * x)
    nonzero = squared > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


# ---- reconstruction ----
def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """audiocraft's `l1` (`torch.nn.L1Loss`): mean absolute error over every sample."""
    return _mean_abs(pred, target)


def mel_loss(
    pred: jax.Array,
    target: jax.Array,
    sample_rate: float,
    n_fft: int = 1024,
    hop_length: int = 256,
    win_length: int = 1024,
    n_mels: int = 64,
    f_min: float = 64.0,
    f_max: float | None = None,
    log: bool = True,
    normalized: bool = False,
    floor_level: float = 1e-5,
) -> jax.Array:
    """audiocraft's `mel` (`MelSpectrogramL1Loss`): mean absolute difference of the log10 power
    mel spectrograms (`audiocraft_mel_spectrogram`).

    Args:
        pred, target: `[B, C, T]`.
        The rest: `audiocraft_mel_spectrogram`'s settings, default.yaml's `mel` by default.

    Returns:
        scalar.
    """

    def mel(x):
        return audiocraft_mel_spectrogram(
            x,
            sample_rate,
            n_fft,
            hop_length,
            n_mels,
            win_length,
            f_min,
            f_max,
            normalized=normalized,
            log=log,
            floor_level=floor_level,
        )

    return _mean_abs(mel(pred), mel(target))


def msspec_loss(
    pred: jax.Array,
    target: jax.Array,
    sample_rate: float,
    range_start: int = 6,
    range_end: int = 11,
    n_mels: int = 64,
    f_min: float = 64.0,
    f_max: float | None = None,
    normalized: bool = True,
    alphas: bool = False,
    floor_level: float = 1e-5,
) -> jax.Array:
    """audiocraft's `msspec` (`MultiScaleMelSpectrogramLoss`).

    For each `n_fft = 2**i`, `i` in `range(range_start, range_end)` (hop `n_fft // 4`, window
    `n_fft`): the mean absolute difference of the power mel spectrograms plus `alpha_i` times the
    mean squared difference of their `log10(floor_level + mel)`, summed over scales. `alpha_i` is
    `sqrt(n_fft - 1)` with `alphas`, else 1. With `normalized`, the sum is divided by
    `sum_i (alpha_i + 1)` (10 for default.yaml's five scales). `normalized` also selects the
    STFT's window normalisation, as in audiocraft, where one flag sets both.

    Args:
        pred, target: `[B, C, T]`.
        sample_rate: Hz.
        range_start, range_end, n_mels, f_min, f_max, normalized, alphas, floor_level:
            default.yaml's `msspec` by default.

    Returns:
        scalar.
    """
    loss = jnp.zeros((), pred.dtype)
    total = 0.0
    for i in range(range_start, range_end):
        n_fft = 2**i
        alpha = float(np.sqrt(n_fft - 1)) if alphas else 1.0

        def mel(x, n_fft=n_fft):
            return audiocraft_mel_spectrogram(
                x,
                sample_rate,
                n_fft,
                n_fft // 4,
                n_mels,
                n_fft,
                f_min,
                f_max,
                normalized=normalized,
                log=False,
            )

        # audiocraft computes each mel spectrogram twice (a log and a linear module); once here.
        mel_pred, mel_target = mel(pred), mel(target)
        loss = loss + _mean_abs(mel_pred, mel_target)
        loss = loss + alpha * _mean_squared(
            jnp.log10(floor_level + mel_pred), jnp.log10(floor_level + mel_target)
        )
        total += alpha + 1.0
    return loss / total if normalized else loss


def sisnr_loss(
    pred: jax.Array,
    target: jax.Array,
    sample_rate: float,
    segment: float | None = 5.0,
    overlap: float = 0.5,
    epsilon: float = FLOAT32_EPS,
) -> jax.Array:
    """audiocraft's `sisnr` (`SISNR`): minus the scale-invariant SNR in dB, averaged over items,
    channels and segments.

    The signal is cut into `ceil(T / stride)` segments of `segment` seconds, one every `stride =
    segment * (1 - overlap)` seconds, the last ones zero-padded (a signal shorter than one
    segment becomes one segment, mostly zeros: the mean removed per segment includes those
    zeros). Per segment and channel, with `e = epsilon * segment_samples`, `t` and `p` the
    centred target and prediction: `proj = <t, p> t / (e + |t|^2)`,
    `SI-SNR = 10 log10((e + |proj|^2) / (e + |p - proj|^2))`.

    Args:
        pred, target: `[B, C, T]`.
        sample_rate: Hz.
        segment: seconds per segment (default.yaml: 5); None for the whole signal as one segment
            (what audiocraft's None means to do; there it fails an assertion).
        overlap: fraction of a segment shared with the next.
        epsilon: per-sample stabiliser, scaled by the segment length.

    Returns:
        scalar, lower is better (negative when the SI-SNR is positive).
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"Expected two [B, C, T] arrays of one shape: {pred.shape}, {target.shape}"
        )
    length = target.shape[-1]
    if segment is None:
        frame = stride = length
    else:
        frame = int(segment * sample_rate)
        stride = int(frame * (1 - overlap))
    eps = epsilon * frame
    padded = (-(-length // stride) - 1) * stride + frame

    def segments(x):  # [B, C, n_segments, frame], centred
        x = jnp.pad(x, [(0, 0), (0, 0), (0, padded - length)])
        x = frames(x, frame, stride)
        return x - jnp.mean(x, axis=-1, keepdims=True)

    t, p = segments(target), segments(pred)
    dot = jnp.sum(t * p, axis=-1, keepdims=True)
    proj = dot * t / (eps + jnp.sum(t * t, axis=-1, keepdims=True))
    noise = p - proj
    sisnr = 10 * (
        jnp.log10(eps + jnp.sum(proj * proj, axis=-1))
        - jnp.log10(eps + jnp.sum(noise * noise, axis=-1))
    )
    return -jnp.mean(sisnr)


def mrstft_loss(
    pred: jax.Array,
    target: jax.Array,
    n_ffts: Sequence[int] = (1024, 2048, 512),
    hop_lengths: Sequence[int] = (120, 240, 50),
    win_lengths: Sequence[int] = (600, 1200, 240),
    factor_sc: float = 0.5,
    factor_mag: float = 0.5,
    normalized: bool = False,
    epsilon: float = FLOAT32_EPS,
) -> jax.Array:
    """audiocraft's `mrstft` (`MRSTFTLoss`): multi-resolution STFT distance.

    Per resolution, on magnitudes `sqrt(max(|X|^2, 1e-7))` of a centred (reflect-padded) STFT
    with a Hann window: the spectral convergence `||Y - X||_F / (||Y||_F + epsilon)` over the
    whole batch and the log-magnitude distance `mean|log(epsilon + Y) - log(epsilon + X)|`. Each
    is averaged over the resolutions; the result is `factor_sc * sc + factor_mag * mag`.

    Args:
        pred, target: `[B, C, T]`.
        n_ffts, hop_lengths, win_lengths: one resolution per entry (MRSTFTLoss's defaults).
        factor_sc, factor_mag: default.yaml's 0.5 and 0.5.
        normalized: `torch.stft`'s normalisation, dividing by `sqrt(n_fft)`.
        epsilon: stabiliser.

    Returns:
        scalar (audiocraft returns shape `[1]`).
    """
    if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
        raise ValueError("n_ffts, hop_lengths and win_lengths must have one entry per resolution")
    sc = mag = jnp.zeros((), pred.dtype)
    for n_fft, hop, win in zip(n_ffts, hop_lengths, win_lengths, strict=True):

        def magnitude(x, n_fft=n_fft, hop=hop, win=win):
            norm = "frame_length" if normalized else False
            power = stft(x, n_fft, hop, win, normalized=norm, power=2.0)
            # torch.clamp(min=): the gradient passes where power >= floor (jnp.maximum halves it
            # at a tie).
            return jnp.sqrt(jnp.where(power >= _STFT_FLOOR, power, _STFT_FLOOR))

        x_mag, y_mag = magnitude(pred), magnitude(target)
        sc = sc + _norm(y_mag - x_mag) / (_norm(y_mag) + epsilon)
        mag = mag + _mean_abs(jnp.log(epsilon + y_mag), jnp.log(epsilon + x_mag))
    n = len(n_ffts)
    return factor_sc * (sc / n) + factor_mag * (mag / n)


# ---- adversarial ----
def hinge_real_loss(logits: jax.Array) -> jax.Array:
    """Discriminator on real audio: `mean(relu(1 - D))`, written as audiocraft does,
    `-mean(min(D - 1, 0))`, so that the gradient at D = 1 is torch's (half)."""
    return -jnp.mean(jnp.minimum(logits - 1, 0.0))


def hinge_fake_loss(logits: jax.Array) -> jax.Array:
    """Discriminator on generated audio: `mean(relu(1 + D))`, as `-mean(min(-D - 1, 0))`."""
    return -jnp.mean(jnp.minimum(-logits - 1, 0.0))


def hinge_generator_loss(logits: jax.Array) -> jax.Array:
    """Generator: `-mean(D)` (audiocraft's `hinge_loss`; not the paper's `mean(relu(1 - D))`).
    An empty logit map counts 0, as in audiocraft."""
    if logits.size == 0:
        return jnp.zeros((), logits.dtype)
    return -jnp.mean(logits)


def feature_matching_loss(
    fmaps_fake: Sequence[jax.Array], fmaps_real: Sequence[jax.Array], normalize: bool = True
) -> jax.Array:
    """audiocraft's `FeatureMatchingLoss` with `L1Loss`, for one sub-discriminator: the mean
    absolute difference of each feature map, summed over the maps and, with `normalize`, divided
    by their number. (audiocraft also sums `mean|real|` per map into a `feat_scale` that it never
    uses; it is not computed here.)"""
    if len(fmaps_fake) != len(fmaps_real) or not fmaps_fake:
        raise ValueError("Expected as many fake as real feature maps, at least one")
    loss = jnp.zeros((), fmaps_fake[0].dtype)
    for fake, real in zip(fmaps_fake, fmaps_real, strict=True):
        if fake.shape != real.shape:
            raise ValueError(f"Feature maps differ in shape: {fake.shape}, {real.shape}")
        loss = loss + _mean_abs(fake, real)
    return loss / len(fmaps_fake) if normalize else loss


def discriminator_loss(
    logits_fake: Sequence[jax.Array], logits_real: Sequence[jax.Array], normalize: bool = True
) -> jax.Array:
    """The discriminator's hinge loss (`AdversarialLoss.train_adv`): per sub-discriminator
    `hinge_fake_loss(fake) + hinge_real_loss(real)`, summed, and with `normalize` (audiocraft's
    default) divided by the number of sub-discriminators.

    Args:
        logits_fake: per sub-discriminator, its logits on the generated audio (which the caller
            stops the gradient of: audiocraft detaches it).
        logits_real: the same on the real audio.
        normalize: average over sub-discriminators instead of summing.

    Returns:
        scalar.
    """
    if len(logits_fake) != len(logits_real):
        raise ValueError("Expected fake and real logits of the same sub-discriminators")
    loss = jnp.zeros((), logits_fake[0].dtype)
    for fake, real in zip(logits_fake, logits_real, strict=True):
        loss = loss + hinge_fake_loss(fake) + hinge_real_loss(real)
    return loss / len(logits_fake) if normalize else loss


def generator_adversarial_losses(
    logits_fake: Sequence[jax.Array],
    fmaps_fake: Sequence[Sequence[jax.Array]],
    fmaps_real: Sequence[Sequence[jax.Array]],
    normalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The generator's `(adv, feat)` (`AdversarialLoss.forward` with hinge and L1 features).

    `adv`: `hinge_generator_loss` summed over sub-discriminators; `feat`: `feature_matching_loss`
    summed over sub-discriminators; with `normalize` both are divided by the number of
    sub-discriminators (and each feature loss by its number of maps). The discriminator's
    parameters are the caller's constants; the gradient flows into the generated audio.

    Args:
        logits_fake: per sub-discriminator, its logits on the generated audio.
        fmaps_fake, fmaps_real: per sub-discriminator, its feature maps on the generated and on
            the real audio.
        normalize: audiocraft's `adversarial.normalize` (default True), applied to both.

    Returns:
        `(adv, feat)`, two scalars.
    """
    n = len(logits_fake)
    if len(fmaps_fake) != n or len(fmaps_real) != n:
        raise ValueError("Expected logits and feature maps of the same sub-discriminators")
    adv = feat = jnp.zeros((), logits_fake[0].dtype)
    for logits, fake, real in zip(logits_fake, fmaps_fake, fmaps_real, strict=True):
        adv = adv + hinge_generator_loss(logits)
        feat = feat + feature_matching_loss(fake, real, normalize)
    if normalize:
        adv, feat = adv / n, feat / n
    return adv, feat
