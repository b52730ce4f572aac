"""encodec_jax.train.losses against audiocraft 1.3.0's loss classes and adversarial code.

Each reconstruction loss is built as audiocraft's solver builds it from
`config/solver/compression/default.yaml` (settings copied below) and compared in value and in
gradient with respect to the prediction, on six signal pairs (`train_helpers.signal_pairs`:
a reconstruction, unrelated noise, silence on both sides and on either side, clipping). float64
(`jax.enable_x64`, the reference built and run with torch's default dtype float64) checks the
formula; float32 checks what training computes. Errors: max |a - b| / max |b| over the array.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import enable_x64

from encodec_jax.checkpoint import module_from_state_dict
from encodec_jax.train import losses
from encodec_jax.train.discriminator import MultiScaleSTFTDiscriminator

from .audiocraft_reference import audiocraft
from .train_helpers import (
    SAMPLE_RATE,
    assert_close,
    errors,
    make_reference_discriminator,
    signal_pairs,
    torch_default_dtype,
)

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    # torchaudio warns about msspec's empty mel bands (64 bands over 33 bins at n_fft 64).
    pytest.mark.filterwarnings("ignore:At least one mel filterbank"),
]

# default.yaml's settings, as `builders.get_loss(name, cfg)` passes them.
DEFAULT_YAML = {
    "msspec": dict(
        sample_rate=SAMPLE_RATE,
        range_start=6,
        range_end=11,
        n_mels=64,
        f_min=64,
        f_max=None,
        normalized=True,
        alphas=False,
        floor_level=1e-5,
    ),
    "mel": dict(
        sample_rate=SAMPLE_RATE,
        n_fft=1024,
        hop_length=256,
        win_length=1024,
        n_mels=64,
        f_min=64,
        f_max=None,
        normalized=False,
        floor_level=1e-5,
    ),
    "sisnr": dict(sample_rate=SAMPLE_RATE, segment=5.0),
    "mrstft": dict(factor_sc=0.5, factor_mag=0.5, normalized=False),
}


def _reference(name):
    specloss = audiocraft("losses.specloss")
    return {
        "l1": lambda: torch.nn.L1Loss(),
        "msspec": lambda: specloss.MultiScaleMelSpectrogramLoss(**DEFAULT_YAML["msspec"]),
        "mel": lambda: specloss.MelSpectrogramL1Loss(**DEFAULT_YAML["mel"]),
        "sisnr": lambda: audiocraft("losses.sisnr").SISNR(**DEFAULT_YAML["sisnr"]),
        "mrstft": lambda: audiocraft("losses.stftloss").MRSTFTLoss(**DEFAULT_YAML["mrstft"]),
    }[name]()


# Ours with their defaults only: the defaults must be default.yaml's.
OURS = {
    "l1": losses.l1_loss,
    "msspec": lambda p, t: losses.msspec_loss(p, t, SAMPLE_RATE),
    "mel": lambda p, t: losses.mel_loss(p, t, SAMPLE_RATE),
    "sisnr": lambda p, t: losses.sisnr_loss(p, t, SAMPLE_RATE),
    "mrstft": losses.mrstft_loss,
}
_VALUE_AND_GRAD = {name: jax.jit(jax.value_and_grad(fn)) for name, fn in OURS.items()}

# float64: the formula, both sides in float64 (value, gradient).
FLOAT64_TOL = (1e-10, 1e-9)
# float32, ours against audiocraft's float32 (value, gradient). These are audiocraft's own float32
# errors: measured against the float64 result, torch's float32 gradients are off by up to 1e-3
# (msspec on unrelated noise: the log of near-empty mel bands, where torchaudio's float32
# filterbank is off), 8e-3 (SI-SNR at clipping: float32 sums over a 5 s segment) and 1e-3
# (MRSTFT: the log of magnitudes near the 1e-7 floor); ours are closer to float64 in every case
# (checked below), and the values agree to 3e-4 or better.
FLOAT32_TOL = {
    "l1": (1e-6, 1e-6),
    "msspec": (1e-6, 3e-3),
    "mel": (3e-6, 1e-5),
    "sisnr": (1e-3, 2e-2),
    "mrstft": (1e-5, 3e-3),
}
# Ours in float32 against the float64 result: no worse than 1.5 x audiocraft's float32 error,
# or than these floors (value, gradient), a few float32 roundings of a mean. SI-SNR's value is
# 10 log10 of a ratio of sums over 240,000 samples: a relative rounding d of a sum is 4.3 d dB,
# and XLA's reduction order depends on the CPU's vector width, so its floor is 5e-5 dB
# (measured on unrelated noise: 3.9e-5 on an AVX2 CPU, audiocraft 1.8e-5).
FLOAT32_FLOOR = (2e-6, 1e-5)
FLOAT32_FLOOR_FOR = {"sisnr": (5e-5, 1e-5)}
CASES = list(signal_pairs())


@pytest.fixture(scope="module")
def references():
    refs = {}
    for name in OURS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            refs[name, "float32"] = _reference(name)
            with torch_default_dtype(torch.float64):
                refs[name, "float64"] = _reference(name)
    return refs


def _torch_value_and_grad(module, pred, target):
    dtype = torch.float64 if pred.dtype == np.float64 else torch.float32
    with torch_default_dtype(dtype):  # audiocraft's MRSTFT accumulates in torch.Tensor([0.0])
        p = torch.tensor(pred, requires_grad=True)
        value = module(p, torch.tensor(target)).sum()  # MRSTFT returns shape [1]
        value.backward()
    return value.detach().numpy(), p.grad.numpy()


def _ours_value_and_grad(name, pred, target):
    with enable_x64(pred.dtype == np.float64):
        value, grad = _VALUE_AND_GRAD[name](jnp.asarray(pred), jnp.asarray(target))
        value, grad = np.asarray(value), np.asarray(grad)
    assert value.dtype == pred.dtype and grad.dtype == pred.dtype
    return value, grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(OURS))
def test_loss_matches_audiocraft(references, name, case):
    """Value and gradient w.r.t. the prediction: float64 to 1e-10/1e-9, float32 within
    audiocraft's own float32 error (see FLOAT32_TOL), and at least as close to float64."""
    pred, target = signal_pairs()[case]
    exact_value, exact_grad = _torch_value_and_grad(references[name, "float64"], pred, target)
    value, grad = _ours_value_and_grad(name, pred, target)
    assert_close(value, exact_value, FLOAT64_TOL[0], f"{name} {case} float64 value")
    assert_close(grad, exact_grad, FLOAT64_TOL[1], f"{name} {case} float64 grad")

    pred, target = pred.astype(np.float32), target.astype(np.float32)
    ref_value, ref_grad = _torch_value_and_grad(references[name, "float32"], pred, target)
    value, grad = _ours_value_and_grad(name, pred, target)
    value_tol, grad_tol = FLOAT32_TOL[name]
    assert_close(value, ref_value, value_tol, f"{name} {case} float32 value")
    assert_close(grad, ref_grad, grad_tol, f"{name} {case} float32 grad")
    value_floor, grad_floor = FLOAT32_FLOOR_FOR.get(name, FLOAT32_FLOOR)
    for ours, ref, exact, floor, what in [
        (value, ref_value, exact_value, value_floor, "value"),
        (grad, ref_grad, exact_grad, grad_floor, "grad"),
    ]:
        ours_err, ref_err = errors(ours, exact)[1], errors(ref, exact)[1]
        print(f"  float32 {what} vs float64: ours {ours_err:.1e}, audiocraft {ref_err:.1e}")
        assert ours_err <= max(1.5 * ref_err, floor), (what, ours_err, ref_err)
    if case == "silence_both":  # identical inputs: a minimum, gradient exactly 0 (not NaN)
        assert np.all(grad == 0) and np.all(ref_grad == 0)


def test_msspec_sums_scales_as_configured():
    """alphas=True and normalized=False (audiocraft's class defaults): the other branches."""
    pred, target = (a.astype(np.float64) for a in signal_pairs()["random"])
    kwargs = dict(sample_rate=SAMPLE_RATE, range_start=7, range_end=9, n_mels=32, f_min=0.0)
    with torch_default_dtype(torch.float64):
        ref = audiocraft("losses.specloss").MultiScaleMelSpectrogramLoss(
            **kwargs, normalized=False, alphas=True
        )
        expected = ref(torch.tensor(pred), torch.tensor(target)).numpy()
    with enable_x64(True):
        ours = losses.msspec_loss(
            jnp.asarray(pred), jnp.asarray(target), **kwargs, normalized=False, alphas=True
        )
    assert_close(ours, expected, 1e-10, "msspec alphas, unnormalised")


def test_sisnr_segments():
    """Segments shorter than the signal (0.1 s: 5 overlapping segments, the last half padding):
    the mean over all of them, as audiocraft computes it, and as audiocraft gives it for each
    segment on its own (an independent check of the segmenting)."""
    sisnr = audiocraft("losses.sisnr")
    pred, target = (a.astype(np.float64) for a in signal_pairs()["random"])
    ref = sisnr.SISNR(SAMPLE_RATE, segment=0.1)
    frame, stride = 1600, 800
    with enable_x64(True):
        ours = losses.sisnr_loss(jnp.asarray(pred), jnp.asarray(target), SAMPLE_RATE, 0.1)
    assert_close(ours, ref(torch.tensor(pred), torch.tensor(target)).numpy(), 1e-12, "segments")
    padded = [np.pad(a, [(0, 0), (0, 0), (0, 4800 - 4000)]) for a in (pred, target)]
    one = sisnr.SISNR(SAMPLE_RATE, segment=0.1, overlap=0.0)  # one segment per chunk
    per_segment = [
        one(*(torch.tensor(a[..., k * stride : k * stride + frame]) for a in padded)).item()
        for k in range(5)
    ]
    assert_close(ours, np.mean(per_segment), 1e-12, "mean of segments")
    assert abs(float(ours) - per_segment[0]) > 0.05  # all segments count, not the first only


def test_sisnr_whole_signal():
    """`segment=None` (the whole signal as one segment): audiocraft's own segment=None fails its
    assertion, so it is compared with a segment as long as the signal."""
    sisnr = audiocraft("losses.sisnr")
    pred, target = (torch.tensor(a) for a in signal_pairs()["random"])
    with pytest.raises(AssertionError):
        sisnr.SISNR(SAMPLE_RATE, segment=None)(pred, target)
    expected = sisnr.SISNR(SAMPLE_RATE, segment=4000 / SAMPLE_RATE, overlap=0.0)(pred, target)
    with enable_x64(True):
        ours = losses.sisnr_loss(jnp.asarray(pred.numpy()), jnp.asarray(target.numpy()), 1, None)
    assert_close(ours, expected.numpy(), 1e-12, "whole signal")


# ---- adversarial ----
def _logits(seed, dtype):
    """Random logits with exact hits of the hinges' corners (-1, 0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.5, size=(2, 1, 7, 9))
    x.flat[:6] = [-1.0, 1.0, 0.0, -1.0, 1.0, 0.0]
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("which", ["real", "fake", "generator"])
def test_hinge_losses(which, dtype):
    adversarial = audiocraft("adversarial.losses")
    ref_fn = {
        "real": adversarial.hinge_real_loss,
        "fake": adversarial.hinge_fake_loss,
        "generator": adversarial.hinge_loss,
    }[which]
    ours = {
        "real": losses.hinge_real_loss,
        "fake": losses.hinge_fake_loss,
        "generator": losses.hinge_generator_loss,
    }[which]
    x = _logits(0, dtype)
    t = torch.tensor(x, requires_grad=True)
    ref = ref_fn(t)
    ref.backward()
    with enable_x64(dtype == np.float64):
        value, grad = jax.value_and_grad(ours)(jnp.asarray(x))
    tol = 1e-15 if dtype == np.float64 else 1e-6
    assert_close(value, ref.detach().numpy(), tol, f"hinge {which} value")
    # the corners: torch splits min()'s gradient at a tie, so do we
    assert_close(grad, t.grad.numpy(), tol, f"hinge {which} grad")


def test_hinge_generator_loss_of_nothing_is_zero():
    """audiocraft's generator hinge returns 0 for an empty logit map (its discriminator hinges
    take the mean of nothing, NaN, in both)."""
    assert float(losses.hinge_generator_loss(jnp.zeros((0, 3)))) == 0.0


def test_hinge_formulas():
    """The forms audiocraft uses are relu(1 -+ D) for the discriminator and -D for the
    generator (not relu(1 - D) as the paper writes)."""
    x = jnp.asarray(_logits(1, np.float32))
    assert np.allclose(losses.hinge_real_loss(x), jnp.mean(jax.nn.relu(1 - x)))
    assert np.allclose(losses.hinge_fake_loss(x), jnp.mean(jax.nn.relu(1 + x)))
    assert np.allclose(losses.hinge_generator_loss(x), -jnp.mean(x))


@pytest.mark.parametrize("normalize", [True, False])
def test_feature_matching_loss(normalize):
    adversarial = audiocraft("adversarial.losses")
    rng = np.random.default_rng(3)
    shapes = [(2, 4, 5, 6), (2, 4, 5, 3), (2, 1, 5, 3)]
    fake = [rng.normal(size=s) for s in shapes]
    real = [rng.normal(size=s) for s in shapes]
    real[1] = fake[1].copy()  # one identical map: |0| has gradient 0 in both
    fake_t = [torch.tensor(f, requires_grad=True) for f in fake]
    with torch_default_dtype(torch.float64):  # it accumulates in a torch.tensor(0.0)
        ref = adversarial.FeatureMatchingLoss(torch.nn.L1Loss(), normalize)(
            fake_t, [torch.tensor(r) for r in real]
        )
    ref.backward()
    with enable_x64(True):
        value, grads = jax.value_and_grad(
            lambda f: losses.feature_matching_loss(f, [jnp.asarray(r) for r in real], normalize)
        )([jnp.asarray(f) for f in fake])
    assert_close(value, ref.detach().numpy(), 1e-15, "feature matching value")
    for g, t in zip(grads, fake_t, strict=True):
        assert_close(g, t.grad.numpy(), 1e-15, "feature matching grad")
    with pytest.raises(ValueError):
        losses.feature_matching_loss([jnp.zeros(3)], [jnp.zeros(4)])


# A tiny MS-STFT discriminator with three scales (one window shorter than its FFT).
TINY_DISC = dict(
    filters=4,
    n_ffts=[256, 128, 64],
    hop_lengths=[64, 32, 16],
    win_lengths=[256, 96, 64],
    activation_params={"negative_slope": 0.3},
)
# Ours in float32 against float64: no worse than 1.5 x audiocraft's float32 error, or than this
# (the relative float32 error of a gradient summed over a few thousand conv outputs).
DISC_FLOAT32_FLOOR = 1e-4


def _jax_tiny_disc():
    return MultiScaleSTFTDiscriminator(
        filters=4,
        n_ffts=(256, 128, 64),
        hop_lengths=(64, 32, 16),
        win_lengths=(256, 96, 64),
        rngs=nnx.Rngs(0),
    )


def _as_float64(model):
    """A float64 copy of an NNX module (call inside `enable_x64(True)`)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))


@pytest.fixture(scope="module")
def adversarial_pair():
    """audiocraft's AdversarialLoss around a perturbed tiny discriminator, in float32 and in
    float64 (the same weights; the optimizer has lr 0, so train_adv leaves the weights, and
    their gradients to read), and ours loaded from the float32 state dict."""
    adversarial = audiocraft("adversarial.losses")
    refs = {}
    for dtype in (torch.float32, torch.float64):
        disc = make_reference_discriminator(seed=5, **TINY_DISC).to(dtype)
        refs[dtype] = adversarial.AdversarialLoss(
            disc,
            torch.optim.SGD(disc.parameters(), lr=0.0),
            loss=adversarial.get_adv_criterion("hinge"),
            loss_real=adversarial.get_real_criterion("hinge"),
            loss_fake=adversarial.get_fake_criterion("hinge"),
            loss_feat=adversarial.FeatureMatchingLoss(torch.nn.L1Loss(), True),
            normalize=True,
        )
    state = {k: v.numpy() for k, v in refs[torch.float32].adversary.state_dict().items()}
    return refs, module_from_state_dict(_jax_tiny_disc, state)


def _d_loss(model, fake, real):
    logits_fake, _ = model(fake)
    logits_real, _ = model(real)
    return losses.discriminator_loss(logits_fake, logits_real)


_D_VALUE_AND_GRAD = nnx.jit(nnx.value_and_grad(_d_loss))


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("case", ["random", "silence_target", "clipping"])
def test_discriminator_loss_through_discriminator(adversarial_pair, case):
    """`AdversarialLoss.train_adv`'s loss and the gradient of every discriminator parameter:
    float64 to 1e-10; float32 to audiocraft's float32 error (up to 3e-3 relative on the last
    layers' weights, against float64), ours at least as close to float64."""
    refs, ours = adversarial_pair
    results = {}
    for dtype in (torch.float64, torch.float32):
        fake, real = (torch.tensor(a).to(dtype) for a in signal_pairs()[case])
        with torch_default_dtype(dtype):  # train_adv accumulates in a torch.tensor(0.0)
            value = refs[dtype].train_adv(fake, real).item()
        grads = {n: p.grad.numpy().copy() for n, p in refs[dtype].adversary.named_parameters()}
        with enable_x64(dtype == torch.float64):
            model = _as_float64(ours) if dtype == torch.float64 else ours
            ours_value, ours_grads = _D_VALUE_AND_GRAD(model, *map(jnp.asarray, (fake, real)))
            ours_value, ours_grads = float(ours_value), _flat(ours_grads)
        # trainable: every parameter, and not the STFT window
        assert set(ours_grads) == set(grads)
        results[dtype] = (value, grads, ours_value, ours_grads)
    exact, exact_grads, value, grads = results[torch.float64]
    assert_close(value, exact, 1e-12, f"d_loss {case} float64")
    for name in exact_grads:
        assert_close(grads[name], exact_grads[name], 1e-10, f"{name} float64")
    ref32, ref32_grads, value, grads = results[torch.float32]
    assert_close(value, ref32, 1e-6, f"d_loss {case} float32")
    for name in exact_grads:
        assert_close(grads[name], ref32_grads[name], 5e-3, f"{name} float32")
        ours_err = errors(grads[name], exact_grads[name])[1]
        ref_err = errors(ref32_grads[name], exact_grads[name])[1]
        assert ours_err <= max(1.5 * ref_err, DISC_FLOAT32_FLOOR), (name, ours_err, ref_err)


@jax.jit
def _generator_losses(model, fake, real):
    """(adv, feat) through the discriminator and their gradients w.r.t. `fake`."""

    def both(x):
        logits_fake, fmaps_fake = model(x)
        _, fmaps_real = model(real)
        return losses.generator_adversarial_losses(logits_fake, fmaps_fake, fmaps_real)

    (adv, feat), vjp = jax.vjp(both, fake)
    (adv_grad,) = vjp((jnp.ones_like(adv), jnp.zeros_like(feat)))
    (feat_grad,) = vjp((jnp.zeros_like(adv), jnp.ones_like(feat)))
    return adv, feat, adv_grad, feat_grad


@pytest.mark.parametrize("case", ["random", "silence_pred", "clipping"])
def test_generator_losses_through_discriminator(adversarial_pair, case):
    """`AdversarialLoss.forward`'s (adv, feat), and their gradients w.r.t. the generated audio
    (the discriminator read-only): float64 to 1e-10, float32 within audiocraft's own float32
    error, ours at least as close to float64."""
    refs, ours = adversarial_pair
    results = {}
    for dtype in (torch.float64, torch.float32):
        fake, real = (torch.tensor(a).to(dtype) for a in signal_pairs()[case])
        fake.requires_grad_(True)
        with torch_default_dtype(dtype):  # forward accumulates in torch.tensor(0.0)s
            adv, feat = refs[dtype](fake, real)
        adv_grad = torch.autograd.grad(adv, fake, retain_graph=True)[0].numpy()
        feat_grad = torch.autograd.grad(feat, fake)[0].numpy()
        with enable_x64(dtype == torch.float64):
            model = _as_float64(ours) if dtype == torch.float64 else ours
            out = _generator_losses(model, jnp.asarray(fake.detach()), jnp.asarray(real))
        results[dtype] = (adv.item(), feat.item(), adv_grad, feat_grad), tuple(map(np.asarray, out))
    names = ("adv", "feat", "adv grad", "feat grad")
    for (exact, ours64), (ref32, ours32), name in zip(
        zip(*results[torch.float64], strict=True),
        zip(*results[torch.float32], strict=True),
        names,
        strict=True,
    ):
        assert_close(ours64, exact, 1e-10, f"{name} {case} float64")
        assert_close(ours32, ref32, 1e-3 if "grad" in name else 1e-5, f"{name} {case} float32")
        ours_err, ref_err = errors(ours32, exact)[1], errors(ref32, exact)[1]
        assert ours_err <= max(1.5 * ref_err, DISC_FLOAT32_FLOOR), (name, ours_err, ref_err)


def test_adversarial_sums_and_means():
    """`normalize` divides by the number of sub-discriminators (and feature maps); without it
    everything is summed."""
    k = [jnp.full((1, 2), float(i)) for i in range(3)]
    fm = [[jnp.ones((2,)) * i, jnp.zeros((3,))] for i in range(3)]
    zeros = [[jnp.zeros((2,)), jnp.zeros((3,))] for _ in range(3)]
    adv, feat = losses.generator_adversarial_losses(k, fm, zeros, normalize=True)
    assert np.isclose(adv, -(0 + 1 + 2) / 3) and np.isclose(feat, (0 + 0.5 + 1) / 3)
    adv, feat = losses.generator_adversarial_losses(k, fm, zeros, normalize=False)
    assert np.isclose(adv, -3.0) and np.isclose(feat, 3.0)
    d = losses.discriminator_loss(k, [-x for x in k], normalize=False)
    assert np.isclose(d, 2 * (1 + 2 + 3))
