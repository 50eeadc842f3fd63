"""Real MMEB as published: sharded eval folders, MMEB-train split shards, flat files, images under
their own root; describe-mmeb, open_mmeb_folder and `llave-kit train` on such a folder, and bad
records from each entry point (one line, exit 2; or skipped and counted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llave_kit.cli import main
from llave_kit.data import (
    MMEB_EVAL_SPLIT,
    MMEB_IN_DISTRIBUTION,
    MMEB_META_TASKS,
    EvalDataset,
    SkippedRecordsWarning,
    TrainPairDataset,
    load_manifest,
    open_mmeb_folder,
    read_records,
    write_mmeb_manifest,
    write_records,
)
from llave_kit.pipeline import PipelineError, check_parameters, load_pipeline
from llave_kit.studies import load_data


def eval_record(i: int, image: str) -> dict:
    return {"qry_text": f"<|image_1|> find query {i}", "qry_img_path": image,
            "tgt_text": [f"caption {i}", "caption other"], "tgt_img_path": ["", ""]}


def train_record(text: str, image: str) -> dict:
    return {"qry": f"<|image_1|> {text}", "qry_image_path": image, "pos_text": f"pos {text}",
            "pos_image_path": ""}


# What the fixture writes, by file (relative to the data folder); images under ../images.
EVAL_SHARDS = {  # name order differs from the order of writing below
    "eval/MSCOCO_i2t/test-00000-of-00002.parquet": [eval_record(0, "coco/a.png"),
                                                    eval_record(1, "coco/b.png")],
    "eval/MSCOCO_i2t/test-00001-of-00002.parquet": [eval_record(2, "coco/c.png")],
}
FLAT_EVAL = {"eval/ObjectNet.jsonl": [eval_record(3, "objectnet/d.png"),
                                      eval_record(4, "objectnet/gone.png")]}
TRAIN_SHARDS = {
    "train/MSCOCO_i2t/original-00000-of-00001.parquet": [
        train_record(f"original {i}", "coco/a.png") for i in range(3)],
    "train/MSCOCO_i2t/diverse_instruction-00000-of-00001.parquet": [
        train_record(f"diverse {i}", "coco/b.png") for i in range(2)],
    "train/VOC2007/train-00000-of-00001.parquet": [train_record("voc", "voc/e.png")],
}
IMAGES = ["coco/a.png", "coco/b.png", "coco/c.png", "objectnet/d.png", "voc/e.png"]


@pytest.fixture
def published(tmp_path):
    folder = tmp_path / "mmeb"
    for name in IMAGES:
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / name)
    files = {**EVAL_SHARDS, **FLAT_EVAL, **TRAIN_SHARDS}
    for relative in reversed(list(files)):
        write_records(folder / relative, files[relative], "eval" if "eval/" in relative else "train")
    return folder


def files_of(folder) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def run_module(*args, module: str = "llave_kit") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


def test_describe_mmeb_counts_records_meta_tasks_distribution_and_missing_images(
        published, capsys):
    assert main(["describe-mmeb", str(published), "--image-root", "../images"]) == 0
    printed = capsys.readouterr().out.splitlines()
    manifest = json.loads((published / "manifest.json").read_text())
    tasks = manifest["tasks"]
    assert list(tasks) == ["MSCOCO_i2t", "ObjectNet", "VOC2007"]
    expected = {  # by default only the original split, else train
        "MSCOCO_i2t": (3, sum(map(len, EVAL_SHARDS.values()))), "ObjectNet": (0, 2),
        "VOC2007": (1, 0)}
    images_root = published.parent / "images"
    for task, (n_train, n_eval) in expected.items():
        spec = tasks[task]
        assert (spec["n_train"], spec["n_eval"]) == (n_train, n_eval)
        assert spec["meta_task"] == MMEB_META_TASKS[task]
        assert spec["in_distribution"] == (task in MMEB_IN_DISTRIBUTION)  # all three are MMEB's
        referenced = {r["qry_img_path"] for f in [*EVAL_SHARDS, *FLAT_EVAL]
                      if f.split("/")[1].split(".")[0] == task for r in read_records(published / f, "eval")}
        referenced |= {r["qry_image_path"] for f in spec["train"] or []
                       for r in read_records(published / f, "train")}
        missing = sorted(name for name in referenced if not (images_root / name).exists())
        assert spec["images"] == {"referenced": len(referenced), "checked": len(referenced),
                                  "missing": len(missing), "missing_examples": missing}
        line = next(line for line in printed if line.startswith(f"{task}: "))
        assert f"records: train {n_train}, eval {n_eval}" in line
        assert f"{len(missing)} missing" in line
    assert tasks["ObjectNet"]["images"]["missing"] == 1  # the fixture's one missing image
    assert "out of distribution" in printed[1] and "in distribution" in printed[0]
    assert tasks["MSCOCO_i2t"]["eval"] == {"test": sorted(EVAL_SHARDS)}
    assert tasks["ObjectNet"]["eval"] == {"test": list(FLAT_EVAL)}
    assert manifest["counts"]["images_missing"] == 1 and manifest["counts"]["skipped"] == 0
    assert "1 of 6 checked images missing" in printed[-1]


def test_a_wrong_image_root_is_pointed_out_and_other_names_are_not_called_mmeb(
        published, capsys):
    (published / "eval" / "ObjectNet.jsonl").rename(published / "eval" / "my_set.jsonl")
    assert main(["describe-mmeb", str(published)]) == 0  # the images are in ../images
    printed = capsys.readouterr()
    assert "none of the checked images is under" in printed.err and "--image-root" in printed.err
    line = next(line for line in printed.out.splitlines() if line.startswith("my_set: "))
    assert line.startswith("my_set: other, not an MMEB data set;")
    assert load_manifest(published).task("my_set")["in_distribution"] is None
    assert main(["describe-mmeb", str(published), "--image-root", "../images"]) == 0
    assert "warning" not in capsys.readouterr().err  # only my_set's one image is missing


def test_a_sample_of_images_is_checked_when_asked(published):
    info = write_mmeb_manifest(published, image_root="../images", check_images=1)
    images = {task: info.task(task)["images"] for task in info.tasks}
    assert {task: (i["checked"], i["referenced"]) for task, i in images.items()} == {
        "MSCOCO_i2t": (1, 3), "ObjectNet": (1, 2), "VOC2007": (1, 1)}
    with pytest.raises(ValueError, match="check_images must be 'all' or a number"):
        write_mmeb_manifest(published, image_root="../images", check_images=-1)


def test_shards_are_read_in_name_order_as_one_dataset(published):
    info = open_mmeb_folder(published, image_root="../images")
    dataset = info.eval_dataset("MSCOCO_i2t", "test")
    in_name_order = [r for name in sorted(EVAL_SHARDS) for r in EVAL_SHARDS[name]]
    assert dataset.records == in_name_order
    assert dataset.image_root.resolve() == (published.parent / "images").resolve()
    assert [where.split(": ")[0] for where, _ in dataset.rows] == [
        str(published / name) for name in sorted(EVAL_SHARDS) for _ in EVAL_SHARDS[name]]
    reversed_order = list(reversed(sorted(EVAL_SHARDS)))
    direct = EvalDataset([published / name for name in reversed_order], check_images=False)
    assert direct.records == [r for name in reversed_order for r in EVAL_SHARDS[name]]
    with pytest.raises(ValueError, match="one of 2 shards"):
        info.eval_path("MSCOCO_i2t", "test")


def test_train_splits_select_the_shards(published):
    original, diverse, voc = TRAIN_SHARDS.values()
    default = open_mmeb_folder(published, "../images")
    assert default.train_dataset(["MSCOCO_i2t"]).datasets[0].records == original
    assert default.train_dataset(["VOC2007"]).datasets[0].records == voc  # no original: train
    both = open_mmeb_folder(published, "../images",
                            train_splits=["original", "diverse_instruction", "train"])
    assert both.train_dataset(["MSCOCO_i2t"]).datasets[0].records == original + diverse
    only_diverse = ["diverse_instruction"]
    with pytest.raises(ValueError, match=r"VOC2007: no shards of \['diverse_instruction'\]; "
                                         r"its files are of split\(s\) \['train'\]"):
        open_mmeb_folder(published, "../images", train_splits=only_diverse)
    with pytest.raises(ValueError, match="non-empty list of split names"):
        open_mmeb_folder(published, train_splits="original")


def test_open_mmeb_folder_without_a_manifest_writes_nothing(published):
    before = files_of(published)
    info = open_mmeb_folder(published, image_root="../images")
    assert info.tasks == ["MSCOCO_i2t", "ObjectNet", "VOC2007"]
    assert info.meta_task("ObjectNet") == "classification"
    assert len(info.train_dataset(check_images=False)) == 3 + 1
    assert len(info.eval_dataset("ObjectNet", "test", check_images=False)) == 2
    words = {w.lower() for files in (EVAL_SHARDS, FLAT_EVAL) for records in files.values()
             for r in records for text in [r["qry_text"], *r["tgt_text"]] for w in text.split()}
    assert words - {"<|image_1|>"} <= set(info.vocabulary())
    assert "diverse" not in info.vocabulary()  # not a chosen split
    assert info.labels() == []
    assert files_of(published) == before
    with pytest.raises(FileNotFoundError, match="the image root is not a folder"):
        open_mmeb_folder(published, image_root="no-such-images")


def test_mmeb_train_s_imagenet_subset_pairs_with_its_eval_set(tmp_path):
    write_records(tmp_path / "train" / "ImageNet_1K" / "original-00000-of-00001.parquet",
                  [train_record("imagenet", "")], "train")
    write_records(tmp_path / "eval" / "ImageNet-1K" / "test-00000-of-00001.parquet",
                  [eval_record(0, "")], "eval")
    info = open_mmeb_folder(tmp_path)
    assert info.tasks == ["ImageNet-1K"]
    assert info.train_paths("ImageNet-1K")[0].parent.name == "ImageNet_1K"


def test_open_mmeb_folder_takes_the_manifest_when_there_is_one(published):
    written = write_mmeb_manifest(published, image_root="../images",
                                  train_splits=["original", "train"])
    opened = open_mmeb_folder(published, on_error="skip")
    assert opened.manifest == written.manifest and opened.on_error == "skip"
    assert opened.image_root == published / "../images"
    elsewhere = published.parent / "copy"
    elsewhere.mkdir()
    assert open_mmeb_folder(published, image_root=elsewhere).image_root == elsewhere
    with pytest.raises(ValueError, match=r"written for train splits \['original', 'train'\]"):
        open_mmeb_folder(published, train_splits=["diverse_instruction"])


def test_a_folder_without_data_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("not data")
    assert main(["describe-mmeb", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: {tmp_path}: no MMEB data")
    assert not (tmp_path / "manifest.json").exists()


def break_a_json_line(folder) -> None:
    """Line 2 of eval/ObjectNet.jsonl becomes malformed JSON."""
    flat = folder / "eval" / "ObjectNet.jsonl"
    lines = flat.read_text().splitlines()
    flat.write_text("\n".join([lines[0], '{"qry_text": "cut off', *lines[1:]]) + "\n")


@pytest.mark.parametrize("option, message", [
    (["--check-images", "some"], "check_images must be 'all' or a number of images >= 0"),
    (["--on-error", "ignore"], "on_error must be 'raise' or 'skip', got 'ignore'"),
    (["--image-root", "nowhere"], "nowhere: the image root is not a folder"),
    (["--train-splits", "diverse_instruction"], "VOC2007: no shards of ['diverse_instruction']"),
])
def test_a_bad_describe_option_is_one_line_and_exit_2(published, capsys, option, message):
    assert main(["describe-mmeb", str(published), *option]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and message in error
    assert not (published / "manifest.json").exists()


def add_bad_records(folder) -> dict[str, int]:
    """A malformed JSON line and a row without query; the number of bad records per file."""
    break_a_json_line(folder)
    shard = folder / "train" / "MSCOCO_i2t" / "original-00000-of-00001.parquet"
    write_records(shard, [*TRAIN_SHARDS[str(shard.relative_to(folder))],
                          {**train_record("x", ""), "qry": None}])
    return {"eval/ObjectNet.jsonl": 1, str(shard.relative_to(folder)): 1}


def test_describe_mmeb_reports_a_malformed_line_in_one_line(published):
    break_a_json_line(published)
    done = run_module("describe-mmeb", published, "--image-root", "../images")
    assert_one_line_error(done, f"{published / 'eval' / 'ObjectNet.jsonl'}:2: malformed JSON")
    assert not any(published.glob("*.json*")) and not (published / "vocabulary.txt").exists()


def test_describe_mmeb_skips_and_counts_bad_records_per_file(published, capsys):
    bad = add_bad_records(published)
    args = ["describe-mmeb", str(published), "--image-root", "../images", "--on-error", "skip"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((published / "manifest.json").read_text())
    skipped = {file: n for spec in manifest["tasks"].values()
               for file, n in spec["skipped"].items() if n}
    assert skipped == bad
    assert manifest["tasks"]["ObjectNet"]["n_eval"] == len(FLAT_EVAL["eval/ObjectNet.jsonl"])
    assert manifest["counts"]["skipped"] == sum(bad.values())
    assert "ObjectNet: classification, out of distribution; records: train 0, eval 2, skipped 1" \
        in printed


def write_config(tmp_path, data, **fields) -> str:
    path = tmp_path / "cfg.yaml"
    lines = ["model: tiny-dual", f"data: {data}", f"output_dir: {tmp_path / 'run'}",
             "batch_size: 2", "max_steps: 1", *(f"{k}: {v}" for k, v in fields.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_train_reports_a_bad_record_in_one_line_and_exit_2(published, tmp_path):
    add_bad_records(published)
    config = write_config(tmp_path, published, image_root=published.parent / "images")
    done = run_module("--config", config, module="llave_kit.train")
    shard = published / "train" / "MSCOCO_i2t" / "original-00000-of-00001.parquet"
    assert_one_line_error(done, f"{shard}: row 4: the query has neither text nor image")
    assert not (tmp_path / "run").exists()


def test_train_skips_bad_records_and_says_how_many(published, tmp_path):
    bad = add_bad_records(published)
    train_bad = sum(n for file, n in bad.items() if file.startswith("train/"))
    config = write_config(tmp_path, published, image_root=published.parent / "images",
                          on_error="skip")
    done = run_module("train", "--config", config)
    assert done.returncode == 0, done.stderr[-2000:]
    good = len(TRAIN_SHARDS["train/MSCOCO_i2t/original-00000-of-00001.parquet"]) + 1  # + VOC2007
    assert f"data: {good} training pairs from {published}; {train_bad} bad record(s) skipped" \
        in done.stdout
    assert (tmp_path / "run" / "final").is_dir()


def test_load_data_passes_on_error_to_the_datasets(published):
    bad = add_bad_records(published)
    strict = load_data(str(published))
    with pytest.raises(ValueError, match="ObjectNet.jsonl:2: malformed JSON"):
        strict.eval_dataset("ObjectNet", "test", check_images=False)
    lenient = load_data(str(published), on_error="skip")
    with pytest.warns(SkippedRecordsWarning, match="skipped 1 bad record"):
        dataset = lenient.eval_dataset("ObjectNet", "test", check_images=False)
    assert dataset.skipped == bad["eval/ObjectNet.jsonl"]
    assert len(dataset) == len(FLAT_EVAL["eval/ObjectNet.jsonl"])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_data(str(published), on_error="ignore")


def test_a_list_of_shards_is_one_training_set(published):
    shards = [published / name for name in TRAIN_SHARDS if "MSCOCO" in name]
    dataset = TrainPairDataset(shards, published.parent / "images")
    assert dataset.records == [r for name in TRAIN_SHARDS if "MSCOCO" in name
                               for r in TRAIN_SHARDS[name]]
    with pytest.raises(ValueError, match="no files given"):
        TrainPairDataset([])


# --------------------------------------------------------------------------------------------------
# pipelines/mmeb_gpu.yaml follows its one model setting and describe-mmeb's level name

REPO = Path(__file__).resolve().parents[1]
GPU_PIPELINE = REPO / "pipelines" / "mmeb_gpu.yaml"


def named_models(value, where: str = ""):
    """(where, value) of every parameter, nested ones included, that names a model or checkpoint."""
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(item, (dict, list)):
            yield from named_models(item, path)
        elif any(word in str(key) for word in ("model", "checkpoint")):
            yield path, item


def test_one_setting_changes_every_run_s_model():
    other = "Qwen/Qwen2-VL-2B-Instruct"
    pipeline = load_pipeline(GPU_PIPELINE, root=REPO, overrides={"base_checkpoint": other})
    planned = check_parameters(pipeline)
    models = {(run, where): value for run, (parameters, _) in planned.items()
              for where, value in named_models(parameters)}
    assert {run for run, _ in models} == {"overlap", "retrieval", "clustering", "alpha_sweep"}
    assert set(models.values()) == {other}


def test_a_model_inside_the_fine_tune_fields_is_refused():
    finetune = {"max_steps": 10, "model": "Qwen/Qwen2-VL-2B-Instruct", "seed": 3}
    pipeline = load_pipeline(GPU_PIPELINE, root=REPO, overrides={"finetune": finetune})
    with pytest.raises(PipelineError, match=r"the studies set \['model', 'seed'\] themselves "
                                            r"\(model comes from base_checkpoint; seed comes from "
                                            r"seeds\)"):
        check_parameters(pipeline)


def test_the_gpu_pipeline_reads_describe_mmeb_s_level():
    planned = check_parameters(load_pipeline(GPU_PIPELINE, root=REPO))
    levels = {run: [parameters[name] for name in ("level", "failure_level") if name in parameters]
              + parameters.get("levels", []) for run, (parameters, _) in planned.items()}
    assert {run: set(values) for run, values in levels.items() if values} == dict.fromkeys(
        ["overlap", "retrieval", "alpha_sweep"], {MMEB_EVAL_SPLIT})
    assert {parameters.get("on_error") for parameters, _ in planned.values()} == {"raise", None}
