"""The notebooks run top to bottom against a small local checkpoint (the Hub id stays their
default for real use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encodec_jax import EncodecConfig, EncodecModel

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small 24 kHz model, its weights drawn with NumPy (quick to build and compile)."""
    from flax import nnx

    config = EncodecConfig(num_filters=4, hidden_size=8, codebook_size=16)
    abstract = nnx.eval_shape(lambda: EncodecModel(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state = {
        ".".join(map(str, path)): (0.3 * rng.standard_normal(var.shape)).astype(np.float32)
        for path, var in nnx.to_flat_state(nnx.state(abstract))
    }
    directory = tmp_path_factory.mktemp("tiny")
    EncodecModel.from_state_dict(config, state).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", ["quickstart.ipynb", "tokenize_dataset.ipynb", "finetune.ipynb"])
def test_notebook_runs(name, tiny_checkpoint, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ENCODEC_JAX_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("ENCODEC_JAX_FINETUNE_STEPS", "20")  # a short run in the tests
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
