"""The kit's command line: `llave-kit <command>` (or `python -m llave_kit <command>`).

    llave-kit train --config cfg.yaml [KEY=VALUE ...]    # also `torchrun ... -m llave_kit.train`
    llave-kit make-data scenes data/scenes [--n-train 500 --n-eval 200 ...]
    llave-kit make-data digits data/digits [--train-fraction 0.5 ...]
    llave-kit describe-mmeb data/mmeb --image-root ../mmeb-images   # check it, write manifest.json
    llave-kit run-pipeline pipelines/cpu_demo.yaml [--force] [--set steps=50 ...]
    llave-kit pretrain configs/pretrain_tiny_dual.yaml checkpoints/tiny-dual-scenes
    llave-kit evaluate --model checkpoints/tiny-dual-scenes --data data/mmeb --out scores.json

A KEY=VALUE reads its value as YAML (`max_steps=7`, `alpha=0.5`, `seeds=[0,1]`,
`loss_kwargs={symmetric: false}`). A mistake in the command line or in a file it names prints one
line, `error: ...`, and exits with status 2; so does a training config that does not fit its
output_dir, data or device. A training run stopped by a nan/inf prints one line and exits with 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from llave_kit.train import TrainConfig


class UsageError(ValueError):
    """A mistake in the command line or in a file it names; `main` reports it in one line."""


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """["KEY=VALUE", ...] -> {KEY: VALUE read as YAML}; a later KEY wins."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{item!r} is not KEY=VALUE")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise UsageError(f"{item!r}: the value is not YAML ({_yaml_problem(error)})") from None
    return params


def _yaml_problem(error) -> str:
    """The gist of a YAML error; its full text spans lines and quotes the input with a caret."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if problem is None:
        return str(error)
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else problem


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML mapping of TrainConfig fields, then KEY=VALUE overrides."""
    try:
        params = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({_yaml_problem(error)})") from None
    if not isinstance(params, dict):
        raise UsageError(
            f"{path}: expected a mapping of TrainConfig fields, got {type(params).__name__}")
    params.update(parse_assignments(overrides))
    from llave_kit.train import TrainConfig  # imports torch: only once the text has been read

    try:
        return TrainConfig.from_dict(params)
    except ValueError as error:  # its message names the field, which may come from overrides
        raise UsageError(str(error)) from None


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from llave_kit.data import SkippedRecordsWarning
    from llave_kit.distributed import is_distributed
    from llave_kit.encoders import load_embedder
    from llave_kit.train import NonFiniteError, TrainConfigError, train

    config = load_config(args.config, args.overrides)
    if config.model is None or config.data is None:
        raise UsageError(f"{args.config}: set `model` (an embedder name or folder) and `data` "
                         "(a data set folder or a train jsonl) to train from the command line")
    try:
        with warnings.catch_warnings():  # the skipped count is printed below
            warnings.simplefilter("ignore", SkippedRecordsWarning)
            dataset = _training_pairs(config)
        model = load_embedder(config.model)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None  # it names the file or model
    parts = getattr(dataset, "datasets", [dataset])
    reasons = [reason for part in parts for reason in part.skip_reasons]
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per torchrun process
        print(f"data: {len(dataset)} training pairs from {config.data}; {len(reasons)} bad "
              f"record(s) skipped" + (f" (first: {reasons[0]})" if reasons else ""), flush=True)
    try:
        train(config, model, dataset)
    except TrainConfigError as error:
        raise UsageError(str(error)) from None
    except NonFiniteError as error:  # what happened and what to do: a traceback would add nothing
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if is_distributed():
            dist.destroy_process_group()
    return 0


def _training_pairs(config: TrainConfig):
    """The pairs `config.data` names: every task's of a data set or MMEB folder (manifest or
    not), or one train jsonl/parquet. image_root, like data, is relative to the working folder."""
    from llave_kit.data import TrainPairDataset, open_mmeb_folder

    if Path(config.data).is_dir():
        image_root = None if config.image_root is None else Path(config.image_root).absolute()
        info = open_mmeb_folder(config.data, image_root, on_error=config.on_error)
        return info.train_dataset()
    return TrainPairDataset(config.data, config.image_root, on_error=config.on_error)


def _make_data(args: argparse.Namespace) -> int:
    options = {key: value for key, value in vars(args).items()
               if key not in ("command", "handler", "kind", "out_dir")}
    if args.kind == "scenes":
        from llave_kit.scenes import make_scenes_dataset as make
    else:
        from llave_kit.digits import make_digits_dataset as make
    try:
        info = make(args.out_dir, **options)
    except ValueError as error:  # parameters out of range, a folder holding something else
        raise UsageError(str(error)) from None
    print(json.dumps(info.manifest["counts"]))
    return 0


def _describe_mmeb(args: argparse.Namespace) -> int:
    from llave_kit.data import SkippedRecordsWarning, write_mmeb_manifest

    try:
        with warnings.catch_warnings():  # the skipped counts are printed per dataset below
            warnings.simplefilter("ignore", SkippedRecordsWarning)
            info = write_mmeb_manifest(args.folder, image_root=args.image_root,
                                       train_splits=args.train_splits,
                                       check_images=args.check_images, on_error=args.on_error)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    for task in info.tasks:
        spec = info.task(task)
        skipped, images = sum(spec["skipped"].values()), spec["images"]
        where = {True: "in distribution", False: "out of distribution",
                 None: "not an MMEB data set"}[spec["in_distribution"]]
        line = (f"{task}: {spec['meta_task']}, {where}; records: train {spec['n_train']}, "
                f"eval {spec['n_eval']}" + (f", skipped {skipped}" if skipped else "")
                + f"; images: {images['checked']} of {images['referenced']} checked, "
                f"{images['missing']} missing")
        examples = ", ".join(images["missing_examples"])
        print(line + (f" (e.g. {examples})" if examples else ""))
    counts = info.manifest["counts"]
    print(f"{counts['datasets']} datasets, {counts['train']} training pairs, {counts['eval']} "
          f"candidate lists, {counts['skipped']} bad records skipped, "
          f"{counts['images_missing']} of {counts['images_checked']} checked images missing "
          f"(image root {info.image_root}); wrote {info.root / 'manifest.json'}")
    if counts["images_checked"] and counts["images_missing"] == counts["images_checked"]:
        print(f"warning: none of the checked images is under {info.image_root}: is --image-root "
              "right? (it is the folder the records' image paths start from)", file=sys.stderr)
    return 0


def _images_to_check(text: str) -> str | int:
    """A count as an int; anything else is left for write_mmeb_manifest to accept or name."""
    return int(text) if text.isdigit() else text


def _run_pipeline(args: argparse.Namespace) -> int:
    from llave_kit.pipeline import PipelineError, load_pipeline, run_pipeline

    overrides = parse_assignments(args.set)
    if not Path(args.pipeline).is_file():
        raise UsageError(f"{args.pipeline}: no such file")
    try:
        pipeline = load_pipeline(args.pipeline, root=args.root, overrides=overrides)
        outcomes = run_pipeline(pipeline, force=args.force)
    except PipelineError as error:
        raise UsageError(str(error)) from None
    return 0 if all(outcome.succeeded for outcome in outcomes) else 1


def _evaluate(args: argparse.Namespace) -> int:
    """MMEB's score table (`llave_kit.mmeb_scores`): printed, and written to --out and beside it."""
    import torch

    from llave_kit.data import open_mmeb_folder
    from llave_kit.dual_encoder import TinyDualEmbedder
    from llave_kit.encoders import CPU_MODELS, load_embedder
    from llave_kit.evaluation import check_tie_rule
    from llave_kit.mmeb_scores import (
        DEFAULT_TIES,
        eval_sets,
        report_markdown,
        report_paths,
        score_mmeb,
        write_report,
    )

    image_root = None if args.image_root is None else Path(args.image_root).absolute()
    ties = args.ties or DEFAULT_TIES
    try:
        device = _available_device(args.device)
        data = open_mmeb_folder(args.data, image_root)
        eval_sets(data, args.datasets, args.level)  # what is cheap to check, before the model loads
        check_tie_rule(ties)
        if args.out is not None:
            report_paths(args.out)
        # an LMM checkpoint's weights load straight into --dtype; the kit's tiny models stay fp32
        precision = {} if args.dtype is None else {"dtype": getattr(torch, args.dtype)}
        if precision and (args.model in CPU_MODELS or TinyDualEmbedder.is_saved_in(args.model)):
            raise UsageError(f"--dtype applies to LMM checkpoints; {args.model} runs in float32")
        embedder = load_embedder(args.model, device=device, **precision)
        report = score_mmeb(embedder, data, args.datasets, level=args.level, model=args.model,
                            ties=ties, batch_size=args.batch_size, cache_dir=args.cache_dir)
        print(report_markdown(report), end="")
        if args.out is not None:
            write_report(report, args.out)
    except (OSError, ValueError) as error:  # names the folder, file, record, model or device
        raise UsageError(str(error)) from None
    return 0


def _available_device(name: str | None):
    """The torch device `name` names (default: cuda when there is one, else cpu); ValueError for a
    name torch cannot read or a GPU this machine does not have."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return device


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="MMEB's score table for a model: P@1 per "
                                   "data set, meta-task, IND/OOD, overall; Table-1 similarities")
    evaluate.add_argument("--model", required=True,
                          help="built-in name (tiny-dual, tiny-qwen2-vl), checkpoint folder or hub id")
    evaluate.add_argument("--data", required=True,
                          help="MMEB folder (eval/<dataset>.jsonl|parquet or eval/<dataset>/"
                               "test*.parquet; manifest.json if present) or a data set folder")
    evaluate.add_argument("--datasets", nargs="+", metavar="NAME",
                          help="score only these data sets (default: all with eval sets)")
    evaluate.add_argument("--level", help="eval level, for folders with several (scenes: hard, "
                                          "random); default: each data set's only one")
    evaluate.add_argument("--out", metavar="SCORES.json",
                          help="write the report as JSON here and the tables beside it (.md)")
    evaluate.add_argument("--ties", metavar="RULE",
                          help="positive-first (default, as MMEB's evaluator: a wrong candidate "
                               "that ties the positive ranks below it) or pessimistic (above it)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                          help="items embedded at a time (default: %(default)s)")
    evaluate.add_argument("--image-root", metavar="DIR",
                          help="images folder (default: the folder's manifest, else --data)")
    evaluate.add_argument("--cache-dir", metavar="DIR",
                          help="keep embeddings here; a second run with the same model and data "
                               "embeds nothing")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                          help="load a checkpoint's weights in this precision (default: as saved; "
                               "bfloat16 halves a 7B model's memory on a GPU)")
    evaluate.set_defaults(handler=_evaluate)


def _pretrain(args: argparse.Namespace) -> int:
    from llave_kit.studies import pretrain

    card = pretrain(args.recipe, args.out, work_dir=args.work_dir)
    print(json.dumps({key: card[key] for key in ("train_seconds", "p@1")}))
    return 0


def _add_make_data(commands) -> None:
    make = commands.add_parser("make-data", help="write a built-in data set folder (MMEB layout)")
    kinds = make.add_subparsers(dest="kind", required=True)
    scenes = kinds.add_parser("scenes", help="compositional scenes, one-attribute-off negatives")
    scenes.add_argument("--n-train", type=int, default=500, metavar="N",
                        help="training pairs per task (default: %(default)s)")
    scenes.add_argument("--n-eval", type=int, default=200, metavar="N",
                        help="eval queries per task (default: %(default)s)")
    scenes.add_argument("--num-candidates", type=int, default=8, metavar="N",
                        help="candidates per eval list (default: %(default)s)")
    scenes.add_argument("--image-size", type=int, default=84, metavar="PX",
                        help="image side (default: %(default)s)")
    scenes.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="a subset of the six tasks (cls_object, vqa_count, vqa_position, "
                             "ret_i2t, ret_t2i, grd_position; default: all)")
    scenes.add_argument("--train-hard-negatives", action="store_true",
                        help="give every training pair a one-attribute-off negative")
    digits = kinds.add_parser("digits", help="scikit-learn's handwritten digits")
    digits.add_argument("--train-fraction", type=float, default=0.5, metavar="F",
                        help="share of the images for training (default: %(default)s)")
    digits.add_argument("--num-candidates", type=int, default=10, metavar="N",
                        help="candidates per eval list (default: %(default)s)")
    digits.add_argument("--image-size", type=int, default=56, metavar="PX",
                        help="image side (default: %(default)s)")
    for name, kind in (("scenes", scenes), ("digits", digits)):
        kind.add_argument("out_dir", help=f"folder to write, e.g. data/{name}")
        kind.add_argument("--seed", type=int, default=0,
                          help="same seed and options, same bytes (default: %(default)s)")
        kind.add_argument("--overwrite", action="store_true",
                          help="replace a folder that holds something else")
        kind.set_defaults(handler=_make_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llave-kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train an embedder by a YAML config (torchrun-aware)")
    train.add_argument("--config", required=True, help="YAML file of TrainConfig fields")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override a config field (YAML value), e.g. max_steps=100 alpha=0")
    train.set_defaults(handler=_train)
    _add_make_data(commands)
    describe = commands.add_parser("describe-mmeb", help="write manifest.json for an MMEB folder")
    describe.add_argument("folder", help="folder with train/ and/or eval/ MMEB files, flat "
                          "(eval/<dataset>.parquet) or as published (eval/<dataset>/test-*.parquet)")
    describe.add_argument("--image-root", default=".",
                          help="images folder, relative to FOLDER or absolute (default: FOLDER)")
    describe.add_argument("--train-splits", nargs="+", metavar="SPLIT",
                          help="MMEB-train shards to read per subset, e.g. original "
                               "diverse_instruction (default: original, else train)")
    describe.add_argument("--check-images", type=_images_to_check, default="all", metavar="all|N",
                          help="check that all referenced images exist, or N per dataset drawn "
                               "at random (default: all)")
    describe.add_argument("--on-error", default="raise", metavar="raise|skip",
                          help="a bad record stops with its file and line, or is skipped and "
                               "counted (default: raise)")
    describe.set_defaults(handler=_describe_mmeb)
    pipeline = commands.add_parser("run-pipeline", help="execute a YAML pipeline of notebooks")
    pipeline.add_argument("pipeline", help="pipeline file, e.g. pipelines/cpu_demo.yaml")
    pipeline.add_argument("--force", action="store_true", help="re-run runs that are up to date")
    pipeline.add_argument("--root", default=".", help="folder holding notebooks/, runs/, figures/")
    pipeline.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a parameter (YAML value) in every notebook declaring it")
    pipeline.set_defaults(handler=_run_pipeline)
    pretrain = commands.add_parser("pretrain", help="make a starting checkpoint by a recipe file")
    pretrain.add_argument("recipe", help="e.g. configs/pretrain_tiny_dual.yaml")
    pretrain.add_argument("out", help="folder to write the checkpoint to, e.g. checkpoints/NAME")
    pretrain.add_argument("--work-dir", default="runs/pretrain", help="data and training runs")
    pretrain.set_defaults(handler=_pretrain)
    _add_evaluate(commands)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; a mistake raises UsageError (for Python callers and tests)."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """`run`, with a UsageError printed as `error: ...` (one line) and exit status 2."""
    try:
        return run(argv)
    except UsageError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
