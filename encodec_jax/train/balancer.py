"""audiocraft 1.3.0's loss balancer (`losses/balancer.py`) as a pure function with explicit state.

The balancer combines the gradients of several losses with respect to the decoder's output
`y_pred` (the single point where the losses depend on the model) before that one gradient is
backpropagated into the model. With `g_i = d loss_i / d y_pred` and `avg(|g_i|)` a
bias-corrected exponential moving average of its norm over the steps,

    G = sum_i (w_i / sum_j w_j) * total_norm * g_i / (epsilon + avg(|g_i|)),

so that each loss contributes the fraction `w_i / sum w` of the gradient whatever its scale.
With `balance_grads=False`, `G = sum_i w_i g_i`, the plain weighted sum.

The norm average is flashy's `averager(decay)`: running sums `total <- decay * total + norm`
and `fix <- decay * fix + 1`, averaged as `total / fix`. audiocraft keeps them in Python
floats (double precision); here they are float32 arrays, which differ from the reference by a
float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class BalancerConfig:
    """Static settings of the balancer (hashable: static under `jax.jit`); defaults are
    audiocraft's `config/solver/compression/default.yaml`.

    Attributes:
        weights: the weight of each loss, by name; a mapping is stored as a tuple of
            `(name, weight)` pairs in its order, which is the order the gradients are summed in.
        balance_grads: rescale each gradient by its norm (else: a plain weighted sum).
        total_norm: the norm the balanced gradient aims at (0 means 1, as in audiocraft).
        ema_decay: decay of the norm average (0 means 1, a plain average, as in audiocraft).
        per_batch_item: the norm of each batch item's gradient, averaged over the batch; else
            the norm of the whole gradient.
        epsilon: added to the averaged norm before dividing.
    """

    weights: Mapping[str, float] | tuple[tuple[str, float], ...]
    balance_grads: bool = True
    total_norm: float = 1.0
    ema_decay: float = 0.999
    per_batch_item: bool = True
    epsilon: float = 1e-12

    def __post_init__(self) -> None:
        items = self.weights.items() if isinstance(self.weights, Mapping) else self.weights
        weights = tuple((str(name), float(w)) for name, w in items)
        if len({name for name, _ in weights}) != len(weights):
            raise ValueError(f"Invalid BalancerConfig: repeated loss names in {weights}")
        object.__setattr__(self, "weights", weights)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)


class BalancerState(NamedTuple):
    """flashy's averager, per loss: `total` the decayed sum of the norms, `fix` the decayed sum
    of their weights (1 per step); the average norm is `total / fix`. Both `{name: []}`."""

    total: dict[str, jax.Array]
    fix: dict[str, jax.Array]


class BalancerOutput(NamedTuple):
    """What `balance` returns.

    Attributes:
        grad: the combined gradient with respect to `y_pred`, its shape.
        effective_loss: `sum_i scale_i * loss_i` with the scales applied to the gradients
            (audiocraft's return value, logged as `g_loss`); a value, not differentiated.
        losses: `{name: []}` the losses' values.
        state: the updated `BalancerState`.
        metrics: `{"ratio_<name>": []}` each loss's share of the summed average norms.
        aux: what the loss function returned beside the losses (`has_aux`), else None.
    """

    grad: jax.Array
    effective_loss: jax.Array
    losses: dict[str, jax.Array]
    state: BalancerState
    metrics: dict[str, jax.Array]
    aux: Any = None


def init_balancer(config: BalancerConfig) -> BalancerState:
    """Empty running sums for every loss named in `config.weights`."""
    zeros = {name: jnp.zeros((), jnp.float32) for name in config.names}
    return BalancerState(total=zeros, fix=dict(zeros))


def _norm(grad: jax.Array, per_batch_item: bool) -> jax.Array:
    if per_batch_item:
        axes = tuple(range(1, grad.ndim))
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(grad), axis=axes)))
    return jnp.sqrt(jnp.sum(jnp.square(grad)))


def balance_gradients(
    config: BalancerConfig,
    state: BalancerState,
    grads: Mapping[str, jax.Array],
    losses: Mapping[str, jax.Array],
    *,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array, BalancerState, dict[str, jax.Array]]:
    """Combine the losses' gradients with respect to `y_pred`, as `Balancer.backward` does.

    Args:
        config: static settings; every loss must have a weight.
        state: the running norm averages (replicated across `axis_name`).
        grads: `{name: [B, ...]}` each loss's gradient with respect to `y_pred`.
        losses: `{name: []}` the losses' values, for the effective loss.
        axis_name: the data-parallel axis (inside `shard_map`/`vmap`), or None. The norms are
            averaged over it, as flashy's `average_metrics` averages them across workers.
            audiocraft averages the norms after each worker's EMA; the EMA is linear, so
            averaging before it gives the same numbers and keeps the state identical on every
            device.

    Returns:
        `(grad, effective_loss, state, metrics)`: the combined gradient (`y_pred`'s shape), the
        effective loss `[]`, the new state, and `{"ratio_<name>": []}`.

    Raises:
        ValueError: a loss without a weight or without state, or weights summing to <= 0.
    """
    names = [name for name in config.names if name in grads]
    unknown = set(grads) - set(config.names)
    if unknown or set(losses) != set(grads):
        raise ValueError(
            f"losses {sorted(losses)} and gradients {sorted(grads)} must be the same, with a "
            f"weight each ({sorted(config.names)})"
        )
    if not set(names) <= set(state.total):
        raise ValueError(f"no balancer state for {sorted(set(names) - set(state.total))}")
    weights = dict(config.weights)
    total_weight = sum(weights[name] for name in names)
    if not total_weight > 0:
        raise ValueError(f"the weights of {names} must sum to more than 0")
    decay = config.ema_decay or 1.0
    total_norm = config.total_norm or 1.0

    norms = {name: _norm(grads[name], config.per_batch_item) for name in names}
    if axis_name is not None:
        # flashy weights each worker by its batch size (per item) or 1; the shards of an SPMD
        # batch are equal, so either way it is the plain mean.
        norms = lax.pmean(norms, axis_name)

    new_total, new_fix = dict(state.total), dict(state.fix)
    for name in names:
        new_total[name] = state.total[name] * decay + norms[name]
        new_fix[name] = state.fix[name] * decay + 1.0
    averaged = {name: new_total[name] / new_fix[name] for name in names}

    summed_norms = sum(averaged.values())
    metrics = {f"ratio_{name}": averaged[name] / summed_norms for name in names}

    like = grads[names[0]]
    grad = jnp.zeros_like(like)
    effective_loss = jnp.zeros((), like.dtype)
    for name in names:
        if config.balance_grads:
            ratio = weights[name] / total_weight
            scale = ratio * total_norm / (config.epsilon + averaged[name])
        else:
            scale = weights[name]
        grad = grad + scale * grads[name]
        effective_loss = effective_loss + scale * lax.stop_gradient(losses[name])
    return grad, effective_loss, BalancerState(new_total, new_fix), metrics


def balance(
    config: BalancerConfig,
    state: BalancerState,
    loss_fn: Callable[..., Any],
    y_pred: jax.Array,
    *,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> BalancerOutput:
    """Evaluate the losses of `y_pred` and combine their gradients, with one forward pass and
    one backward pass per loss (audiocraft's `autograd.grad(loss, y_pred)` per loss).

    Args:
        config: static settings.
        state: the running norm averages.
        loss_fn: `y_pred -> {name: []}` (or `(losses, aux)` with `has_aux`); everything else it
            needs (the target, a discriminator's parameters) closed over.
        y_pred: `[B, ...]` the decoder's output.
        has_aux: `loss_fn` also returns auxiliary values, passed through.
        axis_name: the data-parallel axis, or None (see `balance_gradients`).

    Returns:
        `BalancerOutput`; backpropagate `grad` into the model with the model's own vjp.
    """
    if has_aux:
        losses, vjp, aux = jax.vjp(loss_fn, y_pred, has_aux=True)
    else:
        (losses, vjp), aux = jax.vjp(loss_fn, y_pred), None
    losses = dict(losses)

    def cotangent(selected: str) -> dict[str, jax.Array]:
        return {
            name: (jnp.ones_like if name == selected else jnp.zeros_like)(value)
            for name, value in losses.items()
        }

    grads = {name: vjp(cotangent(name))[0] for name in losses}
    grad, effective_loss, state, metrics = balance_gradients(
        config, state, grads, losses, axis_name=axis_name
    )
    return BalancerOutput(grad, effective_loss, losses, state, metrics, aux)
