"""One training step of EnCodec, in the order of audiocraft's `CompressionSolver.run_step`, as
one jitted function of an explicit state.

1. The generator's forward: encoder, the training-mode RVQ (which updates the codebooks by EMA),
   decoder, cut to the input's length -> `y_pred`.
2. With probability `1 / adversarial.every`, a discriminator step on `y_pred` (no gradient to
   the generator) and the real audio: hinge loss, Adam.
3. The generator's adversarial and feature-matching losses, with the just-updated
   discriminator held constant, and the reconstruction losses (l1, msspec, ...).
4. The balancer combines those losses' gradients with respect to `y_pred` into one; the
   commitment penalty goes back on its own with weight 1.
5. Adam (optionally after gradient clipping), then the model EMA over parameters and codebooks.

Under `jax.jit` with the batch sharded over a mesh, every statistic (the codebooks' EMA counts,
the balancer's norms, the gradients) is over the global batch, so N devices compute what one
device computes on the same global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from .. import functional
from ..model import EncodecModel
from . import balancer as balancing
from . import losses
from .config import TrainConfig
from .discriminator import MultiScaleSTFTDiscriminator
from .ema import EMAState, ema_init, ema_update
from .quantizer import QuantizerConfig, quantize, state_from_codebooks, state_to_codebooks

# audiocraft names the adversarial losses after the adversary ("msstftd").
ADV, FEAT = "adv_msstftd", "feat_msstftd"


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree, checkpointed whole).

    Attributes:
        step: `[]` int32, steps done.
        params: the codec's trainable parameters (`nnx.Param`).
        buffers: the codebooks and their EMA statistics (`modules.Buffer`): updated by the
            quantizer, never by the optimizer.
        disc_params: the discriminator's parameters.
        opt_state, disc_opt_state: the two optimizers' states.
        balancer: the balancer's running norm averages.
        ema: the model EMA over `(params, buffers)` (an empty tuple when off).
        key: the PRNG key of the next step, as raw `uint32` data (`jax.random.key_data`), so
            that a checkpoint holds plain arrays.
    """

    step: jax.Array
    params: Any
    buffers: Any
    disc_params: Any
    opt_state: Any
    disc_opt_state: Any
    balancer: balancing.BalancerState
    ema: EMAState | tuple
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Parts:
    """The static halves of the modules (graph definitions), the constant buffers of the
    discriminator (its STFT windows), and the settings derived from the config."""

    config: TrainConfig
    graphdef: Any
    disc_graphdef: Any
    disc_rest: Any
    quantizer: QuantizerConfig
    balancer: balancing.BalancerConfig
    optimizer: optax.GradientTransformation
    disc_optimizer: optax.GradientTransformation

    @property
    def adversarial(self) -> bool:
        return self.config.losses.adv > 0 or self.config.losses.feat > 0

    def trains_discriminator(self, step: int) -> bool:
        """Whether the step after `step` steps updates the discriminator: with probability
        `1 / adversarial.every`, as audiocraft draws it, but decided on the host from the seed
        and the step so that a resumed run draws the same. (A draw inside the program would
        need `lax.cond`, around which XLA's CPU convolutions run several times slower.)"""
        every = self.config.adversarial.every
        if not self.adversarial:
            return False
        if every == 1:
            return True
        draw = np.random.default_rng([self.config.run.seed, step]).random()
        return bool(draw <= 1.0 / every)

    def model(self, params, buffers) -> EncodecModel:
        return nnx.merge(self.graphdef, params, buffers)

    def discriminator(self, disc_params) -> MultiScaleSTFTDiscriminator:
        return nnx.merge(self.disc_graphdef, disc_params, self.disc_rest)


def build(config: TrainConfig, model: EncodecModel, key: jax.Array) -> tuple[Parts, TrainState]:
    """The static parts and the initial state for training `model` (whose settings' compute
    dtype is replaced by the run's); a fresh discriminator from `key`."""
    settings = model.settings.replace(compute_dtype=config.run.compute_dtype)
    model.settings = settings
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    adv = config.adversarial
    disc_key, state_key = jax.random.split(key)
    disc = MultiScaleSTFTDiscriminator(
        adv.filters,
        in_channels=model.config.audio_channels,
        n_ffts=adv.n_ffts,
        hop_lengths=adv.hop_lengths,
        win_lengths=adv.win_lengths,
        rngs=nnx.Rngs(params=disc_key),
    )
    disc_graphdef, disc_params, disc_rest = nnx.split(disc, nnx.Param, ...)
    n_q = config.n_q or model.config.num_quantizers
    q = config.quantizer
    quantizer = QuantizerConfig.for_model(
        model.config,
        n_q=n_q,
        q_dropout=q.q_dropout,
        decay=q.decay,
        epsilon=q.epsilon,
        kmeans_init=q.kmeans_init,
        kmeans_iters=q.kmeans_iters,
        threshold_ema_dead_code=q.threshold_ema_dead_code,
        commitment_weight=q.commitment_weight,
        expiry=q.expiry,
    )
    b = config.balancer
    balancer = balancing.BalancerConfig(
        weights=balanced_weights(config),
        balance_grads=b.balance_grads,
        total_norm=b.total_norm,
        ema_decay=b.ema_decay,
        per_batch_item=b.per_batch_item,
    )
    parts = Parts(
        config,
        graphdef,
        disc_graphdef,
        disc_rest,
        quantizer,
        balancer,
        make_optimizer(config),
        make_optimizer(config),
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        buffers=buffers,
        disc_params=disc_params,
        opt_state=parts.optimizer.init(params),
        disc_opt_state=parts.disc_optimizer.init(disc_params),
        balancer=balancing.init_balancer(balancer),
        ema=ema_init((params, buffers)) if config.optim.ema_decay else (),
        key=jax.random.key_data(state_key),
    )
    # Fresh buffers for every leaf: initialisers share arrays (zeros), which a donated state
    # must not.
    return parts, jax.tree.map(jnp.copy, state)


def balanced_weights(config: TrainConfig) -> dict[str, float]:
    """The balanced losses and their weights, in audiocraft's order: the adversarial pair, then
    the auxiliary losses with a positive weight, in the order of the `losses` section."""
    w = config.losses
    weights: dict[str, float] = {}
    if w.adv > 0 or w.feat > 0:
        weights[ADV], weights[FEAT] = w.adv, w.feat
    for name in ("l1", "mel", "msspec", "sisnr"):
        if getattr(w, name) > 0:
            weights[name] = getattr(w, name)
    if not weights:
        raise ValueError("every loss weight is 0: nothing to train")
    return weights


def learning_rate(config: TrainConfig) -> optax.ScalarOrSchedule:
    """The generator's and discriminator's learning rate: constant, or a linear warmup from 0,
    or (`schedule: cosine`) the warmup then a cosine decay to 0 at the run's last step."""
    o = config.optim
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, max(o.warmup_steps, 1), max(config.run.steps, o.warmup_steps + 1)
        )
    if o.warmup_steps:
        return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return o.lr


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam as torch's (`eps` outside the square root, L2 weight decay added to the gradient),
    with optional global-norm clipping first, at `learning_rate(config)`."""
    o = config.optim
    lr = learning_rate(config)
    chain = []
    if o.max_norm > 0:
        chain.append(optax.clip_by_global_norm(o.max_norm))
    if o.weight_decay > 0:
        chain.append(optax.add_decayed_weights(o.weight_decay))
    chain.append(optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps))
    return optax.chain(*chain)


def codebooks(model: EncodecModel, n_q: int) -> list:
    return [layer.codebook for layer in model.quantizer.layers[:n_q]]


def generator(
    parts: Parts, params, buffers, audio: jax.Array, key: jax.Array, n_q=None
) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """The generator's training forward: ((y_pred `[B, C, T]`, penalty), quantizer output)."""
    model = parts.model(params, buffers)
    embeddings, scale = functional.embed(model, audio)
    state = state_from_codebooks(codebooks(model, parts.quantizer.n_q))
    out = quantize(parts.quantizer, state, embeddings, key, n_q=n_q)
    y_pred = functional.decode_embeddings(model, out.quantized, scale)[..., : audio.shape[-1]]
    return (y_pred, out.penalty), out


def reconstruction_losses(config: TrainConfig, y_pred, audio, sample_rate: int) -> dict:
    """Every non-adversarial loss by name (each computed whatever its weight)."""
    return {
        "l1": losses.l1_loss(y_pred, audio),
        "mel": losses.mel_loss(y_pred, audio, sample_rate),
        "msspec": losses.msspec_loss(y_pred, audio, sample_rate),
        "sisnr": losses.sisnr_loss(y_pred, audio, sample_rate),
    }


def train_step(
    parts: Parts,
    state: TrainState,
    audio: jax.Array,
    n_q=None,
    train_discriminator: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step (see the module docstring). `audio` `[B, C, T]`; `n_q` overrides the quantizer's
    choice of codebooks (for tests); `train_discriminator` (static: `Parts.trains_discriminator`
    decides it on the host) whether this step updates the discriminator. Returns the new state
    and scalar metrics (`d_loss` only on steps that train the discriminator)."""
    config = parts.config
    sample_rate = parts.model(state.params, state.buffers).config.sampling_rate
    # Three keys as before the discriminator's draw moved to the host, so runs keep their streams.
    key, q_key, _ = jax.random.split(jax.random.wrap_key_data(state.key), 3)

    (y_pred, penalty), backward, qout = jax.vjp(
        lambda p: generator(parts, p, state.buffers, audio, q_key, n_q),
        state.params,
        has_aux=True,
    )

    metrics: dict[str, jax.Array] = {}
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if parts.adversarial:
        real, fake = audio, lax.stop_gradient(y_pred)

        def disc_loss(p):
            disc = parts.discriminator(p)
            return losses.discriminator_loss(disc(fake)[0], disc(real)[0])

        if train_discriminator:
            d_loss, disc_grads = jax.value_and_grad(disc_loss)(disc_params)
            updates, disc_opt_state = parts.disc_optimizer.update(
                disc_grads, disc_opt_state, disc_params
            )
            disc_params = optax.apply_updates(disc_params, updates)
            metrics["d_msstftd"] = metrics["d_loss"] = d_loss

    def balanced_losses(y):
        values = {}
        if parts.adversarial:
            disc = parts.discriminator(disc_params)
            logits_fake, fmaps_fake = disc(y)
            _, fmaps_real = disc(audio)
            values[ADV], values[FEAT] = losses.generator_adversarial_losses(
                logits_fake, fmaps_fake, fmaps_real
            )
        reconstruction = reconstruction_losses(config, y, audio, sample_rate)
        values.update({k: reconstruction[k] for k in parts.balancer.names if k in reconstruction})
        return values

    balanced = balancing.balance(parts.balancer, state.balancer, balanced_losses, y_pred)
    (grads,) = backward((balanced.grad, jnp.ones_like(penalty)))
    updates, opt_state = parts.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    model = parts.model(params, state.buffers)
    state_to_codebooks(qout.state, codebooks(model, parts.quantizer.n_q))
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    ema = state.ema
    if config.optim.ema_decay:
        ema = ema_update(ema, (params, buffers), config.optim.ema_decay)

    info = reconstruction_losses(config, lax.stop_gradient(y_pred), audio, sample_rate)
    metrics.update({k: v for k, v in info.items() if k not in balanced.losses})
    metrics.update(balanced.losses)
    metrics.update(balanced.metrics)
    if parts.adversarial:
        metrics["adv"], metrics["feat"] = balanced.losses[ADV], balanced.losses[FEAT]
    metrics["g_loss"] = balanced.effective_loss
    metrics["penalty"] = penalty
    metrics["grad_norm"] = optax.global_norm(grads)
    n_q_used = qout.metrics["n_q"]
    metrics["n_q"] = n_q_used.astype(jnp.float32)
    frame_rate = model.config.frame_rate
    bits = math.log2(parts.quantizer.bins)
    metrics["bandwidth"] = n_q_used.astype(jnp.float32) * bits * frame_rate / 1000
    used = jnp.arange(parts.quantizer.n_q) < n_q_used
    metrics["perplexity"] = jnp.sum(jnp.where(used, qout.metrics["perplexity"], 0.0)) / n_q_used
    metrics["dead_codes"] = jnp.sum(jnp.where(used, qout.metrics["dead_codes"], 0)).astype(
        jnp.float32
    )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        buffers=buffers,
        disc_params=disc_params,
        opt_state=opt_state,
        disc_opt_state=disc_opt_state,
        balancer=balanced.state,
        ema=ema,
        key=jax.random.key_data(key),
    )
    return new_state, metrics


def make_step(parts: Parts) -> Callable[[TrainState, jax.Array, int], tuple[TrainState, dict]]:
    """`train_step` jitted for `parts`, the state donated (its buffers are reused in place):
    `step_fn(state, audio, step)`, `step` the number of steps done before this one (a host
    integer, which picks one of at most two compiled programs: with and without the
    discriminator's update)."""
    compiled = jax.jit(
        lambda state, audio, train_disc: train_step(
            parts, state, audio, train_discriminator=train_disc
        ),
        donate_argnums=0,
        static_argnums=2,
    )
    return lambda state, audio, step: compiled(state, audio, parts.trains_discriminator(step))
