"""Shared by the training parity tests: signals, float64 references, and one error measure."""

from __future__ import annotations

import contextlib

import numpy as np

SAMPLE_RATE = 16000
SHAPE = (2, 1, 4000)  # [B, C, T]: a quarter second at 16 kHz


def signal_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, target) pairs `[B, C, T]` float64, the cases every loss is checked on.

    "random": a target of sines and noise, the prediction a noisy copy of it (a reconstruction);
    "unrelated": independent noise; silence on both sides and on either side; "clipping": both
    signals at full scale, most samples exactly +-1.
    """
    rng = np.random.default_rng(1234)
    b, c, t = SHAPE
    time = np.arange(t) / SAMPLE_RATE
    freqs = rng.uniform(100, 4000, size=(b, c, 3, 1))
    target = 0.3 * np.sin(2 * np.pi * freqs * time).sum(axis=2) + 0.05 * rng.normal(size=SHAPE)
    pred = target + 0.1 * rng.normal(size=SHAPE)
    zeros = np.zeros(SHAPE)
    return {
        "random": (pred, target),
        "unrelated": (0.3 * rng.normal(size=SHAPE), 0.3 * rng.normal(size=SHAPE)),
        "silence_both": (zeros, zeros),
        "silence_pred": (zeros, target),
        "silence_target": (pred, zeros),
        "clipping": (
            np.clip(3 * rng.normal(size=SHAPE), -1, 1),
            np.clip(3 * target + rng.normal(size=SHAPE), -1, 1),
        ),
    }


@contextlib.contextmanager
def torch_default_dtype(dtype):
    """Build (and run) a reference with torch's default dtype set, so that the buffers it makes
    (windows, mel filterbanks, audiocraft's `torch.Tensor([0.0])` accumulators) have it."""
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def errors(actual, expected) -> tuple[float, float]:
    """(max abs error, max abs error / max |expected|): the relative error of the whole array,
    so that entries near zero do not dominate; for an all-zero reference it is the abs error."""
    kind = np.complex128 if np.iscomplexobj(actual) or np.iscomplexobj(expected) else np.float64
    actual = np.asarray(actual, kind)
    expected = np.asarray(expected, kind)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    abs_err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return abs_err, abs_err / scale if scale > 0 else abs_err


def assert_close(actual, expected, rel: float, what: str = "") -> tuple[float, float]:
    """Fails unless `errors(actual, expected)[1] <= rel`; prints both errors (pytest -s)."""
    abs_err, rel_err = errors(actual, expected)
    print(f"{what}: max abs {abs_err:.2e}, rel {rel_err:.2e} (tol {rel:.0e})")
    assert np.all(np.isfinite(np.asarray(actual))), f"{what}: non-finite values"
    assert rel_err <= rel, f"{what}: max abs error {abs_err:.3e}, relative {rel_err:.3e} > {rel}"
    return abs_err, rel_err


def make_reference_discriminator(seed: int = 0, **kwargs):
    """audiocraft's `MultiScaleSTFTDiscriminator(**kwargs)` (weight norm through
    `torch.nn.utils.weight_norm`, as audiocraft builds it) with every tensor moved away from its
    initialisation: biases and directions get noise, magnitudes are rescaled, so `weight_g` is no
    longer `||weight_v||` and a loader that ignored either would be caught."""
    import warnings

    import torch

    from .audiocraft_reference import audiocraft

    msstftd = audiocraft("adversarial.discriminators.msstftd")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        model = msstftd.MultiScaleSTFTDiscriminator(**kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model.eval()
