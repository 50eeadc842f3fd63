"""Command line: `python -m llave_kit <command>` (or the `llave-kit` console script).

    python -m llave_kit run-pipeline pipelines/cpu_demo.yaml [--force]
"""
from __future__ import annotations

import argparse
import sys


def _run_pipeline(args: argparse.Namespace) -> int:
    from llave_kit.pipeline import PipelineError, load_pipeline, run_pipeline

    try:
        outcomes = run_pipeline(load_pipeline(args.pipeline, root=args.root), force=args.force)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(outcome.succeeded for outcome in outcomes) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llave-kit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pipeline = commands.add_parser("run-pipeline", help="execute a YAML pipeline of notebooks")
    pipeline.add_argument("pipeline", help="pipeline file, e.g. pipelines/cpu_demo.yaml")
    pipeline.add_argument("--force", action="store_true", help="re-run runs that are up to date")
    pipeline.add_argument("--root", default=".", help="folder holding notebooks/, runs/, figures/")
    pipeline.set_defaults(handler=_run_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
