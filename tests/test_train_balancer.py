"""The loss balancer (`encodec_jax.train.balancer`) against audiocraft 1.3.0's `Balancer`.

Both sides get the same losses of the same random `y_pred` (three losses of different scales:
L1 and L2 to a target, and a hinge), new values every step so that the norm averages move; the
reference is driven with `torch.autograd` as audiocraft's solver drives it. After each of 4
steps: the combined gradient, the effective loss, the ratio metrics and the averager's running
sums. float32 on our side; the reference's norm averages are Python doubles.
"""

from __future__ import annotations

import inspect
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encodec_jax.train import balancer as B

from .audiocraft_reference import audiocraft

torch = pytest.importorskip("torch")

WEIGHTS = {"l1": 0.1, "l2": 2.0, "hinge": 4.0}
STEPS = 4
SHAPE = (4, 1, 50)  # [B, C, T] like a batch of audio
# Of each array's peak. Measured up to ~2e-7 (the float32 vs float64 norm averages).
RTOL = 1e-6


def jax_losses(target):
    def losses(y):
        return {
            "l1": jnp.mean(jnp.abs(y - target)),
            "l2": jnp.mean(jnp.square(y - target)),
            "hinge": jnp.mean(jax.nn.relu(1 - y)),
        }

    return losses


def torch_losses(y, target):
    return {
        "l1": torch.nn.functional.l1_loss(y, target),
        "l2": torch.nn.functional.mse_loss(y, target),
        "hinge": torch.relu(1 - y).mean(),
    }


def data(step: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    y = rng.standard_normal(shape) * (1 + step)
    target = rng.standard_normal(shape) * 0.5
    return y.astype(np.float32), target.astype(np.float32)


def averager_sums(balancer) -> tuple[dict, dict]:
    """flashy's averager keeps its running sums in its closure."""
    nonlocals = inspect.getclosurevars(balancer.averager).nonlocals
    return dict(nonlocals["total"]), dict(nonlocals["fix"])


def assert_close(name, got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want))
    assert err <= rtol * np.max(np.abs(want)), f"{name}: {err:.3g} of peak {np.max(np.abs(want))}"
    return err / np.max(np.abs(want))


@pytest.mark.parametrize("balance_grads", [True, False], ids=["balanced", "weighted-sum"])
@pytest.mark.parametrize("per_batch_item", [True, False], ids=["per-item", "whole"])
def test_matches_audiocraft(torch_single_thread, balance_grads, per_batch_item):
    reference = audiocraft("losses.balancer").Balancer(
        WEIGHTS, balance_grads=balance_grads, per_batch_item=per_batch_item, monitor=True
    )
    config = B.BalancerConfig(WEIGHTS, balance_grads=balance_grads, per_batch_item=per_batch_item)
    state = B.init_balancer(config)

    @jax.jit
    def step(state, y, target):
        return B.balance(config, state, jax_losses(target), y)

    worst = 0.0
    for i in range(STEPS):
        y, target = data(i)
        yt = torch.from_numpy(y).requires_grad_()
        losses = torch_losses(yt, torch.from_numpy(target))
        effective = reference.backward(losses, yt)
        out = step(state, jnp.asarray(y), jnp.asarray(target))
        state = out.state
        worst = max(worst, assert_close("grad", out.grad, yt.grad.numpy()))
        assert_close("effective loss", out.effective_loss, effective.item())
        for name, loss in losses.items():
            assert_close(name, out.losses[name], loss.item())
        for name, value in reference.metrics.items():
            assert_close(name, out.metrics[name], value)
        assert set(out.metrics) == set(reference.metrics)
        total, fix = averager_sums(reference)
        for name in WEIGHTS:
            assert_close(f"total {name}", state.total[name], total[name])
            assert_close(f"fix {name}", state.fix[name], fix[name])
    if balance_grads:
        # the balanced gradient's norm is total_norm per item, split as the weights say
        grad = np.asarray(out.grad, np.float64)
        if per_batch_item:
            norm = np.mean(np.sqrt(np.sum(grad**2, axis=tuple(range(1, grad.ndim)))))
        else:
            norm = np.sqrt(np.sum(grad**2))
        assert 0.5 < norm < 2.0
    print(f"grad: max error {worst:.2e} of the peak")


def test_entry_points_agree():
    """`balance` (one vjp per loss, with aux) = `balance_gradients` on `jax.grad`s."""
    config = B.BalancerConfig(WEIGHTS)
    y, target = map(jnp.asarray, data(0))
    fn = jax_losses(target)

    @jax.jit
    def both(state, y):
        out = B.balance(config, state, lambda y: (fn(y), {"peak": jnp.max(y)}), y, has_aux=True)
        grads = {name: jax.grad(lambda y, n=name: fn(y)[n])(y) for name in WEIGHTS}
        plain = B.balance_gradients(config, state, grads, fn(y))
        return out, plain

    out, (grad, effective, state, metrics) = both(B.init_balancer(config), y)
    np.testing.assert_array_equal(np.asarray(out.grad), np.asarray(grad))
    assert float(out.effective_loss) == float(effective)
    assert float(out.aux["peak"]) == float(jnp.max(y))
    with pytest.raises(ValueError, match="weight each"):
        B.balance_gradients(config, state, {"other": grad}, {"other": effective})


def test_data_parallel_matches_distributed_audiocraft(torch_single_thread, monkeypatch):
    """4 workers with 2 items each: `axis_name` under `vmap` against 4 audiocraft Balancers in 4
    threads whose `flashy.distrib.average_metrics` all-reduces as torch.distributed would."""
    import flashy

    workers, local = 4, 2
    barrier = threading.Barrier(workers)
    slots: list = [None] * workers
    index = threading.local()

    def average_metrics(metrics, count=1.0):
        # flashy's: [values..., 1] * count in float32, summed over the workers, divided
        keys = list(metrics)
        slots[index.value] = torch.tensor([*metrics.values(), 1], dtype=torch.float32) * count
        barrier.wait()
        summed = sum(slots)
        barrier.wait()
        return dict(zip(keys, (summed[:-1] / summed[-1]).tolist(), strict=True))

    monkeypatch.setattr(flashy.distrib, "average_metrics", average_metrics)
    balancer = audiocraft("losses.balancer")
    references = [balancer.Balancer(WEIGHTS, monitor=True) for _ in range(workers)]
    shape = (workers * local, *SHAPE[1:])
    results: dict = {}

    def run(worker):
        index.value = worker
        for i in range(STEPS):
            y, target = data(i, shape)
            part = slice(worker * local, (worker + 1) * local)
            yt = torch.from_numpy(y[part]).requires_grad_()
            effective = references[worker].backward(
                torch_losses(yt, torch.from_numpy(target[part])), yt
            )
            results[worker, i] = (yt.grad.numpy(), effective.item(), references[worker].metrics)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == workers * STEPS

    config = B.BalancerConfig(WEIGHTS)

    @jax.jit
    def step(state, y, target):
        def worker(y, target):
            return B.balance(config, state, jax_losses(target), y, axis_name="w")

        return jax.vmap(worker, axis_name="w")(y, target)

    state = B.init_balancer(config)
    for i in range(STEPS):
        y, target = data(i, shape)
        split = (workers, local, *SHAPE[1:])
        out = step(state, jnp.asarray(y).reshape(split), jnp.asarray(target).reshape(split))
        for name in WEIGHTS:  # the same on every worker
            assert np.all(np.asarray(out.state.total[name]) == out.state.total[name][0])
        state = jax.tree.map(lambda a: a[0], out.state)
        for w in range(workers):
            grad, effective, metrics = results[w, i]
            assert_close(f"grad {w}", out.grad[w], grad)
            assert_close(f"effective {w}", out.effective_loss[w], effective)
            for name, value in metrics.items():
                assert_close(name, out.metrics[name][w], value)
    # the reference's local averages differ by worker; their average is our (shared) one
    sums = [averager_sums(r)[0] for r in references]
    for name in WEIGHTS:
        assert_close(f"total {name}", state.total[name], np.mean([s[name] for s in sums]))
