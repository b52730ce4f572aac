"""Train or fine-tune EnCodec: the loop around `step.train_step`.

`Trainer(config, out_dir).run()` (or `encodec-jax train`) does, in `out_dir`:
- `config.yaml`: the run's settings. A run started again with the same settings (the number of
  steps may grow) resumes from its last checkpoint; other settings are refused.
- `checkpoints/<step>/`: the whole training state (orbax-checkpoint's `CheckpointManager`:
  asynchronous, written under a temporary name and renamed when complete, the newest `keep`
  kept). Batches are a pure function of the seed and the step (`data.py`) and the PRNG key is
  part of the state, so a resumed run computes exactly what an uninterrupted one does.
- `metrics.jsonl` and `tensorboard/`: every loss and metric, averaged over `log_every` steps,
  and the validation metrics.
- `export/`: the EMA weights (or the current ones without EMA) as a checkpoint directory that
  `EncodecModel.from_pretrained` and `encodec-jax convert --to transformers` take; written at
  every checkpoint and at the end.

Data parallel over every device of every process (a 1-D `Mesh`; under `jax.distributed` each
process reads its own slice of each global batch). A NaN or Inf loss stops the run before
anything of that step is saved, with a message naming the loss and the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import functional, metrics
from ..atomic import atomic_directory, atomic_write
from ..config import RuntimeSettings
from ..model import EncodecModel
from . import data as data_module
from . import step as step_module
from .config import TrainConfig, TrainConfigError
from .quantizer import init_state, state_to_codebooks

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
# Shown in the progress bar when the run logs them.
_BAR_METRICS = ("l1", "msspec", "adv", "feat", "d_loss", "penalty")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


@dataclasses.dataclass
class TrainResult:
    """What a run did: the last step, where the exported weights are, the last logged metrics."""

    step: int
    export_dir: str
    metrics: dict[str, float]
    seconds: float


class Trainer:
    """One training run (see the module docstring).

    Everything that can be checked is checked here, before anything is written: the options,
    the data folders, the output directory.

    Args:
        config: the run's settings.
        out_dir: where the run writes (made if missing).
        progress: show a progress bar on stderr.
        devices: the devices to train on (default: all of them).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        progress: bool = True,
        devices: list | None = None,
    ):
        _check_training_dependencies()
        if config.data.train is None:
            raise TrainConfigError("no training data: give a folder of audio (--data)")
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.devices = devices if devices is not None else jax.devices()
        if config.data.batch_size % len(self.devices):
            raise TrainConfigError(
                f"the batch size ({config.data.batch_size}) must be a multiple of the number of "
                f"devices ({len(self.devices)})"
            )
        if self.out.exists() and not self.out.is_dir():
            raise TrainConfigError(f"output {self.out} exists and is not a folder")
        self._check_resumable()
        self.train_folder = data_module.AudioFolder.scan(config.data.train)
        self.valid_folder = (
            data_module.AudioFolder.scan(config.data.valid) if config.data.valid else None
        )
        self.model = self._initial_model()

    # ---- setup ----
    def _check_resumable(self) -> None:
        path = self.out / CONFIG_NAME
        if not path.exists():
            if self.out.exists() and any(self.out.iterdir()):
                raise TrainConfigError(
                    f"output folder {self.out} is not empty and holds no training run; use a "
                    "new or empty folder"
                )
            return
        old = TrainConfig.from_yaml_file(path).to_dict()
        new = self.config.to_dict()
        old["run"]["steps"] = new["run"]["steps"]  # a finished run may be extended
        changed = sorted(_differences(old, new))
        if changed:
            raise TrainConfigError(
                f"{self.out} holds a run with other settings (differs in: {', '.join(changed)}); "
                "use a new output folder"
            )

    def _initial_model(self) -> EncodecModel:
        config = self.config
        if config.init is not None:
            model = EncodecModel.from_pretrained(config.init)
            if config.n_q is not None and config.n_q > model.config.num_quantizers:
                raise TrainConfigError(
                    f"n_q ({config.n_q}) exceeds the {model.config.num_quantizers} codebooks "
                    f"of {config.init}"
                )
            return model
        model = EncodecModel(config.model, rngs=nnx.Rngs(config.run.seed))
        # From scratch the codebooks start as audiocraft's do: empty, filled by k-means on the
        # first batch (or drawn at random without k-means).
        step_parts_n_q = config.n_q or config.model.num_quantizers
        q = step_module.QuantizerConfig.for_model(
            config.model, n_q=step_parts_n_q, kmeans_init=config.quantizer.kmeans_init
        )
        state = init_state(q, jax.random.key(config.run.seed + 1))
        state_to_codebooks(state, step_module.codebooks(model, step_parts_n_q))
        return model

    # ---- the run ----
    def run(self) -> TrainResult:
        import orbax.checkpoint as ocp

        start_time = time.perf_counter()
        config = self.config
        primary = jax.process_index() == 0
        if primary:
            self.out.mkdir(parents=True, exist_ok=True)
            config.to_yaml_file(self.out / CONFIG_NAME)
        model = self.model
        mesh = Mesh(np.array(self.devices), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        parts, state = step_module.build(config, model, jax.random.key(config.run.seed))
        state = jax.device_put(state, replicated)

        manager = ocp.CheckpointManager(
            (self.out / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.run.keep, enable_async_checkpointing=True, create=True
            ),
        )
        first = 0
        latest = manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            first = int(state.step)
        logger = _MetricsLog(self.out, first, enabled=primary)

        source = data_module.SegmentSource(
            self.train_folder,
            model.config.sampling_rate,
            model.config.audio_channels,
            config.data.segment,
            config.run.seed,
        )
        batches = data_module.train_batches(
            source,
            global_batch=config.data.batch_size,
            first_step=first,
            steps=config.run.steps,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=config.data.workers,
        )
        validator = self._validator(parts, model, replicated)
        step_fn = step_module.make_step(parts)
        bar = _progress_bar(config.run.steps, first, self.progress and primary)
        window: list[dict[str, float]] = []
        last = dict[str, float]()
        audio_per_step = config.data.batch_size * config.data.segment
        tick = time.perf_counter()
        try:
            for step in range(first, config.run.steps):
                local = next(batches)
                batch = jax.make_array_from_process_local_data(batch_sharding, local)
                state, step_metrics = step_fn(state, batch, step)
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                _check_finite(values, step + 1, manager.latest_step())
                window.append(values)
                done = step + 1
                if done % config.run.log_every == 0 or done == config.run.steps:
                    now = time.perf_counter()
                    # A key may be missing from some steps (d_loss where the discriminator rests).
                    names = dict.fromkeys(k for w in window for k in w)
                    last = {k: float(np.mean([w[k] for w in window if k in w])) for k in names}
                    rate = len(window) / max(now - tick, 1e-9)
                    last["steps_per_second"] = rate
                    last["audio_seconds_per_second"] = rate * audio_per_step
                    logger.write(done, "train", last)
                    if bar is not None:
                        bar.set_postfix_str(_bar_text(last))
                    window, tick = [], now
                if validator is not None and (
                    done % config.run.valid_every == 0 or done == config.run.steps
                ):
                    logger.write(done, "valid", validator(state))
                if done % config.run.checkpoint_every == 0 or done == config.run.steps:
                    manager.save(done, args=ocp.args.StandardSave(state))
                    self._export(parts, state, primary)
                if bar is not None:
                    bar.update(1)
        finally:
            manager.wait_until_finished()
            manager.close()
            logger.close()
            if bar is not None:
                bar.close()
        return TrainResult(
            step=int(state.step),
            export_dir=str(self.out / "export"),
            metrics=last,
            seconds=time.perf_counter() - start_time,
        )

    # ---- validation and export ----
    def _validator(self, parts, model, replicated) -> Callable[[Any], dict] | None:
        if self.valid_folder is None:
            return None
        config = self.config
        source = data_module.SegmentSource(
            self.valid_folder,
            model.config.sampling_rate,
            model.config.audio_channels,
            config.data.segment,
            config.run.seed,
        )
        batches = data_module.valid_batches(
            source, config.data.valid_segments, config.data.batch_size
        )
        sample_rate = model.config.sampling_rate
        bandwidths = [
            (bw, model.config.num_quantizers_for_bandwidth(bw))
            for bw in model.config.target_bandwidths
            if model.config.num_quantizers_for_bandwidth(bw) <= parts.quantizer.n_q
        ] or [(None, parts.quantizer.n_q)]

        @jax.jit
        def reconstruct(params, buffers, audio):
            m = parts.model(params, buffers)
            out = {}
            for bw, n_q in bandwidths:
                codes, scale = functional.encode(m, audio, n_q)
                y = functional.decode(m, codes, scale)[..., : audio.shape[-1]]
                out[bw] = (
                    codes,
                    metrics.si_snr(y, audio),
                    metrics.mel_distance(y, audio, sample_rate),
                    metrics.l1(y, audio),
                )
            return out

        bins = model.config.codebook_size
        threshold = config.quantizer.threshold_ema_dead_code

        def validate(state) -> dict[str, float]:
            params, buffers = _weights(state)
            per_bw: dict[Any, list] = {bw: [] for bw, _ in bandwidths}
            for audio in batches:
                for bw, result in reconstruct(params, buffers, jnp.asarray(audio)).items():
                    per_bw[bw].append(jax.device_get(result))
            out: dict[str, float] = {}
            for bw, results in per_bw.items():
                tag = "" if bw is None else f"@{bw:g}kbps"
                for i, name in enumerate(("si_snr", "mel_distance", "l1"), start=1):
                    out[name + tag] = float(np.mean(np.concatenate([r[i] for r in results])))
            # codebook usage at the largest bandwidth, on the validation segments
            codes = jnp.concatenate([jnp.asarray(r[0]) for r in per_bw[bandwidths[-1][0]]])
            counts = metrics.code_counts(codes, bins)
            for i, p in enumerate(np.asarray(metrics.perplexity(counts))):
                out[f"perplexity/q{i}"] = float(p)
            model_state = parts.model(params, buffers)
            for i, codebook in enumerate(step_module.codebooks(model_state, parts.quantizer.n_q)):
                out[f"dead_codes/q{i}"] = float(jnp.sum(codebook.cluster_size[...] < threshold))
            return out

        return validate

    def _export(self, parts, state, primary: bool) -> None:
        if not primary:
            return
        params, buffers = _weights(state)
        model = parts.model(jax.device_get(params), jax.device_get(buffers))
        model.settings = RuntimeSettings()
        atomic_directory(self.out / "export", model.save_pretrained, force=True)


def train(config: TrainConfig, out_dir: str | os.PathLike, **kwargs) -> TrainResult:
    """`Trainer(config, out_dir, **kwargs).run()`."""
    return Trainer(config, out_dir, **kwargs).run()


# ---- helpers ----
def _check_training_dependencies() -> None:
    import importlib.util

    missing = [
        package
        for module, package in (
            ("orbax.checkpoint", "orbax-checkpoint"),
            ("grain", "grain"),
            ("tensorboardX", "tensorboardX"),
        )
        if importlib.util.find_spec(module.split(".")[0]) is None
    ]
    if missing:
        raise TrainConfigError(
            f"training needs {', '.join(missing)}: pip install 'encodec-jax[train]'"
        )


def _weights(state) -> tuple[Any, Any]:
    """The weights to validate and export: the EMA's when the run keeps one."""
    if isinstance(state.ema, tuple) and not state.ema:
        return state.params, state.buffers
    return state.ema.params


def _check_finite(values: dict[str, float], step: int, last_checkpoint: int | None) -> None:
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        kept = (
            f"the last checkpoint (step {last_checkpoint}) is intact"
            if last_checkpoint is not None
            else "no checkpoint was written yet"
        )
        shown = ", ".join(f"{k} = {values[k]}" for k in bad)
        raise TrainingError(f"step {step}: {shown}; training stopped, {kept}")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]


def _bar_text(values: dict[str, float]) -> str:
    parts = [f"{values['steps_per_second']:.2f} steps/s"]
    parts.append(f"{values['audio_seconds_per_second']:.1f} audio s/s")
    parts += [f"{k} {values[k]:.4g}" for k in _BAR_METRICS if k in values]
    return ", ".join(parts)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", file=sys.stderr)


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl line, or None for a line a kill cut short (appends are not
    atomic: a run killed mid-write leaves a partial last line, dropped on resume)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class _MetricsLog:
    """metrics.jsonl and TensorBoard event files. On resume, records past the restored step
    (written after the last checkpoint by the interrupted run) are dropped from both."""

    def __init__(self, out: Path, first_step: int, enabled: bool):
        self.enabled = enabled
        self.path = out / METRICS_NAME
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text(errors="replace").splitlines()
                if (step := _logged_step(line)) is not None and step <= first_step
            ]
            with atomic_write(self.path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_step + 1)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
