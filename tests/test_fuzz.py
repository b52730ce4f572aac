"""Every file reader, fuzzed with damaged and hostile files (the harness: `fuzz_readers.py`).

All readers run in one child process, one after the other, each under its own address-space
limit (`RLIMIT_AS`): its baseline after imports and one valid read, plus
`fuzz_readers.MEMORY_MARGIN` (256 MiB) plus `MEMORY_PER_FILE_BYTE` (64) times the largest file.
The default run tries `DEFAULT_EXAMPLES` cases per reader; `-m slow` tries `SLOW_EXAMPLES`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .fuzz_readers import READERS

DEFAULT_EXAMPLES = 120
SLOW_EXAMPLES = 3000
ROOT = Path(__file__).resolve().parent.parent


def run_fuzz(examples: int, timeout: float) -> dict[str, dict]:
    """{reader: result} from one child running every available reader."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_readers", "--examples", str(examples)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("FUZZ-RESULT "):
            result = json.loads(line[len("FUZZ-RESULT ") :])
            results[result["reader"]] = result
    started = [
        line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FUZZ-START")
    ]
    if started and started[-1] not in results:
        # The child died inside a reader (a crash in native code, a kill for memory).
        results[started[-1]] = {
            "ok": False,
            "failure": f"the child exited with {proc.returncode}: {proc.stderr[-3000:]}",
        }
    return results


@pytest.fixture(scope="module")
def default_run():
    return run_fuzz(DEFAULT_EXAMPLES, timeout=600)


@pytest.fixture(scope="module")
def slow_run():
    return run_fuzz(SLOW_EXAMPLES, timeout=3600)


def check(results: dict[str, dict], name: str, examples: int) -> None:
    reader = READERS[name]
    if not reader.available():
        pytest.skip(f"{name} needs {', '.join(reader.needs)}")
    assert name in results, f"{name} was not run (the child stopped before it)"
    result = results[name]
    assert result["ok"], result["failure"]
    assert result["cases"] >= examples
    assert result["read"] >= 1, "no mutated file read: the mutations never leave a valid file"
    assert sum(result["refused"].values()) >= 1, "no damaged file refused: the mutations do nothing"
    print(json.dumps(result))


@pytest.mark.parametrize("name", sorted(READERS))
def test_reader_refuses_damaged_files_cleanly(default_run, name):
    check(default_run, name, DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(READERS))
def test_reader_refuses_damaged_files_cleanly_long(slow_run, name):
    check(slow_run, name, SLOW_EXAMPLES)
