"""The weight EMA (`encodec_jax.train.ema`) against audiocraft 1.3.0's `ModuleDictEMA`.

A tiny torch module (a linear layer and a batch norm, whose `num_batches_tracked` is an integer
buffer the reference skips) gets new random weights each step, the same on both sides; after
each `step()` the averages are compared. float32; tolerance next to the check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encodec_jax.train import ema

from .audiocraft_reference import audiocraft

torch = pytest.importorskip("torch")

STEPS = 6
# The reference's count and weight are Python doubles, ours float32: measured up to 1.6e-7 of
# each tensor's peak (a few float32 roundings).
RTOL = 1e-6

update = jax.jit(ema.ema_update, static_argnames=("decay", "unbias"))


def tensors(module) -> dict[str, np.ndarray]:
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name: value.detach().numpy().copy() for name, value in named}


@pytest.mark.parametrize("decay,unbias", [(0.99, True), (0.9, False), (0.999, True)])
def test_matches_module_dict_ema(torch_single_thread, decay, unbias):
    reference = audiocraft("optim.ema")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    averager = reference.ModuleDictEMA(torch.nn.ModuleDict({"m": module}), decay, unbias)
    state = ema.ema_init(tensors(module))
    rng = np.random.default_rng(0)
    worst = 0.0
    for step in range(STEPS):
        with torch.no_grad():
            for value in module.state_dict().values():
                if value.is_floating_point():
                    value.copy_(torch.from_numpy(rng.standard_normal(value.shape) * (step + 1)))
                else:
                    value.add_(1)  # num_batches_tracked: an integer the reference skips
        averager.step()
        state = update(state, tensors(module), decay=decay, unbias=unbias)
        live = tensors(module)
        want = averager.state["m"]
        assert set(want) == {k for k, v in live.items() if np.issubdtype(v.dtype, np.floating)}
        for name, value in state.params.items():
            value = np.asarray(value)
            if name not in want:
                # not averaged: the live integer value, as swapping in the reference's EMA
                # weights leaves it
                assert name == "1.num_batches_tracked"
                np.testing.assert_array_equal(value, live[name])
                assert np.issubdtype(value.dtype, np.integer)
                continue
            ref = want[name].numpy()
            err = np.max(np.abs(value - ref))
            worst = max(worst, err / np.max(np.abs(ref)))
            assert err <= RTOL * np.max(np.abs(ref)), (step, name, err)
        np.testing.assert_allclose(float(state.count), averager.count, rtol=1e-6)
    print(f"decay {decay} unbias {unbias}: max error {worst:.2e} of the peak")


def test_first_unbiased_step_copies_the_weights():
    params = {"w": jnp.arange(3.0), "step": jnp.array(4, jnp.int32)}
    state = ema.ema_init(jax.tree.map(jnp.zeros_like, params))
    state = update(state, params, decay=0.99, unbias=True)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(3.0))
    assert int(state.params["step"]) == 4
    biased = update(ema.ema_init(jax.tree.map(jnp.zeros_like, params)), params, unbias=False)
    np.testing.assert_allclose(np.asarray(biased.params["w"]), 0.01 * np.arange(3.0), rtol=1e-6)


def test_nnx_state_round_trip():
    """The average of a model's `nnx.state` (parameters and codebook buffers) is an
    `nnx.State` that `nnx.update` puts back into a model, as validation and export need."""
    from flax import nnx

    from encodec_jax import EncodecConfig
    from encodec_jax.modules import EncodecResidualVectorQuantizer

    config = EncodecConfig(codebook_size=16, hidden_size=8, num_filters=4, target_bandwidths=(0.6,))
    model = EncodecResidualVectorQuantizer(config, rngs=nnx.Rngs(0))
    state = ema.ema_init(nnx.state(model))
    shifted = jax.tree.map(lambda a: a + 1.0, nnx.state(model))
    state = update(state, shifted, decay=0.99, unbias=False)
    nnx.update(model, state.params)
    # 0.99 * e + 0.01 * (e + 1) = e + 0.01, up to float32 rounding
    embed = np.asarray(model.layers[0].codebook.embed[...])
    original = np.asarray(shifted["layers"][0]["codebook"]["embed"]) - 1.0
    np.testing.assert_allclose(embed, original + 0.01, rtol=0, atol=1e-6)
    assert isinstance(state.params, nnx.State)
