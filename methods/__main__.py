"""``python -m methods --list``: the registered attribution methods."""

from __future__ import annotations

import argparse
import sys

from methods.registry import REGISTRY


def main(argv: list[str] | None = None) -> int:
    """Print each registered method with its label, variant and summary; return exit code 0."""
    parser = argparse.ArgumentParser(prog="python -m methods", description=__doc__)
    parser.add_argument("--list", action="store_true", help="list registered methods (default)")
    parser.parse_args(argv)
    entries = REGISTRY.entries()
    width = max(len(name) for name in entries)
    label_width = max(len(entry.display_name) for entry in entries.values()) + 2
    for name, entry in entries.items():
        variant = ", ".join(f"{k}={v!r}" for k, v in entry.defaults.items())
        extra = f" [{variant}]" if variant else ""
        label = f'"{entry.display_name}"'
        print(f"{name:<{width}}  {label:<{label_width}}  {entry.summary}{extra}  ({entry.origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
