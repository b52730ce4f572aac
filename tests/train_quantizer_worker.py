"""Child process for tests/test_train_quantizer.py: the training-mode RVQ on 8 simulated CPU
devices against one device, written to a JSON file for the parent to check.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/train_quantizer_worker.py OUT.json CONFIG_NAME...

Three steps on new batches (global batch 8 x 10 frames, one item per device), under
`jax.shard_map` with `axis_name` (the batch split over the devices, the state and the key
replicated) on a 1-D mesh and on a 2 x 4 mesh with a tuple of axis names, and under `jax.jit`
with the batch sharded over a mesh and `axis_name=None` (XLA partitions the sums), each against
the same steps on one device.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from encodec_jax.train import quantizer as Q

CONFIGS = {
    # n_q drawn from the key (the same on every device), so that codebooks initialise at
    # different steps; expiry that resets codes from vectors sampled over the global batch, with
    # a threshold near the mean count (80 vectors / 16 codes) so that codes are reset
    "dropout-reset": Q.QuantizerConfig(dim=8, bins=16, n_q=3, q_dropout=True, kmeans_iters=10,
                                       expiry="reset", threshold_ema_dead_code=4),
    # audiocraft's inert expiry
    "faithful": Q.QuantizerConfig(dim=8, bins=16, n_q=3, kmeans_iters=10),
}  # fmt: skip
STEPS = 3


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def shard_mapped(config: Q.QuantizerConfig, shape: tuple[int, ...], axes: tuple[str, ...]):
    """`quantize` under `shard_map` on a mesh of `shape`, the batch split over all its axes."""
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    mesh = jax.make_mesh(shape, axes, axis_types=auto)
    axis_name = axes[0] if len(axes) == 1 else axes

    def per_device(state, x, key):
        out = Q.quantize(config, state, x, key, axis_name=axis_name)
        penalty = lax.pmean(out.penalty, axis_name)  # equal shards: the global batch's mean
        return out.quantized, out.codes, penalty, out.state, out.metrics

    batch = P(axis_name)
    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), batch, P()),
            out_specs=(batch, batch, P(), P(), P()),
        )
    )


def jit_over_mesh(config: Q.QuantizerConfig):
    """`quantize` with `axis_name=None` under `jit`, the batch sharded over a mesh."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    fn = jax.jit(
        lambda s, x, k: Q.quantize(config, s, x, k),
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data")), None),
    )

    def call(state, x, key):
        out = fn(state, x, key)
        return out.quantized, out.codes, out.penalty, out.state, out.metrics

    return call


def main(out_path: str, names: list[str]) -> None:
    result = {"devices": jax.device_count(), "runs": {}}
    for name in names:
        config = CONFIGS[name]
        one = jax.jit(lambda s, x, k, c=config: Q.quantize(c, s, x, k))
        variants = {
            "shard_map": shard_mapped(config, (8,), ("data",)),
            "shard_map 2x4": shard_mapped(config, (2, 4), ("host", "chip")),
            "jit": jit_over_mesh(config),
        }
        states = {k: Q.init_state(config) for k in ("one", *variants)}
        run = {"codes_equal": True, "n_q_equal": True, "rel_errors": {}, "n_q": [], "dead": []}
        for step in range(STEPS):
            x = np.random.default_rng(step).standard_normal((8, 10, 8)).astype(np.float32)
            key = jax.random.key(108 + step)  # n_q 1, 2, 3 with dropout: one init per step
            ref = one(states["one"], jnp.asarray(x), key)
            states["one"] = ref.state
            run["n_q"].append(int(ref.metrics["n_q"]))
            run["dead"].append(np.asarray(ref.metrics["dead_codes"]).tolist())
            for label, fn in variants.items():
                quantized, codes, penalty, state, metrics = fn(states[label], jnp.asarray(x), key)
                states[label] = state
                assert len(quantized.sharding.device_set) == 8, label
                run["codes_equal"] &= bool(np.array_equal(np.asarray(codes), ref.codes))
                run["n_q_equal"] &= int(metrics["n_q"]) == run["n_q"][-1]
                fields = dict(quantized=(quantized, ref.quantized), penalty=(penalty, ref.penalty))
                for field in Q.QuantizerState._fields:
                    fields[field] = (getattr(state, field), getattr(ref.state, field))
                fields["usage"] = (metrics["usage"], ref.metrics["usage"])
                errors = run["rel_errors"]
                for field, (a, b) in fields.items():
                    errors[f"{label} {field}"] = max(
                        errors.get(f"{label} {field}", 0.0), rel_error(a, b)
                    )
        result["runs"][name] = run
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
