"""Command line: `python -m llave_kit <command>` (or the `llave-kit` console script).

    python -m llave_kit run-pipeline pipelines/cpu_demo.yaml [--force] [--set steps=50 ...]
    python -m llave_kit describe-mmeb data/mmeb      # write manifest.json for an MMEB folder
    python -m llave_kit pretrain configs/pretrain_tiny_dual.yaml checkpoints/tiny-dual-scenes
"""
from __future__ import annotations

import argparse
import sys


def _run_pipeline(args: argparse.Namespace) -> int:
    import yaml

    from llave_kit.pipeline import PipelineError, load_pipeline, run_pipeline

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        pipeline = load_pipeline(args.pipeline, root=args.root, overrides=overrides)
        outcomes = run_pipeline(pipeline, force=args.force)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(outcome.succeeded for outcome in outcomes) else 1


def _describe_mmeb(args: argparse.Namespace) -> int:
    from llave_kit.data import write_mmeb_manifest

    info = write_mmeb_manifest(args.folder, image_root=args.image_root)
    for task in info.tasks:
        print(f"{task}: {info.meta_task(task)}, train={bool(info.task(task)['train'])}, "
              f"eval={info.levels(task)}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import json

    from llave_kit.studies import pretrain

    card = pretrain(args.recipe, args.out, work_dir=args.work_dir)
    print(json.dumps({key: card[key] for key in ("train_seconds", "p@1")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llave-kit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pipeline = commands.add_parser("run-pipeline", help="execute a YAML pipeline of notebooks")
    pipeline.add_argument("pipeline", help="pipeline file, e.g. pipelines/cpu_demo.yaml")
    pipeline.add_argument("--force", action="store_true", help="re-run runs that are up to date")
    pipeline.add_argument("--root", default=".", help="folder holding notebooks/, runs/, figures/")
    pipeline.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a parameter in every notebook that declares it (YAML value)")
    pipeline.set_defaults(handler=_run_pipeline)
    describe = commands.add_parser("describe-mmeb", help="write manifest.json for an MMEB folder")
    describe.add_argument("folder", help="folder with train/ and/or eval/ MMEB files")
    describe.add_argument("--image-root", default=".", help="images folder, relative to FOLDER")
    describe.set_defaults(handler=_describe_mmeb)
    pretrain = commands.add_parser("pretrain", help="make a starting checkpoint by a recipe file")
    pretrain.add_argument("recipe", help="e.g. configs/pretrain_tiny_dual.yaml")
    pretrain.add_argument("out", help="folder to write the checkpoint to, e.g. checkpoints/NAME")
    pretrain.add_argument("--work-dir", default="runs/pretrain", help="data and training runs")
    pretrain.set_defaults(handler=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
