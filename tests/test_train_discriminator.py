"""encodec_jax.train.discriminator against audiocraft 1.3.0's MultiScaleSTFTDiscriminator.

Reference weights are random and moved away from their initialisation (`weight_g` no longer
`||weight_v||`), saved as audiocraft's state dict and loaded through the package's one loader,
`module_from_state_dict`, under both weight-norm spellings; the export goes back into torch with
`load_state_dict(strict=True)`. Our feature maps are channels-last and are transposed to
audiocraft's `[B, C, frames, freq]` to compare. Errors: max |a - b| / max |b| per array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encodec_jax.checkpoint import (
    module_from_state_dict,
    state_dict_from_module,
    to_parametrization_key,
)
from encodec_jax.modules import Buffer
from encodec_jax.train.discriminator import MultiScaleSTFTDiscriminator, rename_discriminator_key

from .audiocraft_reference import audiocraft
from .train_helpers import assert_close, make_reference_discriminator, signal_pairs

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Stereo, two logit channels, two scales (one window shorter than its FFT), fewer filters and
# layers than default: every constructor setting that changes shapes or channel order.
TINY = dict(
    filters=6,
    in_channels=2,
    out_channels=2,
    n_ffts=[128, 64],
    hop_lengths=[32, 16],
    win_lengths=[96, 64],
    dilations=[1, 2],
    activation_params={"negative_slope": 0.2},  # not our default (0.3): the setting is used
)
# Float32 tolerance on logits and feature maps: float32 convolutions in two libraries.
REL = 1e-5


def _ours(seed=0, **kwargs):
    """A builder of our module for audiocraft's constructor arguments `kwargs`."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    # audiocraft's DiscriminatorSTFT default slope is 0.2 (default.yaml's, and ours, 0.3)
    kwargs["negative_slope"] = kwargs.pop("activation_params", {"negative_slope": 0.2})[
        "negative_slope"
    ]
    return lambda: MultiScaleSTFTDiscriminator(**kwargs, rngs=nnx.Rngs(seed))


def _audio(channels: int, length: int = 1500) -> np.ndarray:
    pred, target = signal_pairs()["random"]
    return np.concatenate([pred, target], axis=1)[:, :channels, :length].astype(np.float32)


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


_FORWARD = jax.jit(lambda model, x: model(x))


def _compare(ref, ours, x, rel=REL, what=""):
    """Logits and every feature map of both models on `x`; returns the worst relative error."""
    with torch.no_grad():
        ref_logits, ref_fmaps = ref(torch.from_numpy(x))
    logits, fmaps = _FORWARD(ours, jnp.asarray(x))
    assert len(logits) == len(ref_logits) and len(fmaps) == len(ref_fmaps)
    worst = 0.0
    for k, (logit, ref_logit) in enumerate(zip(logits, ref_logits, strict=True)):
        nchw = np.transpose(np.asarray(logit), (0, 3, 1, 2))
        worst = max(worst, assert_close(nchw, ref_logit.numpy(), rel, f"{what} logits {k}")[1])
        assert len(fmaps[k]) == len(ref_fmaps[k])
        for j, (fmap, ref_fmap) in enumerate(zip(fmaps[k], ref_fmaps[k], strict=True)):
            nchw = np.transpose(np.asarray(fmap), (0, 3, 1, 2))
            worst = max(worst, assert_close(nchw, ref_fmap.numpy(), rel, f"{what} fmap {k}.{j}")[1])
    return worst


@pytest.fixture(scope="module")
def tiny():
    ref = make_reference_discriminator(seed=0, **TINY)
    return ref, module_from_state_dict(_ours(**TINY), _state_dict(ref))


def test_reference_state_dict_is_what_we_expect(tiny):
    """The layout the module mirrors: the first conv plain, the others weight-normed, the window
    a buffer; the perturbation really made weight_g differ from ||weight_v||."""
    ref, _ = tiny
    keys = set(_state_dict(ref))
    assert "discriminators.0.spec_transform.window" in keys
    assert "discriminators.0.convs.0.conv.weight" in keys
    assert "discriminators.0.convs.0.conv.weight_g" not in keys
    assert "discriminators.1.conv_post.conv.weight_g" in keys
    assert "discriminators.1.convs.3.conv.weight_v" in keys  # 2 dilations -> convs 0..3
    g = ref.discriminators[0].convs[1].conv.weight_g.detach().numpy().ravel()
    v = ref.discriminators[0].convs[1].conv.weight_v.detach().numpy()
    assert np.abs(g - np.sqrt((v**2).sum(axis=(1, 2, 3)))).max() > 1e-2


def test_tiny_discriminator_matches_audiocraft(tiny):
    ref, ours = tiny
    _compare(ref, ours, _audio(2), what="tiny")


def test_silence_and_clipping(tiny):
    ref, ours = tiny
    _compare(ref, ours, np.zeros((2, 2, 1500), np.float32), what="silence")
    _compare(ref, ours, np.sign(_audio(2)), what="clipping")


def test_state_dict_round_trip(tiny):
    """Export -> audiocraft's module with load_state_dict(strict=True): every tensor back as it
    was, the same outputs."""
    ref, ours = tiny
    exported = state_dict_from_module(ours)
    original = _state_dict(ref)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    fresh = make_reference_discriminator(seed=123, **TINY)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    x = torch.from_numpy(_audio(2))
    with torch.no_grad():
        for a, b in zip(fresh(x)[0], ref(x)[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def parametrized():
    """audiocraft's module built with torch's current weight norm (parametrizations), whose
    state dict spells it `parametrizations.weight.original0/1`."""
    conv = audiocraft("modules.conv")
    ref = make_reference_discriminator(seed=0, **TINY)
    legacy = _state_dict(ref)
    saved = conv.weight_norm
    conv.weight_norm = torch.nn.utils.parametrizations.weight_norm
    try:
        model = audiocraft("adversarial.discriminators.msstftd").MultiScaleSTFTDiscriminator(**TINY)
    finally:
        conv.weight_norm = saved
    model.load_state_dict(
        {to_parametrization_key(k): torch.from_numpy(v) for k, v in legacy.items()}, strict=True
    )
    return model.eval(), ref


def test_parametrization_spelling_loads_and_exports(parametrized, tiny):
    model, ref = parametrized
    state = _state_dict(model)
    assert "discriminators.0.convs.1.conv.parametrizations.weight.original0" in state
    assert not any(k.endswith("weight_g") for k in state)
    ours = module_from_state_dict(_ours(**TINY), state, rename_discriminator_key)
    _compare(model, ours, _audio(2), what="parametrizations")
    # the same module as the legacy spelling gives
    legacy = state_dict_from_module(tiny[1])
    for key, value in state_dict_from_module(ours).items():
        np.testing.assert_array_equal(value, legacy[key], err_msg=key)
    # export in the current spelling, back into the parametrized module
    exported = {to_parametrization_key(k): v for k, v in state_dict_from_module(ours).items()}
    assert set(exported) == set(state)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_loader_names_problems(tiny):
    ref, _ = tiny
    state = _state_dict(ref)
    del state["discriminators.1.spec_transform.window"]
    state["discriminators.0.convs.9.conv.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"spec_transform\.window.*convs\.9"):
        module_from_state_dict(_ours(**TINY), state)
    # the same keys spelled twice
    state = _state_dict(ref)
    state["discriminators.0.convs.1.conv.parametrizations.weight.original0"] = state[
        "discriminators.0.convs.1.conv.weight_g"
    ]
    with pytest.raises(ValueError, match="twice"):
        module_from_state_dict(_ours(**TINY), state)


def test_adversarial_loss_state_dict_prefix(tiny):
    """An AdversarialLoss (or a solver's adv_losses entry) nests the weights under `adversary.`;
    its optimizer entry is not weights and is left to the caller."""
    ref, ours = tiny
    nested = {"adversary." + k: v for k, v in _state_dict(ref).items()}
    loaded = module_from_state_dict(_ours(**TINY), nested, rename_discriminator_key)
    for key, value in state_dict_from_module(loaded).items():
        np.testing.assert_array_equal(value, state_dict_from_module(ours)[key], err_msg=key)


def test_window_buffer_is_carried_not_trained(tiny):
    """The window comes from the checkpoint (a changed one changes the output, as in torch),
    and is a Buffer, not a Param: gradients and optimizers leave it alone."""
    ref, ours = tiny
    window = ours.discriminators[0].spec_transform.window
    assert isinstance(window, Buffer) and not isinstance(window, nnx.Param)
    np.testing.assert_array_equal(window[...], torch.hann_window(96).numpy())
    params = nnx.state(ours, nnx.Param)
    assert not any("window" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(params))
    state = _state_dict(ref)
    state["discriminators.0.spec_transform.window"] = np.ones(96, np.float32)
    with torch.no_grad():
        ref.discriminators[0].spec_transform.window.fill_(1.0)
    try:
        _compare(ref, module_from_state_dict(_ours(**TINY), state), _audio(2), what="box")
    finally:
        with torch.no_grad():
            ref.discriminators[0].spec_transform.window.copy_(torch.hann_window(96))


def test_random_init_follows_torch():
    """Kaiming-uniform bounds 1/sqrt(fan_in) for weights and biases, as torch's Conv2d; weight
    norm starts at weight_g = ||weight_v||; the same keys and shapes as audiocraft's module;
    forward runs and gives finite logits."""
    ours = _ours(**TINY)()
    ref = make_reference_discriminator(seed=0, **TINY)
    exported = state_dict_from_module(ours)
    assert {k: v.shape for k, v in exported.items()} == {
        k: v.shape for k, v in _state_dict(ref).items()
    }
    for key, value in exported.items():
        if key.endswith("window"):
            continue
        prefix = key.rsplit(".", 1)[0]
        weight = exported.get(prefix + ".weight", exported.get(prefix + ".weight_v"))
        bound = 1 / math.sqrt(np.prod(weight.shape[1:]))
        if key.endswith("weight_g"):
            norms = np.sqrt((weight**2).sum(axis=(1, 2, 3), keepdims=True))
            np.testing.assert_allclose(value, norms, rtol=1e-6)
        else:
            assert np.abs(value).max() <= bound, key
            if value.size >= 50:  # uniform over the whole range, not a narrower one
                assert np.abs(value).max() > 0.8 * bound and abs(value.mean()) < 0.2 * bound
    logits, _ = _FORWARD(ours, jnp.asarray(_audio(2)))
    assert all(np.isfinite(np.asarray(x)).all() for x in logits)
    other = _ours(seed=1, **TINY)()
    assert not np.array_equal(
        state_dict_from_module(other)["discriminators.0.convs.0.conv.weight"],
        exported["discriminators.0.convs.0.conv.weight"],
    )


def test_no_weight_norm_option():
    kwargs = {**TINY, "norm": "none"}
    ref = make_reference_discriminator(seed=2, **kwargs)
    state = _state_dict(ref)
    assert not any(k.endswith("weight_g") for k in state)
    _compare(ref, module_from_state_dict(_ours(**kwargs), state), _audio(2), what="norm none")
    with pytest.raises(ValueError, match="norm"):
        MultiScaleSTFTDiscriminator(norm="spectral_norm", rngs=nnx.Rngs(0))


def test_default_discriminator_matches_audiocraft():
    """default.yaml's msstftd (filters 32, five scales, LeakyReLU 0.3, mono) on 2 x 1 x 4096
    samples (two frames of the largest FFT)."""
    config = dict(
        filters=32,
        n_ffts=[1024, 2048, 512, 256, 128],
        hop_lengths=[256, 512, 128, 64, 32],
        win_lengths=[1024, 2048, 512, 256, 128],
        activation_params={"negative_slope": 0.3},
    )
    ref = make_reference_discriminator(seed=3, **config)
    ours = module_from_state_dict(
        lambda: MultiScaleSTFTDiscriminator(rngs=nnx.Rngs(0)), _state_dict(ref)
    )
    _compare(ref, ours, _audio(1, 4096), what="default")
