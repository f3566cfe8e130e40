"""The `freemark` command: one module per command group (`app` builds the parser and runs it).

Importing this package imports nothing else: `main` loads the command when it is called.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `freemark` command (the console script's entry point)."""
    from freemark.cli.app import main as run
    from freemark.rpc import recycle_chunk_memory

    recycle_chunk_memory()  # uploads' chunk copies reuse heap buffers (issue 20)
    return run(argv)
