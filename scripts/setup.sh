#!/usr/bin/env bash
# Create .venv and install encodec-jax with its test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB
# CUDA build, and only the reference models in the tests need it.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The original encodec package is a test reference; --no-deps keeps it from pulling torchaudio,
# which does not load beside torch 2.13 (the tests stub it).
python -m pip install -q --no-deps encodec==0.1.1
# audiocraft 1.3.0 is the training reference; only its training files are imported (see
# tests/audiocraft_reference.py), so none of its heavy dependencies are installed.
python -m pip install -q --no-deps audiocraft==1.3.0
# torchaudio's Python code (Spectrogram, MelSpectrogram) serves audiocraft's losses; its compiled
# extension does not load beside torch 2.13, so it goes off sys.path, where the tests load it.
python -m pip install -q --no-deps --upgrade --target .venv/reference/torchaudio torchaudio==2.11.0
