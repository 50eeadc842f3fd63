"""mmeb_scores.py and `llave-kit evaluate` on a small MMEB folder: P@1 against a direct argmax,
the table's means against sums written out by hand, images decoded once, the embedding cache."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llave_kit import data
from llave_kit.cli import main
from llave_kit.data import load_image, open_mmeb_folder, read_records, write_records
from llave_kit.dual_encoder import TinyDualEmbedder
from llave_kit.mmeb_scores import COLUMNS, report_markdown, score_mmeb, summarize

CLASSES = ["cat", "dog", "bird", "fish", "horse", "sheep"]
CAPTIONS = [f"a {colour} {thing}" for colour in ("red", "blue") for thing in ("cat", "dog", "car")]
# name -> where its eval file goes; OK-VQA and the ImageNet-1K shard are in distribution.
FILES = {"ImageNet-1K": "eval/ImageNet-1K/test-00000-of-00001.parquet",
         "ObjectNet": "eval/ObjectNet.parquet", "OK-VQA": "eval/OK-VQA.jsonl",
         "MSCOCO_t2i": "eval/MSCOCO_t2i.jsonl", "RefCOCO": "eval/RefCOCO.jsonl",
         "my_set": "eval/my_set.jsonl"}


def classify(rng, prefix, n_queries=6):
    """Image queries (one image each), class names as candidates, the true one first."""
    records = []
    for q in range(n_queries):
        order = rng.permutation(len(CLASSES))[:4]
        records.append({"qry_text": "<|image_1|> classify the image",
                        "qry_img_path": f"{prefix}_{q}.png",
                        "tgt_text": [CLASSES[i] for i in order], "tgt_img_path": [""] * 4})
    return records


def retrieve(rng, n_queries=6, pool=5):
    """Caption queries, image candidates drawn from a pool of `pool` images: lists share them."""
    records = []
    for q in range(n_queries):
        order = rng.permutation(pool)
        records.append({"qry_text": CAPTIONS[q % len(CAPTIONS)], "qry_img_path": None,
                        "tgt_text": [""] * 4, "tgt_img_path": [f"pool_{i}.png" for i in order[:4]]})
    return records


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb")
    rng = np.random.default_rng(0)
    records = {"ImageNet-1K": classify(rng, "imagenet"), "ObjectNet": classify(rng, "objectnet"),
               "OK-VQA": classify(rng, "okvqa"), "MSCOCO_t2i": retrieve(rng),
               "RefCOCO": retrieve(rng), "my_set": classify(rng, "mine")}
    # my_set's first list is its positive four times: the two tie rules differ on that query.
    first = records["my_set"][0]
    first["tgt_text"] = first["tgt_text"][:1] * 4
    for name, path in FILES.items():
        write_records(root / path, records[name], kind="eval")
        for record in records[name]:
            for image_path in filter(None, [record["qry_img_path"], *record["tgt_img_path"]]):
                if not (root / image_path).exists():
                    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
                    Image.new("RGB", (16, 16), colour).save(root / image_path)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    words = ["classify", "the", "image", "a", "red", "blue", "car", *CLASSES]
    directory = tmp_path_factory.mktemp("model") / "tiny"
    TinyDualEmbedder.build(words, seed=1).save_pretrained(directory)
    return directory


def argmax_p_at_1(model, root, name) -> float:
    """MMEB's evaluator, written out: embed each list, P@1 = mean(argmax == 0)."""
    def images(paths):
        return [load_image(root / path) if path else None for path in paths]

    hits = []
    with torch.no_grad():
        for record in read_records(root / FILES[name], "eval"):
            query = model.encode([record["qry_text"]], images([record["qry_img_path"]]))[0]
            candidates = model.encode(record["tgt_text"], images(record["tgt_img_path"]))
            hits.append(int((candidates @ query).argmax()) == 0)
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def report(folder, model_dir):
    model = TinyDualEmbedder.from_pretrained(model_dir)
    return score_mmeb(model, open_mmeb_folder(folder), model="tiny", progress=False)


def test_p_at_1_per_data_set_is_the_argmax_of_each_list(folder, model_dir, report):
    model = TinyDualEmbedder.from_pretrained(model_dir)
    assert list(report["datasets"]) == sorted(FILES)
    values = set()
    for name, row in report["datasets"].items():
        assert row["p@1"] == pytest.approx(argmax_p_at_1(model, folder, name)), name
        assert (row["queries"], row["candidates"]) == (6, 4)
        values.add(row["p@1"])
    assert len(values) > 2  # the data sets differ: the means below are not all one number
    assert report["ties"] == "positive-first" and "argmax" in report["ties_meaning"]


def test_column_means_equal_sums_written_out(report):
    p = {name: row["p@1"] for name, row in report["datasets"].items()}
    means = report["means"]
    # Membership by hand: my_set (not an MMEB name) has the meta-task "other" in a folder without
    # a manifest, so it counts in Overall only.
    expected = {
        "Classification": (p["ImageNet-1K"] + p["ObjectNet"]) / 2,
        "VQA": p["OK-VQA"],
        "Retrieval": p["MSCOCO_t2i"],
        "Grounding": p["RefCOCO"],
        "IND": (p["ImageNet-1K"] + p["OK-VQA"] + p["MSCOCO_t2i"]) / 3,
        "OOD": (p["ObjectNet"] + p["RefCOCO"]) / 2,
        "Overall": sum(p.values()) / 6,
    }
    assert list(means) == list(COLUMNS) == list(expected)
    for column, value in expected.items():
        assert means[column]["p@1"] == pytest.approx(value), column
    assert [means[c]["datasets"] for c in COLUMNS] == [2, 1, 1, 1, 3, 2, 6]
    assert report["overall"] == means["Overall"]["p@1"]
    assert report["outside_mmeb"] == ["my_set"]
    assert report["datasets"]["my_set"]["in_distribution"] is None


def test_summarize_counts_a_named_meta_task_outside_mmeb_but_in_neither_ind_nor_ood():
    means = summarize({"SUN397": 0.5, "Place365": 0.25, "mine": 1.0},
                      {"SUN397": "classification", "Place365": "classification",
                       "mine": "classification"})
    assert means["Classification"] == {"p@1": pytest.approx(1.75 / 3), "datasets": 3}
    assert means["IND"]["p@1"] == 0.5 and means["OOD"]["p@1"] == 0.25
    assert means["VQA"] == {"p@1": None, "datasets": 0}


def test_ties_are_counted_and_the_rule_decides_them(folder, model_dir, report):
    model = TinyDualEmbedder.from_pretrained(model_dir)
    pessimistic = score_mmeb(model, open_mmeb_folder(folder), ["my_set"], ties="pessimistic",
                             progress=False)
    first, last = report["datasets"]["my_set"], pessimistic["datasets"]["my_set"]
    assert first["tied_queries"] == last["tied_queries"] == 1
    assert first["p@1"] - last["p@1"] == pytest.approx(1 / 6)  # the tied query's hit, or not
    assert "Tied: 1 queries in 1 data set(s)" in report_markdown(report)
    assert "counted as misses" in report_markdown(pessimistic)
    others = [row["tied_queries"] for name, row in report["datasets"].items() if name != "my_set"]
    assert others == [0] * 5


def test_each_image_is_decoded_once_and_a_cached_run_decodes_none(folder, model_dir, tmp_path,
                                                                   monkeypatch):
    decoded = []
    decode = data._decode_rgb
    monkeypatch.setattr(data, "_decode_rgb", lambda path: decoded.append(path) or decode(path))
    monkeypatch.setattr(data.IMAGE_CACHE, "max_bytes", 0)  # no cache to hide repeated decoding
    model = TinyDualEmbedder.from_pretrained(model_dir)
    info = open_mmeb_folder(folder)
    first = score_mmeb(model, info, cache_dir=tmp_path, progress=False)
    expected, references = 0, 0
    for name in FILES:  # per data set, each image file it names once
        records = read_records(folder / FILES[name], "eval")
        paths = [p for r in records for p in [r["qry_img_path"], *r["tgt_img_path"]] if p]
        expected += len(set(paths))
        references += len(paths)
    assert len(decoded) == expected < references
    decoded.clear()
    calls = []
    monkeypatch.setattr(TinyDualEmbedder, "encode", lambda *args: calls.append(args))
    again = score_mmeb(model, info, cache_dir=tmp_path, progress=False)
    assert decoded == [] and calls == []  # the encoder was not called either
    assert {n: r["p@1"] for n, r in again["datasets"].items()} == \
        {n: r["p@1"] for n, r in first["datasets"].items()}


def test_cli_writes_json_and_markdown_in_the_papers_column_order(folder, model_dir, tmp_path):
    out = tmp_path / "scores.json"
    done = subprocess.run(
        [sys.executable, "-m", "llave_kit", "evaluate", "--model", str(model_dir), "--data",
         str(folder), "--datasets", "ObjectNet", "RefCOCO", "--out", str(out), "--device", "cpu",
         "--ties", "pessimistic"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert list(written["datasets"]) == ["ObjectNet", "RefCOCO"] and written["ties"] == "pessimistic"
    assert written["overall"] == pytest.approx(
        (written["datasets"]["ObjectNet"]["p@1"] + written["datasets"]["RefCOCO"]["p@1"]) / 2)
    markdown = (tmp_path / "scores.md").read_text()
    assert done.stdout == markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| model"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "model", "Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"]
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {model_dir} |"))
    overall = float(row.strip("|").split("|")[-1])
    assert overall == pytest.approx(100 * written["overall"], abs=0.05)
    assert "| ObjectNet | classification | OOD | 6 | 4 |" in markdown


@pytest.mark.parametrize("arguments, message", [
    (["--datasets", "ObjectNet", "SUN397"], "unknown data set(s) ['SUN397']"),
    (["--model", "tiny-nothing"], "unknown default model 'tiny-nothing'"),
    (["--ties", "optimistic"], "ties must be one of"),
    (["--out", "scores.txt"], "must end in .json"),
    (["--dtype", "bfloat16"], "--dtype applies to LMM checkpoints"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)"),
])
def test_cli_mistakes_print_one_line_and_exit_2(folder, model_dir, arguments, message, capsys):
    # A repeated option takes its last value, so `arguments` replace the working ones.
    assert main(["evaluate", "--model", str(model_dir), "--data", str(folder), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_cli_refuses_a_batch_size_below_1(folder, model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(model_dir), "--data", str(folder), "--batch-size", "0"])
    assert exit_.value.code == 2 and "expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_cli_folder_without_eval_sets_exits_2(tmp_path, capsys):
    write_records(tmp_path / "train" / "MSCOCO_i2t.jsonl", [
        {"qry": "a caption", "qry_image_path": "", "pos_text": "a red cat", "pos_image_path": ""}])
    assert main(["evaluate", "--model", "tiny-dual", "--data", str(tmp_path)]) == 2
    assert "no eval sets" in capsys.readouterr().err
