"""Child process for tests/test_train_quantizer.py: the training-mode RVQ on 8 simulated CPU
devices against one device, written to a JSON file for the parent to check.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/train_quantizer_worker.py OUT.json CONFIG_NAME...

Three steps on new batches (global batch 8 x 10 frames, one item per device), once under
`jax.shard_map` with `axis_name` (the batch split over the devices, the state and the key
replicated) and once under `jax.jit` with the batch sharded over a mesh and `axis_name=None`
(XLA partitions the sums), each against the same steps on one device.
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


def main(out_path: str, names: list[str]) -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    result = {"devices": jax.device_count(), "runs": {}}
    for name in names:
        config = CONFIGS[name]
        one = jax.jit(lambda s, x, k, c=config: Q.quantize(c, s, x, k))

        def per_device(state, x, key, config=config):
            out = Q.quantize(config, state, x, key, axis_name="data")
            penalty = lax.pmean(out.penalty, "data")  # equal shards: the global batch's mean
            return out.quantized, out.codes, penalty, out.state, out.metrics

        sharded = jax.jit(
            jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), P("data"), P()),
                out_specs=(P("data"), P("data"), P(), P(), P()),
            )
        )
        meshed = jax.jit(
            lambda s, x, k, c=config: Q.quantize(c, s, x, k),
            in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data")), None),
        )
        states = {k: Q.init_state(config) for k in ("one", "shard_map", "jit")}
        run = {"codes_equal": True, "n_q_equal": True, "rel_errors": {}, "n_q": [], "dead": []}
        for step in range(STEPS):
            x = np.random.default_rng(step).standard_normal((8, 10, 8)).astype(np.float32)
            key = jax.random.key(108 + step)  # n_q 1, 2, 3 with dropout: one init per step
            ref = one(states["one"], jnp.asarray(x), key)
            states["one"] = ref.state
            run["n_q"].append(int(ref.metrics["n_q"]))
            run["dead"].append(np.asarray(ref.metrics["dead_codes"]).tolist())
            got_sm = sharded(states["shard_map"], jnp.asarray(x), key)
            got_jit = meshed(states["jit"], jnp.asarray(x), key)
            states["shard_map"], states["jit"] = got_sm[3], got_jit.state
            assert len(got_sm[0].sharding.device_set) == 8
            for label, quantized, codes, penalty, state, metrics in (
                ("shard_map", *got_sm),
                ("jit", got_jit.quantized, got_jit.codes, got_jit.penalty, got_jit.state,
                 got_jit.metrics),
            ):  # fmt: skip
                run["codes_equal"] &= bool(np.array_equal(np.asarray(codes), ref.codes))
                run["n_q_equal"] &= int(metrics["n_q"]) == run["n_q"][-1]
                fields = dict(quantized=(quantized, ref.quantized), penalty=(penalty, ref.penalty))
                for field in Q.QuantizerState._fields:
                    fields[field] = (getattr(state, field), getattr(ref.state, field))
                fields["usage"] = (metrics["usage"], ref.metrics["usage"])
                errors = run["rel_errors"]
                for field, (a, b) in fields.items():
                    name_ = f"{label} {field}"
                    errors[name_] = max(errors.get(name_, 0.0), rel_error(a, b))
        result["runs"][name] = run
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
