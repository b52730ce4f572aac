"""Child process for tests/test_batching.py: runs BatchCodec where the parent process cannot (8
simulated CPU devices, one process of a `jax.distributed` job, a fresh persistent compilation
cache) and writes what it got to a file for the parent to check.

    python tests/batching_worker.py shard MODEL_DIR OUT.npz
    python tests/batching_worker.py distributed MODEL_DIR OUT.npz PORT PROCESS_ID
    python tests/batching_worker.py cache MODEL_DIR OUT.json
    python tests/batching_worker.py config OUT.json

The environment (XLA_FLAGS, JAX_PLATFORMS, ENCODEC_JAX_COMPILATION_CACHE, ...) is set by the
parent before this starts, so that it is in place before jax is imported. Only numpy is imported
at module level: the test file imports `make_items` and `TINY_CONFIG` from here.
"""

from __future__ import annotations

import json
import sys

import numpy as np

# A tiny model like the published non-causal ones (stereo and normalised as at 48 kHz; unchunked,
# so that a bucket compiles one encoder program), with padding that changes its codes: the
# sharded and distributed runs must reproduce those changes too. 8 kHz, hop 8: 1000 frames/s.
TINY_CONFIG = dict(
    sampling_rate=8_000,
    audio_channels=2,
    normalize=True,
    use_causal_conv=False,
    upsampling_ratios=(4, 2),
    num_filters=4,
    hidden_size=8,
    num_lstm_layers=1,
    codebook_size=16,
    # 1000 frames/s x 4 bits = 4 kbps per codebook: 2 and 4 codebooks
    target_bandwidths=(8.0, 16.0),
)
TINY_BANDWIDTH = 16.0

# Ten items of two lengths: 700 samples, and 8 000, the smallest default bucket, so that the
# exact and the bucketed runs share that program. In bucketed mode all ten make a full batch of 8
# and a batch of 2 (+ 6 rows of padding); the 700-sample items are padded to 8 000.
SHARED_LENGTHS = (700, 8_000, 700, 8_000, 8_000, 700, 700, 8_000, 700, 8_000)
SHARED_SEED = 1234


def make_items(lengths, seed: int, channels: int = 2) -> list[np.ndarray]:
    """`[channels, n]` float32 items: sines plus noise, different content for every item."""
    rng = np.random.default_rng(seed)
    items = []
    for n in lengths:
        t = np.arange(n)[None, :]
        freqs = rng.uniform(0.002, 0.2, size=(channels, 1))
        noise = rng.normal(0.0, 0.05, size=(channels, n))
        items.append((0.4 * np.sin(2 * np.pi * freqs * t) + noise).astype(np.float32))
    return items


def flatten(encoded, indices) -> dict[str, np.ndarray]:
    """EncodedItems as npz arrays, keyed by the item's index in the shared list."""
    arrays = {}
    for i, item in zip(indices, encoded, strict=True):
        arrays[f"codes_{i}"] = item.audio_codes
        arrays[f"frames_{i}"] = np.asarray(item.chunk_frames)
        arrays[f"samples_{i}"] = np.asarray(item.num_samples)
        if item.audio_scales is not None:
            arrays[f"scales_{i}"] = item.audio_scales
    return arrays


def _shard(model_dir: str, out: str) -> None:
    import jax

    from encodec_jax import EncodecModel
    from encodec_jax.batching import BatchCodec

    model = EncodecModel.from_pretrained(model_dir)
    items = make_items(SHARED_LENGTHS, SHARED_SEED)

    # Record how the batches reach the model: the input's sharding and the codes' placement.
    seen: list[dict] = []
    original = EncodecModel.encode

    def spy(self, input_values, padding_mask=None, bandwidth=None):
        out = original(self, input_values, padding_mask, bandwidth)
        seen.append(
            dict(
                input_shape=list(input_values.shape),
                input_devices=len(input_values.sharding.device_set),
                input_shards=sorted({tuple(s.data.shape) for s in input_values.addressable_shards}),
                input_replicated=bool(input_values.sharding.is_fully_replicated),
                codes_devices=len(out.audio_codes.sharding.device_set),
                codes_replicated=bool(out.audio_codes.sharding.is_fully_replicated),
            )
        )
        return out

    EncodecModel.encode = spy
    arrays = {}
    info = dict(devices=len(jax.devices()), local_devices=len(jax.local_devices()), runs={})
    for exact in (False, True):
        codec = BatchCodec(model, bandwidth=TINY_BANDWIDTH, batch_size=8, exact=exact)
        seen.clear()
        encoded = codec.encode(items)
        info["runs"][str(exact)] = dict(mesh_size=int(codec.mesh.devices.size), calls=list(seen))
        for key, value in flatten(encoded, range(len(items))).items():
            arrays[f"exact{int(exact)}_{key}"] = value
    np.savez(out, info=json.dumps(info), **arrays)


def _distributed(model_dir: str, out: str, port: str, process_id: str) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
        initialization_timeout=60,
    )
    from encodec_jax import EncodecModel
    from encodec_jax.batching import BatchCodec, process_share

    model = EncodecModel.from_pretrained(model_dir)
    items = make_items(SHARED_LENGTHS, SHARED_SEED)
    share = process_share(len(items))
    codec = BatchCodec(model, bandwidth=TINY_BANDWIDTH, batch_size=8)
    encoded = codec.encode([items[i] for i in share])
    info = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        global_devices=len(jax.devices()),
        mesh_size=int(codec.mesh.devices.size),
        share=share,
    )
    np.savez(out, info=json.dumps(info), **flatten(encoded, share))
    jax.distributed.shutdown()


def _cache(model_dir: str, out: str) -> None:
    import jax
    from jax import monitoring

    counts = {"cache_hits": 0, "cache_misses": 0, "compiles": 0}

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            counts["cache_hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            counts["cache_misses"] += 1

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1

    monitoring.register_event_listener(on_event)
    monitoring.register_event_duration_secs_listener(on_duration)

    import encodec_jax

    encodec_jax.enable_compilation_cache()  # as the README tells library users
    from encodec_jax import EncodecModel
    from encodec_jax.batching import BatchCodec

    model = EncodecModel.from_pretrained(model_dir)
    codec = BatchCodec(model, bandwidth=TINY_BANDWIDTH, batch_size=2, exact=True)
    encoded = codec.encode(make_items((700, 700), SHARED_SEED))
    counts["cache_dir"] = jax.config.jax_compilation_cache_dir
    counts["codes"] = [e.audio_codes.tolist() for e in encoded]
    with open(out, "w") as f:
        json.dump(counts, f)


def _config(out: str) -> None:
    import jax

    import encodec_jax

    imported = jax.config.jax_compilation_cache_dir
    encodec_jax.enable_compilation_cache()  # reads ENCODEC_JAX_COMPILATION_CACHE
    with open(out, "w") as f:
        json.dump(dict(cache_dir=jax.config.jax_compilation_cache_dir, imported=imported), f)


def main(argv: list[str]) -> None:
    mode, *args = argv
    {"shard": _shard, "distributed": _distributed, "cache": _cache, "config": _config}[mode](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
