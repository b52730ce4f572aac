"""audiocraft 1.3.0's training code, imported without audiocraft's heavy package imports.

`import audiocraft` pulls in its data pipeline, models, xformers and more. The training files
(`quantization/core_vq.py`, `losses/*.py`, `adversarial/*.py`, `optim/ema.py`,
`modules/conv.py`) need only torch, einops, flashy and torchaudio, so `audiocraft` and its
subpackages are registered here as empty packages whose `__init__` never runs, and the files
are imported one by one.

torchaudio's compiled extension does not load beside torch 2.13, but the parts audiocraft
uses (`transforms.Spectrogram`, `transforms.MelSpectrogram` and the functional code beneath
them) are plain Python over torch. `scripts/setup.sh` installs torchaudio's wheel into
`.venv/reference/torchaudio` (off `sys.path`, so transformers never sees a broken torchaudio);
it is imported from there with a stand-in for the extension loader, and it is torchaudio's own
code that computes the reference spectrograms.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

REFERENCE_DIR = Path(sys.prefix) / "reference"
_PACKAGES = ("", ".modules", ".quantization", ".losses", ".adversarial", ".optim")


def _empty_package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__package__ = name
    module.__spec__ = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]
    return module


@contextlib.contextmanager
def _torchaudio_in_sys_modules():
    """The reference torchaudio, importable as `torchaudio` while audiocraft's files load.

    Taken out of `sys.modules` again afterwards: the modules that imported it keep their
    reference, and transformers does not mistake it for an installed torchaudio.
    """
    root = REFERENCE_DIR / "torchaudio" / "torchaudio"
    if not root.is_dir():
        pytest.skip(f"torchaudio's reference source is not at {root} (run scripts/setup.sh)")
    saved = {
        k: v for k, v in sys.modules.items() if k == "torchaudio" or k.startswith("torchaudio.")
    }
    package = _empty_package("torchaudio", root)
    extension = types.ModuleType("torchaudio._extension")
    extension._IS_TORCHAUDIO_EXT_AVAILABLE = False  # the pure-Python paths only
    extension.fail_if_no_align = lambda fn: fn  # forced alignment: never called here
    sys.modules["torchaudio"] = package
    sys.modules["torchaudio._extension"] = extension
    try:
        package.functional = importlib.import_module("torchaudio.functional")
        package.transforms = importlib.import_module("torchaudio.transforms")
        yield package
    finally:
        for name in [k for k in sys.modules if k == "torchaudio" or k.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules.update(saved)


_CACHE: dict[str, types.ModuleType] = {}


def audiocraft(module: str) -> types.ModuleType:
    """Import `audiocraft.<module>` (e.g. "quantization.core_vq", "losses.balancer")."""
    if module in _CACHE:
        return _CACHE[module]
    pytest.importorskip("torch")
    pytest.importorskip("flashy")
    spec = importlib.util.find_spec("audiocraft")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("audiocraft 1.3.0 is not installed (scripts/setup.sh installs it)")
    root = Path(spec.submodule_search_locations[0])
    if "audiocraft" not in sys.modules or hasattr(sys.modules["audiocraft"], "__version__"):
        for suffix in _PACKAGES:
            name = "audiocraft" + suffix
            sys.modules[name] = _empty_package(name, root / suffix.lstrip(".").replace(".", "/"))
        # What `audiocraft.modules`' own __init__ would re-export for the training files.
        conv = importlib.import_module("audiocraft.modules.conv")
        modules = sys.modules["audiocraft.modules"]
        for name in ("NormConv1d", "NormConv2d", "pad_for_conv1d", "StreamableConv1d"):
            setattr(modules, name, getattr(conv, name))
    with _torchaudio_in_sys_modules():
        _CACHE[module] = importlib.import_module(f"audiocraft.{module}")
    return _CACHE[module]


def torchaudio_transforms() -> types.ModuleType:
    """torchaudio's `transforms` (Spectrogram, MelSpectrogram) from the reference source."""
    if "torchaudio.transforms" not in _CACHE:
        pytest.importorskip("torch")
        with _torchaudio_in_sys_modules() as package:
            _CACHE["torchaudio.transforms"] = package.transforms
            _CACHE["torchaudio.functional"] = package.functional
    return _CACHE["torchaudio.transforms"]


def torchaudio_functional() -> types.ModuleType:
    """torchaudio's `functional` (melscale_fbanks, spectrogram) from the reference source."""
    torchaudio_transforms()
    return _CACHE["torchaudio.functional"]
