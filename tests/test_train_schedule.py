"""The trainer's optimizer against torch's Adam, and the host-side schedule of discriminator
updates (`adversarial.every`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from encodec_jax.train import step as step_module
from encodec_jax.train.config import PRESETS, AdversarialConfig

from .requires import needs_torch

TINY = PRESETS["tiny"]


def with_optim(**changes):
    return TINY.replace(optim=dataclasses.replace(TINY.optim, **changes))


@needs_torch
@pytest.mark.parametrize(
    "changes",
    [{}, {"weight_decay": 0.01}, {"max_norm": 0.5}, {"weight_decay": 0.1, "max_norm": 2.0}],
)
def test_optimizer_follows_torch_adam(changes):
    """Ten steps on a fixed quadratic: the parameters after each step within 1e-6 of torch's Adam
    (L2 weight decay added to the gradient, global-norm clipping before it, as audiocraft does)."""
    import torch

    config = with_optim(lr=0.05, **changes)
    rng = np.random.default_rng(0)
    start = rng.standard_normal((2, 7)).astype(np.float32)
    target = rng.standard_normal((2, 7)).astype(np.float32)

    optimizer = step_module.make_optimizer(config)
    params = {"w": jnp.asarray(start)}
    opt_state = optimizer.init(params)
    grad_fn = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 4))

    w = torch.nn.Parameter(torch.from_numpy(start.copy()))
    o = config.optim
    reference = torch.optim.Adam(
        [w], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    for _ in range(10):
        updates, opt_state = optimizer.update(grad_fn(params), opt_state, params)
        params = optax.apply_updates(params, updates)
        reference.zero_grad()
        torch.sum((w - torch.from_numpy(target)) ** 4).backward()
        if o.max_norm > 0:
            torch.nn.utils.clip_grad_norm_([w], o.max_norm)
        reference.step()
        np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_learning_rate_schedules():
    """Warmup from 0 to lr, then (cosine) half of lr half-way through the decay and 0 at the
    run's last step; a constant without a schedule."""
    run = dataclasses.replace(TINY.run, steps=110)
    cosine = step_module.learning_rate(
        with_optim(lr=1e-3, schedule="cosine", warmup_steps=10).replace(run=run)
    )
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(0.5e-3, rel=1e-5)
    assert float(cosine(10)) == pytest.approx(1e-3, rel=1e-5)
    assert float(cosine(60)) == pytest.approx(0.5e-3, rel=1e-4)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-9)
    warmup = step_module.learning_rate(with_optim(lr=1e-3, warmup_steps=4))
    assert [float(warmup(s)) for s in (0, 2, 4, 100)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])
    assert step_module.learning_rate(with_optim(lr=2e-4)) == 2e-4


def parts_with(every: int, seed: int = 0, adv: float = 4.0):
    config = TINY.replace(
        adversarial=dataclasses.replace(TINY.adversarial, every=every),
        run=dataclasses.replace(TINY.run, seed=seed),
        losses=dataclasses.replace(TINY.losses, adv=adv, feat=adv),
    )
    # Only the config matters for the schedule: the other fields are not read.
    return step_module.Parts(config, *([None] * 7))


def test_discriminator_schedule_is_a_deterministic_draw_of_one_in_every():
    """Decided on the host from (seed, step): the same on every call and every process, a
    fraction 1/every of the steps (within 4 standard deviations over 3000 steps), another draw
    for another seed; every step for every=1, no step without adversarial losses."""
    assert AdversarialConfig().every == 1
    schedule = [parts_with(3).trains_discriminator(s) for s in range(3000)]
    assert schedule == [parts_with(3).trains_discriminator(s) for s in range(3000)]
    assert abs(np.mean(schedule) - 1 / 3) <= 4 * np.sqrt(1 / 3 * 2 / 3 / 3000)
    assert schedule != [parts_with(3, seed=1).trains_discriminator(s) for s in range(3000)]
    assert all(parts_with(1).trains_discriminator(s) for s in range(100))
    assert not any(parts_with(1, adv=0.0).trains_discriminator(s) for s in range(100))


@pytest.mark.slow  # compiles a second variant of the step: 35 s
def test_a_resting_step_leaves_the_discriminator_alone():
    """A step the schedule skips: the discriminator and its optimizer state unchanged to the
    bit, no d_loss reported; the generator still trains."""
    from flax import nnx

    from encodec_jax import EncodecModel
    from encodec_jax.testing import random_audio

    model = EncodecModel(TINY.model, rngs=nnx.Rngs(0))
    parts, state = step_module.build(TINY, model, jax.random.key(0))
    before = jax.tree.map(np.asarray, (state.disc_params, state.disc_opt_state, state.params))
    step = jax.jit(lambda s, x: step_module.train_step(parts, s, x, train_discriminator=False))
    state, metrics = step(state, jnp.asarray(random_audio(2, 1, 2000, 0)))
    after = jax.tree.map(np.asarray, (state.disc_params, state.disc_opt_state, state.params))
    assert "d_loss" not in metrics and "l1" in metrics
    for a, b in zip(jax.tree.leaves(before[:2]), jax.tree.leaves(after[:2]), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before[2]), jax.tree.leaves(after[2]), strict=True)
    ]
    assert any(changed)
