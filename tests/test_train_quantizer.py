"""The training-mode RVQ (`encodec_jax.train.quantizer`) against audiocraft 1.3.0's
`ResidualVectorQuantizer` in training mode (float32, CPU).

Both sides start from the same k-means vectors: audiocraft's `sample_vectors` is patched to take
the rows that `quantizer.sample_indices` drew, and n_q is drawn outside and given to both. Codes
are compared for equality; the floating-point results with the tolerances next to each check.
The EMA sums and k-means sums add in a different order in torch and XLA, which is what the
tolerances allow for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encodec_jax.train import quantizer as Q

from .audiocraft_reference import audiocraft

torch = pytest.importorskip("torch")

WORKER = Path(__file__).with_name("train_quantizer_worker.py")
DIM, BINS, N_Q = 8, 16, 3
# Relative to each array's largest magnitude: the codebooks after a few EMA steps hold values
# from ~1e-3 to ~1e5 (audiocraft's codes that no vector reached are divided by ~epsilon), so an
# elementwise rtol would be dominated by the smallest values' absolute rounding.
RTOL = 1e-5

quantize = jax.jit(Q.quantize, static_argnums=0, static_argnames="axis_name")
kmeans = jax.jit(Q.kmeans, static_argnums=2)


def assert_close(name: str, got, want, rtol: float = RTOL, measured: dict | None = None) -> None:
    """max |got - want| <= rtol * max |want|, elementwise and NaN-free; records the errors."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want)), name
    err = np.max(np.abs(got - want), initial=0.0)
    scale = np.max(np.abs(want), initial=0.0)
    if measured is not None:
        previous = measured.get(name, (0.0, 0.0))
        measured[name] = (max(previous[0], err), max(previous[1], err / max(scale, 1e-30)))
    assert err <= rtol * scale, f"{name}: max abs error {err:.3g}, peak {scale:.3g}"


@pytest.fixture(scope="module")
def core(torch_single_thread):
    return audiocraft("quantization.core_vq")


@pytest.fixture
def injected(core, monkeypatch):
    """audiocraft with its k-means starting vectors taken from `injected["indices"]` ([n_q,
    bins] rows of the layer's flattened input), so that both sides start k-means equal.

    Only k-means' draws are replaced: the draws of audiocraft's expiry keep torch's RNG, as
    they cannot change any result (the EMA overwrites them), which the tests check."""
    state: dict = {"layer": None, "indices": None, "kmeans_calls": []}
    original_sample = core.sample_vectors
    original_init = core.EuclideanCodebook.init_embed_

    def init_embed_(self, data):
        state["layer"] = self.layer_index
        try:
            return original_init(self, data)
        finally:
            state["layer"] = None

    def sample_vectors(samples, num):
        if state["layer"] is None:
            return original_sample(samples, num)
        state["kmeans_calls"].append(state["layer"])
        rows = torch.from_numpy(np.asarray(state["indices"][state["layer"]], np.int64))
        return samples[rows]

    monkeypatch.setattr(core, "sample_vectors", sample_vectors)
    monkeypatch.setattr(core.EuclideanCodebook, "init_embed_", init_embed_)
    return state


def reference_rvq(config: Q.QuantizerConfig):
    vq = audiocraft("quantization.vq")
    torch.manual_seed(0)
    rvq = vq.ResidualVectorQuantizer(
        dimension=config.dim,
        n_q=config.n_q,
        q_dropout=False,  # n_q is drawn outside and given to both sides
        bins=config.bins,
        decay=config.decay,
        kmeans_init=config.kmeans_init,
        kmeans_iters=config.kmeans_iters,
        threshold_ema_dead_code=config.threshold_ema_dead_code,
    ).train()
    for i, layer in enumerate(rvq.vq.layers):
        layer._codebook.layer_index = i
    return rvq


def reference_buffers(rvq) -> dict[str, np.ndarray]:
    codebooks = [layer._codebook for layer in rvq.vq.layers]
    return {
        name: np.stack([getattr(cb, name).detach().numpy().reshape(-1) for cb in codebooks])
        for name in ("embed", "embed_avg", "cluster_size", "inited")
    }


def load_reference(rvq, state: Q.QuantizerState) -> None:
    with torch.no_grad():
        for i, layer in enumerate(rvq.vq.layers):
            cb = layer._codebook
            for name in ("embed", "embed_avg", "cluster_size", "inited"):
                value = np.asarray(getattr(state, name)[i]).reshape(getattr(cb, name).shape)
                getattr(cb, name).copy_(torch.from_numpy(value))


def reference_step(rvq, x: np.ndarray, n_q: int, weights: np.ndarray | None = None):
    """One training forward of audiocraft's RVQ on `x [B, T, D]` with `n_q` codebooks; with
    `weights`, also the gradient of `sum(quantized * weights) + penalty` w.r.t. x."""
    rvq.n_q = n_q
    xt = torch.from_numpy(x.transpose(0, 2, 1).copy()).requires_grad_(weights is not None)
    res = rvq(xt, frame_rate=1)
    out = {
        "quantized": res.x.detach().numpy().transpose(0, 2, 1),
        "codes": res.codes.numpy(),
        "penalty": float(res.penalty),
    }
    if weights is not None:
        w = torch.from_numpy(weights.transpose(0, 2, 1).copy())
        (penalty_grad,) = torch.autograd.grad(res.penalty, xt, retain_graph=True)
        (torch.sum(res.x * w) + res.penalty).backward()
        out["grad"] = xt.grad.numpy().transpose(0, 2, 1)
        out["penalty_grad"] = penalty_grad.numpy().transpose(0, 2, 1)
    return out


def batch(seed: int, b: int, t: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, t, dim)).astype(np.float32)


def start_indices(key: jax.Array, num_samples: int, n_q: int = N_Q, bins: int = BINS):
    """`[n_q, bins]` k-means starting rows, drawn as `quantize` draws them."""
    keys = jax.random.split(key, n_q)
    return np.stack([np.asarray(Q.sample_indices(k, num_samples, bins)) for k in keys])


def test_sample_indices():
    key = jax.random.key(3)
    without = np.asarray(Q.sample_indices(key, 40, BINS))
    assert without.shape == (BINS,) and len(set(without.tolist())) == BINS
    assert without.min() >= 0 and without.max() < 40
    # fewer rows than codes: drawn with replacement, so rows repeat
    with_replacement = np.asarray(Q.sample_indices(key, 10, BINS))
    assert with_replacement.shape == (BINS,) and with_replacement.max() < 10
    assert len(set(with_replacement.tolist())) < BINS


@pytest.mark.parametrize("frames", [40, 10], ids=["randperm", "with-replacement"])
def test_kmeans(core, injected, frames):
    """audiocraft's kmeans from the same starting rows: means and last-iteration counts."""
    samples = batch(1, 1, frames)[0]
    indices = start_indices(jax.random.key(frames), frames)
    injected["indices"], injected["layer"] = indices, 0
    want_means, want_counts = core.kmeans(torch.from_numpy(samples), BINS, 50)
    injected["layer"] = None
    got_means, got_counts = kmeans(jnp.asarray(samples), jnp.asarray(samples[indices[0]]), 50)
    np.testing.assert_array_equal(np.asarray(got_counts), want_counts.numpy())
    # measured: equal to the bit (XLA's CPU scatter-add sums in torch's order)
    assert_close("means", got_means, want_means.numpy(), rtol=1e-6)


SCHEDULES = {
    "fixed": [N_Q] * 5,
    # codebook 1 first runs (and initialises) at step 1, codebook 2 at step 3
    "dropout": [1, 2, 1, 3, 2],
}


@pytest.mark.parametrize(
    "schedule,frames",
    [("fixed", 30), ("dropout", 30), ("fixed", 6)],
    ids=["fixed", "dropout", "fixed-few-frames"],
)
def test_training_steps_match_audiocraft(injected, schedule, frames, record_property):
    """5 steps on new batches: codes, output, penalty and every buffer after each step.
    `few-frames`: 12 vectors for 16 codes, so k-means starts from rows drawn with replacement
    and some codes get no vector (audiocraft then divides their sums by ~epsilon)."""
    config = Q.QuantizerConfig(dim=DIM, bins=BINS, n_q=N_Q)
    measured = check_steps(injected, config, SCHEDULES[schedule], 2, frames)
    record_property("measured", measured)
    print(schedule, frames, json.dumps(measured, indent=1))


@pytest.mark.slow
def test_training_steps_match_audiocraft_larger(injected, record_property):
    """The same at sizes nearer a real codec's (dim 64, 512 codes, 4 x 150 frames, 4
    codebooks), where near-ties between codes are more frequent."""
    config = Q.QuantizerConfig(dim=64, bins=512, n_q=4)
    measured = check_steps(injected, config, [4, 2, 4, 3, 4], 4, 150)
    record_property("measured", measured)
    print(json.dumps(measured, indent=1))


def check_steps(injected, config: Q.QuantizerConfig, schedule, b: int, frames: int) -> dict:
    """Run `schedule` (n_q per step) on both sides and compare after every step."""
    rvq = reference_rvq(config)
    state = Q.init_state(config)
    indices = start_indices(jax.random.key(7), b * frames, config.n_q, config.bins)
    injected["indices"] = indices
    measured: dict = {}
    for step, n_q in enumerate(schedule):
        x = batch(100 + step, b, frames, config.dim)
        want = reference_step(rvq, x, n_q)
        got = quantize(config, state, jnp.asarray(x), jax.random.key(step), n_q=n_q,
                       kmeans_indices=indices)  # fmt: skip
        state = got.state
        codes = np.asarray(got.codes)
        np.testing.assert_array_equal(codes[:, :n_q], want["codes"], err_msg=f"step {step}")
        assert np.all(codes[:, n_q:] == -1)
        assert int(got.metrics["n_q"]) == n_q
        assert_close("quantized", got.quantized, want["quantized"], measured=measured)
        assert_close("penalty", got.penalty, want["penalty"], measured=measured)
        buffers = reference_buffers(rvq)
        for name, value in buffers.items():
            ours = np.asarray(getattr(state, name)).reshape(value.shape)
            assert_close(name, ours, value, measured=measured)
        # the usage metric is the step's counts: cluster_size = decay * old + (1 - decay) * usage
        usage = np.asarray(got.metrics["usage"])
        assert np.all(usage[n_q:] == 0) and np.all(usage[:n_q].sum(axis=1) == b * frames)
    # k-means ran once per codebook, in the order the codebooks were first used
    assert injected["kmeans_calls"] == list(range(config.n_q))
    return {k: f"max abs {a:.2e}, rel {r:.2e}" for k, (a, r) in measured.items()}


def test_straight_through_and_penalty_gradient(injected):
    """d(sum(quantized * w) + penalty)/dx equals torch's, and without the penalty it is w."""
    config = Q.QuantizerConfig(dim=DIM, bins=BINS, n_q=N_Q)
    rvq = reference_rvq(config)
    indices = start_indices(jax.random.key(1), 60)
    injected["indices"] = indices
    state = Q.init_state(config)
    state = quantize(config, state, jnp.asarray(batch(0, 2, 30)), jax.random.key(0),
                     kmeans_indices=indices).state  # fmt: skip
    reference_step(rvq, batch(0, 2, 30), N_Q)
    x, w = batch(1, 2, 30), batch(2, 2, 30)
    want = reference_step(rvq, x, 2, weights=w)

    def loss(x, output_weight, penalty_weight):
        out = Q.quantize(config, state, x, jax.random.key(1), n_q=2)
        return output_weight * jnp.sum(out.quantized * w) + penalty_weight * out.penalty

    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    x = jnp.asarray(x)
    # the straight-through estimator: the gradient of the identity, exactly
    np.testing.assert_array_equal(np.asarray(grad(x, 1.0, 0.0)), w)
    # the penalty's own gradient: 2 (r_i - q_i) / numel / n_q summed over the codebooks
    penalty_grad = np.asarray(grad(x, 0.0, 1.0))
    assert np.max(np.abs(penalty_grad)) > 1e-3
    assert_close("penalty grad", penalty_grad, want["penalty_grad"], rtol=1e-6)
    assert_close("grad", grad(x, 1.0, 1.0), want["grad"], rtol=1e-6)


def dead_code_state(config: Q.QuantizerConfig, dead: np.ndarray) -> Q.QuantizerState:
    """Initialised codebooks of unit scale, except the codes in `dead`, which sit ~1000 away
    from every vector with an EMA count of 0 (what audiocraft's EMA makes of a code that no
    vector reached: its embed_avg decays and is divided by ~epsilon)."""
    rng = np.random.default_rng(5)
    shape = (config.n_q, config.bins, config.dim)
    embed = rng.standard_normal(shape).astype(np.float32)
    cluster_size = np.full(shape[:2], 5.0, np.float32)
    direction = rng.standard_normal((len(dead), config.dim)).astype(np.float32)
    embed[0, dead] = 1000.0 * direction
    cluster_size[0, dead] = 0.0
    embed_avg = embed * cluster_size[..., None]
    embed_avg[0, dead] = 0.01 * direction
    return Q.QuantizerState(
        jnp.asarray(embed),
        jnp.asarray(embed_avg),
        jnp.asarray(cluster_size),
        jnp.ones((config.n_q,), jnp.float32),
    )


def test_dead_code_expiry(core, record_property):
    """Codes 0-3 of the first codebook can never be chosen. "faithful" leaves them there, as
    audiocraft does (its replacement is overwritten), "reset" moves them onto vectors of the
    batch, where the same batch then uses them; every other statistic is the same."""
    dead = np.arange(4)
    faithful = Q.QuantizerConfig(dim=DIM, bins=BINS, n_q=N_Q)
    reset = Q.QuantizerConfig(dim=DIM, bins=BINS, n_q=N_Q, expiry="reset")
    state = dead_code_state(faithful, dead)
    x = batch(9, 2, 30)
    rvq = reference_rvq(faithful)
    load_reference(rvq, state)
    torch.manual_seed(0)
    want = reference_step(rvq, x, N_Q)
    # the reference did draw replacement vectors: with torch's RNG re-seeded differently, its
    # buffers are the same (the draw has no effect)
    buffers = reference_buffers(rvq)
    load_reference(rvq, state)
    torch.manual_seed(1)
    reference_step(rvq, x, N_Q)
    for name, value in reference_buffers(rvq).items():
        np.testing.assert_array_equal(value, buffers[name])

    key = jax.random.key(11)
    out_f = quantize(faithful, state, jnp.asarray(x), key)
    out_r = quantize(reset, state, jnp.asarray(x), key)
    np.testing.assert_array_equal(np.asarray(out_f.codes), want["codes"])
    for name, value in buffers.items():
        ours = np.asarray(getattr(out_f.state, name)).reshape(value.shape)
        assert_close(f"faithful {name}", ours, value)
    expired = np.asarray(out_f.metrics["dead_codes"])
    assert expired[0] == len(dead) and np.all(expired[1:] == 0)
    np.testing.assert_array_equal(np.asarray(out_r.metrics["dead_codes"]), expired)
    # the codes of this step were chosen before the expiry: identical in both modes
    np.testing.assert_array_equal(np.asarray(out_r.codes), np.asarray(out_f.codes))

    rows = x.reshape(-1, DIM)
    new = np.asarray(out_r.state.embed[0])
    distance = np.min(np.linalg.norm(new[dead, None] - rows[None], axis=-1), axis=1)
    # each reset code is a row of the batch, up to the Laplace smoothing of its count
    assert np.all(distance < 1e-4 * np.linalg.norm(new[dead], axis=-1)), distance
    old = np.asarray(out_f.state.embed[0])
    assert np.all(np.linalg.norm(old[dead], axis=-1) > 500)  # faithful: still far away
    alive = np.setdiff1d(np.arange(BINS), dead)
    for name in ("cluster_size", "embed_avg"):
        np.testing.assert_array_equal(
            np.asarray(getattr(out_r.state, name))[0, alive],
            np.asarray(getattr(out_f.state, name))[0, alive],
        )
    mean_count = float(np.mean(state.cluster_size[0]))
    np.testing.assert_allclose(np.asarray(out_r.state.cluster_size[0, dead]), 0.99 * mean_count)
    # the other codes' embed moves only through the Laplace smoothing's total count
    assert_close("alive embed", new[alive], old[alive], rtol=1e-3)

    # the next step, on the same batch: the reset codes are used, the faithful ones are not
    usage_r = np.asarray(quantize(reset, out_r.state, jnp.asarray(x), key).metrics["usage"])
    usage_f = np.asarray(quantize(faithful, out_f.state, jnp.asarray(x), key).metrics["usage"])
    assert np.all(usage_f[0, dead] == 0)
    assert np.all(usage_r[0, dead] >= 1), usage_r[0, dead]
    record_property("reset distance", float(distance.max()))


def test_dropout_draws_and_masks():
    """q_dropout draws n_q in 1..n_q from the key, and a codebook beyond it is left as it was."""
    config = Q.QuantizerConfig(dim=DIM, bins=BINS, n_q=N_Q, q_dropout=True, kmeans_iters=2)
    drawn = [int(Q.draw_n_q(jax.random.key(i), N_Q)) for i in range(60)]
    assert set(drawn) == {1, 2, 3}
    state = Q.init_state(config)
    x = jnp.asarray(batch(3, 2, 30))
    for seed in range(60):
        out = quantize(config, state, x, jax.random.key(seed))
        n_q = int(out.metrics["n_q"])
        if n_q < N_Q:
            break
    assert n_q == drawn[seed] < N_Q
    np.testing.assert_array_equal(np.asarray(out.state.inited), np.arange(N_Q) < n_q)
    for name in ("embed", "embed_avg", "cluster_size"):
        np.testing.assert_array_equal(
            np.asarray(getattr(out.state, name))[n_q:], np.asarray(getattr(state, name))[n_q:]
        )


def test_model_codebooks_round_trip():
    from flax import nnx

    from encodec_jax import EncodecConfig
    from encodec_jax.modules import EncodecResidualVectorQuantizer

    # 75 frames/s x 4 bits: 0.3 kbps per codebook, 2 codebooks
    config = EncodecConfig(codebook_size=16, hidden_size=8, num_filters=4, target_bandwidths=(0.6,))
    rvq = EncodecResidualVectorQuantizer(config, rngs=nnx.Rngs(0))
    codebooks = [layer.codebook for layer in rvq.layers]
    qconfig = Q.QuantizerConfig.for_model(config)
    assert (qconfig.dim, qconfig.bins, qconfig.n_q) == (8, 16, 2)
    state = Q.init_state(dataclasses.replace(qconfig, kmeans_init=False), jax.random.key(0))
    state = state._replace(cluster_size=state.cluster_size + 1.5)
    Q.state_to_codebooks(state, codebooks)
    back = Q.state_from_codebooks(codebooks)
    for name in Q.QuantizerState._fields:
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), getattr(state, name))
    assert codebooks[0].inited[...].shape == (1,)
    with pytest.raises(ValueError, match="codebooks for a state"):
        Q.state_to_codebooks(state, codebooks[:1])


def test_eight_devices_match_one(tmp_path, record_property):
    """A subprocess with 8 simulated CPU devices: 3 steps with the global batch split over the
    devices (under `shard_map` with `axis_name`, and under `jit` over a mesh) equal 3 steps on
    one device with the same global batch: codes equal, codebooks within float tolerance (the
    sums add in another order). With dropout + reset expiry, and with faithful expiry."""
    out = tmp_path / "devices.json"
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), "dropout-reset", "faithful"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 8
    runs = result["runs"]
    for name, run in runs.items():
        assert run["codes_equal"] and run["n_q_equal"], name
        for field, rel in run["rel_errors"].items():
            assert rel <= RTOL, (name, field, rel)
    # what the runs must have exercised: codebooks initialised at later steps under dropout
    # (their k-means on the global batch), and codes reset from the global batch
    n_q = runs["dropout-reset"]["n_q"]
    assert n_q[0] < max(n_q) and sum(map(sum, runs["dropout-reset"]["dead"])) > 0, n_q
    assert runs["faithful"]["n_q"] == [N_Q] * 3
    measured = {name: max(run["rel_errors"].values()) for name, run in runs.items()}
    record_property("measured", measured)
    print(json.dumps(measured))
