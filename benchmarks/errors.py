"""The runners' user-facing error type.

Kept in a module of its own so that every benchmarks module, ``benchmarks.settings`` included,
can raise it without importing the CLI plumbing.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input (a bad flag, an unknown name, a bad value), found before any work.

    The command-line entry points print its message as one line and exit with status 2;
    every other exception is a bug and keeps its traceback (``benchmarks.cli.usage_errors``).
    """
