"""Child process for tests/test_tokenize_sources.py: one process of a two-process
`jax.distributed` job running the `encodec-jax` command lines given, one after the other.

    python tests/tokenize_worker.py PORT PROCESS_ID '[["tokenize", SOURCE, "-o", OUT, ...], ...]'

The environment (JAX_PLATFORMS, ...) is set by the parent before this starts. The worker fails
if any run fails for another reason than some items failing (exit status 3).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    port, process_id, runs = argv
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
        initialization_timeout=60,
    )
    from encodec_jax.cli import main as cli

    statuses = [cli(args) for args in json.loads(runs)]
    print(f"exit statuses {statuses}", flush=True)
    jax.distributed.shutdown()
    sys.exit(0 if all(s in (0, 3) for s in statuses) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
