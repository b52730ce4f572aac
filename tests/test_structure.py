"""The package's shape: no import cycles, every module importable first, runtime settings in
one place, and each layer's receptive field as the layer really computes it. No PyTorch needed."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import encodec_jax
from encodec_jax import ENCODEC_24KHZ, ENCODEC_32KHZ, RuntimeSettings
from encodec_jax.modules import EncodecDecoder, EncodecEncoder, ReceptiveField
from encodec_jax.testing import TINY_CONFIG, TINY_NONCAUSAL_CONFIG

PACKAGE = Path(encodec_jax.__file__).parent


def package_modules() -> list[str]:
    return sorted(
        "encodec_jax." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )


def imports_of(path: Path, module: str) -> set[str]:
    """The package modules `module` imports anywhere in its file (functions included), except
    under `if TYPE_CHECKING:`, which only type checkers run."""
    package = module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    type_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for child in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("encodec_jax"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("encodec_jax")]
        else:
            continue
        found.update(n for n in names if n in MODULES and n != module)
    return found


MODULES = package_modules()


def test_no_import_cycles():
    """Not even through imports inside functions: each module's imports form a DAG."""
    graph = {
        m: imports_of(PACKAGE.joinpath(*m.split(".")[1:]).with_suffix(".py"), m) for m in MODULES
    }
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == "done":
            return
        assert state.get(m) != "active", "import cycle: " + " -> ".join([*path, m])
        state[m] = "active"
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])
    assert "encodec_jax.model" not in graph["encodec_jax.checkpoint"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other module of the package, one after another in one
    fresh interpreter (the package's modules are dropped from sys.modules in between)."""
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {MODULES!r}:
            for loaded in [m for m in sys.modules if m.startswith("encodec_jax")]:
                del sys.modules[loaded]
            importlib.import_module(name)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_import_changes_no_jax_setting():
    code = (
        "import jax; before = dict(jax.config.values); import encodec_jax, encodec_jax.cli; "
        "changed = {k for k, v in jax.config.values.items() if before.get(k) != v}; "
        "print(sorted(changed))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---- runtime settings ----
def test_runtime_settings_are_one_frozen_place():
    model = encodec_jax.EncodecModel(TINY_CONFIG, rngs=nnx.Rngs(0))
    assert model.settings == RuntimeSettings()
    assert model.settings.matmul_precision == "highest"
    model.settings = model.settings.replace(tile_frames=None, compute_dtype="bfloat16")
    assert model.settings.tile_frames is None and model.settings.chunk_rows_per_call == 32
    with pytest.raises(AttributeError):
        model.settings.tile_frames = 3  # frozen
    hash(model.settings)  # static under jit


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"matmul_precision": "fast"}, "matmul_precision must be one of"),
        ({"compute_dtype": "int8"}, "compute_dtype must be one of"),
        ({"tile_frames": 0}, "tile_frames must be a positive integer or None, got 0"),
        ({"chunk_rows_per_call": True}, "chunk_rows_per_call must be a positive integer"),
    ],
)
def test_bad_runtime_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        RuntimeSettings(**changes)


# ---- receptive fields ----
def influence(apply, length: int, position: int, channels: int) -> np.ndarray:
    """Output steps of `apply` that change when input step `position` changes."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, length, channels)), jnp.float32)
    base = apply(x)
    moved = apply(x.at[0, position].add(1.0))
    changed = np.abs(np.asarray(moved - base)).max(axis=(0, 2)) > 0
    return np.flatnonzero(changed)


@pytest.mark.parametrize(
    "config", [TINY_CONFIG, TINY_NONCAUSAL_CONFIG], ids=["causal", "noncausal"]
)
def test_conv_stack_fields_match_what_the_layers_compute(config):
    """Perturb one input sample in the middle of a long signal: exactly the output steps whose
    window `[t * stride - left, t * stride + right]` holds it change (for the encoder's conv
    stack and the decoder's)."""
    encoder = EncodecEncoder(config, rngs=nnx.Rngs(0))
    field = encoder.convs_receptive_field
    length, position = 400, 201
    changed = influence(jax.jit(encoder.convs), length, position, config.audio_channels)
    stride = field.stride
    expected = [
        t
        for t in range(length // config.hop_length)
        if t * stride - field.left <= position <= t * stride + field.right
    ]
    assert changed.tolist() == expected

    decoder = EncodecDecoder(config, rngs=nnx.Rngs(0))
    field = decoder.convs_receptive_field
    frames, frame = 100, 50
    channels = config.num_filters * 2 ** len(config.upsampling_ratios)
    changed = influence(jax.jit(decoder.convs), frames, frame, channels)
    expected = [
        t
        for t in range(frames * config.hop_length)
        if t * field.stride - field.left <= frame <= t * field.stride + field.right
    ]
    assert changed.tolist() == expected


def test_fields_compose_and_match_the_published_models():
    a = ReceptiveField(Fraction(3), Fraction(1), Fraction(2))
    b = ReceptiveField(Fraction(2), Fraction(2), Fraction(4))
    assert a.then(b) == ReceptiveField(Fraction(7), Fraction(5), Fraction(8))
    assert a.union(ReceptiveField(Fraction(0), Fraction(4), Fraction(2))).right == 4
    # 24 kHz: causal, so no look-ahead beyond the current frame's own samples
    enc = nnx.eval_shape(lambda: EncodecEncoder(ENCODEC_24KHZ, rngs=nnx.Rngs(0)))
    enc = enc.convs_receptive_field
    assert (enc.left, enc.right, enc.stride) == (478, 319, 320)
    # 32 kHz: centred padding; the strided convs look ahead more than they look back
    enc32 = nnx.eval_shape(lambda: EncodecEncoder(ENCODEC_32KHZ, rngs=nnx.Rngs(0)))
    enc32 = enc32.convs_receptive_field
    assert enc32.stride == 640 and (enc32.left, enc32.right) == (482, 1105)
