"""An exponential moving average of the model's weights: audiocraft 1.3.0's `ModuleDictEMA`
(`optim/ema.py`) as two pure functions on pytrees.

audiocraft averages every floating-point parameter and persistent buffer (the codebooks and
their statistics included), and validates and exports the averaged copy. With `unbias=True` the
average is bias-corrected by a decayed step count, so that early steps are not pulled towards
the initial weights:

    count <- count * decay + 1;  w = 1 / count;  ema <- ema * (1 - w) + value * w

(the first step copies the weights), and with `unbias=False`, `w = 1 - decay`. audiocraft keeps
`count` in a Python float (double precision); here it is a float32 array, which differs from the
reference by a float32 rounding (about 1e-7 relative).

Leaves that are not floating point (integer step counters, say) are not averaged, as the
reference skips them: the average keeps the live value, which is what swapping the reference's
EMA weights into the model leaves there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class EMAState(NamedTuple):
    """The average and its bias-correction count.

    Attributes:
        count: `[]` float32, the decayed number of updates (`unbias=True`; unused otherwise).
        params: the averaged pytree, the structure of the weights it averages.
    """

    count: jax.Array
    params: PyTree


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def ema_init(params: PyTree) -> EMAState:
    """Start the average at a copy of `params` (any pytree of arrays, e.g. an `nnx.State`)."""
    return EMAState(count=jnp.zeros((), jnp.float32), params=jax.tree.map(jnp.array, params))


def ema_update(
    state: EMAState, params: PyTree, decay: float = 0.99, unbias: bool = True
) -> EMAState:
    """One step of the average towards the current `params` (`ModuleDictEMA.step`).

    Args:
        state: the average so far.
        params: the current weights, the same structure as `state.params`.
        decay: the EMA decay (audiocraft's compression solver uses 0.99; the class's own
            default is 0.999).
        unbias: bias-correct by the decayed step count (else a plain EMA with weight
            `1 - decay`).

    Returns:
        The new `EMAState`.
    """
    if unbias:
        count = state.count * decay + 1.0
        w = 1.0 / count
    else:
        count = state.count
        w = jnp.asarray(1.0 - decay, jnp.float32)

    def average(ema: jax.Array, value: jax.Array) -> jax.Array:
        if not _is_float(value):
            return value
        # The reference's order: mul_(1 - w), then add_(value, alpha=w). The average holds
        # values, like the reference's `.detach()`: no gradient flows into it.
        w_ = w.astype(ema.dtype)
        return ema * (1 - w_) + jax.lax.stop_gradient(value) * w_

    return EMAState(count=count, params=jax.tree.map(average, state.params, params))
