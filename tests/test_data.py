"""MMEB readers/writers, datasets and the built-in generators (scenes, digits).

Independent references: a plain `json.loads` per line, pixels read back with PIL and checked
against the attributes (colours, connected components, cells), answer texts spelled out here,
sklearn's own digit images and labels, and an attribute diff written here, not the generator's.
"""
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader

from llave_kit import data, scenes
from llave_kit.data import (
    EvalDataset,
    TrainPairDataset,
    collate_eval,
    collate_train_pairs,
    load_manifest,
    read_records,
    write_records,
)
from llave_kit.digits import make_digits_dataset
from llave_kit.scenes import COLORS, make_scenes_dataset, scenes_vocabulary

TINY = dict(n_train=3, n_eval=4, num_candidates=8, seed=3)
POSITION_WORDS = ["top left", "top middle", "top right", "middle left", "center", "middle right",
                  "bottom left", "bottom middle", "bottom right"]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
BACKGROUND = (28, 28, 28)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def same_pixels(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tree_bytes(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def n_differing(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return sum(a[k] != b[k] for k in a)


def object_components(image: np.ndarray) -> list[tuple[tuple, int, tuple]]:
    """[(rgb, pixel count, (row, col) centroid)] of the 8-connected non-background blobs."""
    mask = np.any(image != BACKGROUND, axis=-1)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    blobs = []
    for k in range(1, n + 1):
        colours, counts = np.unique(image[labels == k], axis=0, return_counts=True)
        assert len(colours) == 1, "an object is drawn in exactly one colour"
        blobs.append((tuple(colours[0]), int(counts[0]), ndimage.center_of_mass(labels == k)))
    return blobs


def cell_of(centroid, size=84) -> str:
    row, col = (min(int(c // (size / 3)), 2) for c in centroid)
    return POSITION_WORDS[3 * row + col]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny scenes folder plus what the generator produced in memory (records and images)."""
    records, images = {}, {}
    original_records, original_write = scenes.write_records, scenes._ImageWriter.write

    def spy_records(path, rows, kind=None):
        records[Path(path).name] = [json.loads(json.dumps(r)) for r in rows]
        return original_records(path, rows, kind)

    def spy_write(self, spec, rel, *args):
        if spec is not None:
            images[rel] = np.asarray(scenes.render(spec, self.image_size))
        return original_write(self, spec, rel, *args)

    root = tmp_path_factory.mktemp("scenes") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scenes, "write_records", spy_records)
        mp.setattr(scenes._ImageWriter, "write", spy_write)
        info = make_scenes_dataset(root, train_hard_negatives=True, **TINY)
    return info, records, images


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "data"
    return make_digits_dataset(root, num_candidates=6, seed=1)


def eval_rows(info, task, level="hard"):
    """(record, attribute row) per query of one eval file."""
    records = read_records(info.eval_path(task, level), "eval")
    return list(zip(records, info.candidate_attributes(task, level)))


# --------------------------------------------------------------------------------------------------
# Round trips


def test_readers_give_back_what_the_generator_wrote(generated):
    info, records, images = generated
    for task in info.tasks:
        files = [(info.train_path(task), "train")]
        files += [(info.eval_path(task, level), "eval") for level in info.levels(task)]
        for path, kind in files:
            assert read_records(path, kind) == records[path.name] == jsonl(path)
    assert len(images) == info.manifest["counts"]["images"]
    for rel, array in images.items():
        assert np.array_equal(pixels(info.root / rel), array), rel


def test_datasets_load_texts_and_images_unchanged(generated):
    info, records, images = generated
    for task in info.tasks:
        for item, rec in zip(info.eval_dataset(task, "hard"), records[f"{task}_hard.jsonl"]):
            assert item["query_text"] == rec["qry_text"]
            assert item["candidate_texts"] == rec["tgt_text"]
            for image, rel in zip([item["query_image"], *item["candidate_images"]],
                                  [rec["qry_img_path"], *rec["tgt_img_path"]]):
                assert image is None if rel == "" else same_pixels(image, images[rel])
        train = TrainPairDataset(info.train_path(task), info.image_root)
        for item, rec in zip(train, records[f"{task}.jsonl"]):
            assert item["query_text"] == rec["qry"] and item["pos_text"] == rec["pos_text"]
            assert item["neg_text"] == rec["neg_text"]
            for key, column in [("query_image", "qry_image_path"), ("pos_image", "pos_image_path"),
                                ("neg_image", "neg_image_path")]:
                rel = rec[column]
                assert item[key] is None if rel == "" else same_pixels(item[key], images[rel])


def test_jsonl_parquet_round_trip(generated, tmp_path):
    info, _, _ = generated
    for task in info.tasks:
        files = [(info.train_path(task), "train"), (info.eval_path(task, "random"), "eval")]
        for path, kind in files:
            rows = read_records(path, kind)
            parquet = write_records(tmp_path / f"{path.stem}.parquet", rows)
            assert read_records(parquet, kind) == rows
            back = write_records(tmp_path / f"{path.stem}.jsonl", read_records(parquet, kind))
            assert read_records(back, kind) == rows
    from_jsonl = info.eval_dataset("grd_position", "hard")
    parquet = write_records(tmp_path / "grd.parquet", from_jsonl.records)
    a, b = from_jsonl[1], EvalDataset(parquet, info.image_root)[1]
    assert a["candidate_texts"] == b["candidate_texts"]
    assert all(same_pixels(x, y) for x, y in zip(a["candidate_images"], b["candidate_images"]))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = dict(TINY, n_eval=2, tasks=["cls_object", "ret_t2i"])
    first = tree_bytes(make_scenes_dataset(tmp_path / "a", **kwargs).root)
    assert first == tree_bytes(make_scenes_dataset(tmp_path / "b", **kwargs).root)
    other = tree_bytes(make_scenes_dataset(tmp_path / "c", **{**kwargs, "seed": 4}).root)
    assert other.keys() == first.keys() and other != first


# --------------------------------------------------------------------------------------------------
# Candidate lists


def test_hard_lists_differ_in_exactly_one_attribute_random_lists_are_drawn(generated):
    info, _, _ = generated
    for task in info.tasks:
        for level, all_hard in [("hard", True), ("random", False)]:
            for row in info.candidate_attributes(task, level):
                assert row["candidates"][0] == row["truth"] and row["hard"][0] is False
                assert len(row["candidates"]) == TINY["num_candidates"]
                assert row["hard"][1:] == [all_hard] * (TINY["num_candidates"] - 1)
                diffs = [n_differing(attrs, row["truth"]) for attrs in row["candidates"][1:]]
                assert all(d == 1 for d in diffs) if all_hard else all(d >= 1 for d in diffs)
    random_diffs = [n_differing(a, row["truth"])
                    for row in info.candidate_attributes("ret_i2t", "random")
                    for a in row["candidates"][1:]]
    assert np.mean(random_diffs) > 3, "random candidates are not just one-attribute neighbours"


def test_answer_texts_spell_out_their_attributes(generated):
    info, _, _ = generated
    plurals = {"circle": "circles", "square": "squares", "triangle": "triangles",
               "diamond": "diamonds", "cross": "crosses", "star": "stars", "hexagon": "hexagons"}

    def one(a, i=""):
        return f"a {a[f'size{i}']} {a[f'color{i}']} {a[f'shape{i}']}"

    spell = {
        "cls_object": one,
        "vqa_position": one,
        "vqa_count": lambda a: f"{NUMBERS[a['count']]} {a['color']} "
                               + (a["shape"] if a["count"] == 1 else plurals[a["shape"]]),
        "ret_i2t": lambda a: " and ".join(f"{one(a, f'_{i}')} in the {a[f'position_{i}']}"
                                          for i in (1, 2)),
    }
    for task, phrase in spell.items():
        for rec, row in eval_rows(info, task):
            assert rec["tgt_text"] == [phrase(a) for a in row["candidates"]]


def test_no_duplicate_candidates_and_shared_positives(generated):
    info, _, _ = generated
    for task in info.tasks:
        for level in ("hard", "random"):
            for rec, row in eval_rows(info, task, level):
                keys = [json.dumps(a, sort_keys=True) for a in row["candidates"]]
                targets = list(zip(rec["tgt_text"], rec["tgt_img_path"]))
                assert len(set(keys)) == len(keys) and len(set(targets)) == len(targets)
        hard, rand = (read_records(info.eval_path(task, lv), "eval") for lv in ("hard", "random"))
        for a, b in zip(hard, rand):
            assert (a["qry_text"], a["qry_img_path"]) == (b["qry_text"], b["qry_img_path"])
            assert a["tgt_text"][0] == b["tgt_text"][0]
            assert a["tgt_img_path"][0] == b["tgt_img_path"][0]


def test_dialled_hard_fraction(tmp_path):
    info = make_scenes_dataset(tmp_path / "d", n_train=1, n_eval=3, num_candidates=9, seed=0,
                               hard_fractions={"half": 0.5}, tasks=["vqa_count"])
    assert info.levels("vqa_count") == ["half"]
    for row in info.candidate_attributes("vqa_count", "half"):
        assert sum(row["hard"]) == 4
        hard = [a for a, h in zip(row["candidates"], row["hard"]) if h]
        assert all(n_differing(a, row["truth"]) == 1 for a in hard)


# --------------------------------------------------------------------------------------------------
# Pixels agree with the attributes (candidate 0 is the positive)


def test_classification_and_count_images_match_their_answers(generated):
    info, _, _ = generated
    for task in ["cls_object", "vqa_count"]:
        for rec, row in eval_rows(info, task):
            blobs = object_components(pixels(info.root / rec["qry_img_path"]))
            assert len(blobs) == row["truth"].get("count", 1)
            assert {b[0] for b in blobs} == {COLORS[row["truth"]["color"]]}
            assert row["truth"]["color"] in rec["tgt_text"][0]


def test_retrieval_images_match_their_captions(generated):
    info, _, _ = generated
    for rec, row in eval_rows(info, "ret_t2i"):
        for rel, attrs in zip(rec["tgt_img_path"], row["candidates"]):
            blobs = object_components(pixels(info.root / rel))
            seen = sorted((cell_of(centroid), colour) for colour, _, centroid in blobs)
            expected = [(attrs[f"position_{i}"], COLORS[attrs[f"color_{i}"]]) for i in (1, 2)]
            assert seen == sorted(expected)


def test_grounding_positive_is_the_referred_cell_of_the_query_image(generated):
    info, _, _ = generated
    edges = [round(k * 84 / 3) for k in range(4)]
    for rec, row in eval_rows(info, "grd_position"):
        position = next(p for p in POSITION_WORDS if rec["qry_text"].endswith(p))
        r, c = divmod(POSITION_WORDS.index(position), 3)
        query = Image.open(info.root / rec["qry_img_path"]).convert("RGB")
        crop = query.crop((edges[c], edges[r], edges[c + 1], edges[r + 1]))
        assert same_pixels(crop.resize((84, 84), Image.NEAREST),
                           pixels(info.root / rec["tgt_img_path"][0]))
        for rel, attrs in zip(rec["tgt_img_path"], row["candidates"]):
            colours = [b[0] for b in object_components(pixels(info.root / rel))]
            assert colours == [COLORS[attrs["color"]]]


def test_train_negatives_are_one_attribute_off(generated):
    info, records, _ = generated
    labels = {lab["image_path"]: lab for lab in info.labels()}
    for rec in records["grd_position.jsonl"]:
        pos, neg = labels[rec["pos_image_path"]], labels[rec["neg_image_path"]]
        assert sum(pos[k] != neg[k] for k in ("shape", "color", "size")) == 1
    for rec in records["cls_object.jsonl"]:
        assert len(set(rec["neg_text"].split()) ^ set(rec["pos_text"].split())) == 2


# --------------------------------------------------------------------------------------------------
# Manifest, labels, vocabulary


def test_manifest_describes_the_folder(generated):
    info, _, _ = generated
    loaded = load_manifest(info.root / "manifest.json")
    assert loaded.manifest == info.manifest and loaded.manifest["seed"] == TINY["seed"]
    meta_tasks = {info.meta_task(t) for t in info.tasks}
    assert meta_tasks == {"classification", "vqa", "retrieval", "grounding"}
    assert info.tasks_of("retrieval") == ["ret_i2t", "ret_t2i"]
    for task in info.tasks:
        assert len(jsonl(info.train_path(task))) == info.task(task)["n_train"] == TINY["n_train"]
        for level in info.levels(task):
            assert len(jsonl(info.eval_path(task, level))) == TINY["n_eval"]
    assert len(info.train_dataset()) == info.manifest["counts"]["train_pairs"]
    pngs = {str(p.relative_to(info.root)) for p in info.root.rglob("*.png")}
    assert {lab["image_path"] for lab in info.labels()} == pngs
    assert info.vocabulary() == scenes_vocabulary()
    by_default_root = TrainPairDataset(info.train_path("ret_t2i"))  # finds the folder's manifest
    assert by_default_root.image_root == info.root
    assert by_default_root[0]["pos_image"].size == (84, 84)  # the default image size


def test_labels_match_pixels(generated):
    info, _, _ = generated
    for lab in info.labels()[:200]:
        blobs = object_components(pixels(info.root / lab["image_path"]))
        assert len(blobs) == lab["count"]
        assert sorted(b[0] for b in blobs) == sorted(COLORS[o["color"]] for o in lab["objects"])
        if lab["kind"] == "scene":
            cells = sorted(cell_of(centroid) for _, _, centroid in blobs)
            assert cells == sorted(o["position"] for o in lab["objects"])


def all_texts(record: dict) -> list[str]:
    fields = ["qry", "pos_text", "neg_text", "qry_text"]
    return [t for t in [record.get(f) for f in fields] + record.get("tgt_text", []) if t]


def test_vocabulary_covers_every_text(generated, digits_folder):
    info, records, _ = generated
    texts = [t for rows in records.values() for r in rows for t in all_texts(r)]
    rng = np.random.default_rng(0)
    for task in scenes.TASKS.values():  # every value of every attribute, not only those sampled
        example = task.sample(rng)
        texts.append(example.query_text)
        for key, values in task.space.items():
            texts += [task.target({**example.truth, key: v}, example, rng)[0] for v in values]
    texts += [scenes.QUERIES[q].format(position=p)
              for q in ("what", "ground") for p in POSITION_WORDS]
    for task in digits_folder.tasks:
        texts += [t for r in read_records(digits_folder.eval_path(task, "random"), "eval")
                  for t in all_texts(r)]
    vocabulary = set(scenes_vocabulary())
    for text in texts:
        bare = text.replace("<|image_1|>", "")
        assert re.fullmatch(r"[a-z ]+", bare), text
        assert set(bare.split()) <= vocabulary, text
    assert set(digits_folder.vocabulary()) <= vocabulary


# --------------------------------------------------------------------------------------------------
# Parameters, reuse, atomic output


def test_impossible_hard_list_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="cls_object.*only 9"):  # 3 shapes + 5 colours + 1 size
        make_scenes_dataset(tmp_path / "x", n_train=1, n_eval=1, num_candidates=11,
                            tasks=["cls_object"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(n_train=0), dict(num_candidates=1), dict(tasks=["nope"]),
                                 dict(hard_fractions={"hard": 1.5}), dict(image_size=8)])
def test_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        make_scenes_dataset(tmp_path / "x", **{**TINY, **bad})


def test_reuse_same_parameters_refuse_others_unless_overwrite(tmp_path):
    kwargs = dict(n_train=1, n_eval=1, tasks=["vqa_count"])
    info = make_scenes_dataset(tmp_path / "s", **kwargs)
    stamp = (info.root / "manifest.json").stat().st_mtime_ns
    assert make_scenes_dataset(tmp_path / "s", **kwargs).manifest == info.manifest
    assert (info.root / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="overwrite"):
        make_scenes_dataset(tmp_path / "s", **kwargs, seed=1)
    again = make_scenes_dataset(tmp_path / "s", **kwargs, seed=1, overwrite=True)
    assert again.manifest["seed"] == 1 and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_write_records_is_atomic(tmp_path):
    path = write_records(tmp_path / "t.jsonl", [{"a": 1}])
    with pytest.raises(TypeError):
        write_records(path, [{"a": 2}, {"a": object()}])
    assert jsonl(path) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]
    with pytest.raises(ValueError, match="record 1: missing column 'pos_text'"):
        write_records(tmp_path / "u.jsonl", [{"qry": "q", "qry_image_path": ""}], kind="train")
    assert not (tmp_path / "u.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# Bad input: file and line in every message


def make_images(root: Path) -> None:
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "ok.png")
    (root / "garbage.png").write_bytes(b"not an image at all")
    full = (root / "ok.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])


def train_line(**overrides) -> str:
    record = {"qry": "<|image_1|> q", "qry_image_path": "ok.png", "pos_text": "p",
              "pos_image_path": ""}
    return json.dumps({**record, **overrides})


def eval_line(**overrides) -> str:
    record = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"],
              "tgt_img_path": ["", "ok.png"]}
    return json.dumps({**record, **overrides})


def without(line: str, column: str) -> str:
    record = json.loads(line)
    del record[column]
    return json.dumps(record)


TRAIN_CASES = {  # message (a regex) -> (bad line, error type)
    "malformed JSON": ("{not json", ValueError),
    "missing column 'pos_text'": (without(train_line(), "pos_text"), ValueError),
    "image not found": (train_line(qry_image_path="missing.png"), FileNotFoundError),
    "unreadable image": (train_line(qry_image_path="garbage.png"), ValueError),
    "unreadable image .*truncated": (train_line(pos_image_path="truncated.png"), ValueError),
    "must be a string": (train_line(pos_text=3), ValueError),
    "neither text nor image": (train_line(qry="", qry_image_path=None), ValueError),
    "expected a JSON object": ("[1, 2]", ValueError),
}
EVAL_CASES = {
    "missing column 'tgt_img_path'": (without(eval_line(), "tgt_img_path"), ValueError),
    "must be a non-empty list": (eval_line(tgt_text="a"), ValueError),
    "2 items but tgt_img_path 1": (eval_line(tgt_img_path=[""]), ValueError),
    "candidate 1 has neither": (eval_line(tgt_text=["a", ""], tgt_img_path=["", None]), ValueError),
    "image not found": (eval_line(tgt_img_path=["", "gone.png"]), FileNotFoundError),
}
CASES = [("train", m) for m in TRAIN_CASES] + [("eval", m) for m in EVAL_CASES]


@pytest.mark.parametrize("kind, message", CASES)
def test_bad_record_names_file_and_line(tmp_path, kind, message):
    make_images(tmp_path)
    if kind == "train":
        (line, error), good, dataset = TRAIN_CASES[message], train_line(), TrainPairDataset
    else:
        (line, error), good, dataset = EVAL_CASES[message], eval_line(), EvalDataset
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the bad record is on line 3
    with pytest.raises(error, match=f"{re.escape(str(path))}:3: .*{message}"):
        dataset(path, tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        skipping = dataset(path, tmp_path, on_error="skip")
    assert (len(skipping), skipping.skipped) == (2, 1)
    assert re.search(f":3: .*{message}", skipping.skip_reasons[0])


def test_parquet_errors_name_the_row(tmp_path):
    rows = [json.loads(train_line()), json.loads(without(train_line(), "pos_text"))]
    path = write_records(tmp_path / "d.parquet", rows)  # the missing value becomes a null
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: row 2: .*neither text nor"):
        read_records(path, "train")
    path = write_records(tmp_path / "e.parquet", rows[1:])  # now the column itself is missing
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: row 1: missing column"):
        read_records(path, "train")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(ValueError, match="broken.parquet: cannot read parquet"):
        read_records(tmp_path / "broken.parquet", "train")


def test_files_and_options_that_are_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_records(tmp_path / "nothing.jsonl", "train")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported format '.csv'"):
        read_records(tmp_path / "d.csv", "train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no usable records"):
        read_records(tmp_path / "empty.jsonl", "eval")
    (tmp_path / "bad.jsonl").write_text("{\n{\n")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="all 2 bad"):
        warnings.simplefilter("ignore")
        read_records(tmp_path / "bad.jsonl", "eval", on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        read_records(tmp_path / "bad.jsonl", "eval", on_error="ignore")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": "x",\n oops}')
    with pytest.raises(ValueError, match="manifest.json:2: malformed JSON"):
        load_manifest(tmp_path)


def test_image_deleted_after_loading_names_the_line(tmp_path):
    make_images(tmp_path)
    (tmp_path / "d.jsonl").write_text(train_line() + "\n" + train_line() + "\n")
    ds = TrainPairDataset(tmp_path / "d.jsonl", tmp_path)
    (tmp_path / "ok.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"d.jsonl:2: image not found"):
        ds[1]


# --------------------------------------------------------------------------------------------------
# Item and batch layouts


def test_collate_layouts(tmp_path):
    make_images(tmp_path)
    lines = [train_line(), train_line(neg_text="n", neg_image_path="ok.png"),
             train_line(neg_text=None, neg_image_path="")]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    pairs = TrainPairDataset(tmp_path / "t.jsonl", tmp_path)
    batch = next(iter(DataLoader(pairs, batch_size=3, collate_fn=collate_train_pairs)))
    assert batch["query_texts"] == ["<|image_1|> q"] * 3 and batch["pos_texts"] == ["p"] * 3
    assert all(isinstance(im, Image.Image) for im in batch["query_images"])
    assert batch["pos_images"] == [None] * 3 and batch["neg_texts"] == ["n"]
    assert np.asarray(batch["neg_images"][0])[0, 0].tolist() == [255, 0, 0]
    assert collate_train_pairs([pairs[0]])["neg_texts"] == []
    (tmp_path / "e.jsonl").write_text(eval_line() + "\n")
    batch = collate_eval(list(EvalDataset(tmp_path / "e.jsonl", tmp_path)))
    assert batch["query_texts"] == ["q"] and batch["query_images"] == [None]
    assert batch["candidate_texts"] == [["a", "b"]] and batch["candidate_images"][0][0] is None
    assert batch["candidate_images"][0][1].size == (8, 8)


def test_items_and_batches_have_exactly_their_typed_keys(tmp_path):
    make_images(tmp_path)
    (tmp_path / "t.jsonl").write_text(train_line() + "\n")
    (tmp_path / "e.jsonl").write_text(eval_line() + "\n")
    pair, candidates = TrainPairDataset(tmp_path / "t.jsonl")[0], EvalDataset(tmp_path / "e.jsonl")[0]
    assert set(pair) == data.TrainItem.__required_keys__
    assert set(collate_train_pairs([pair])) == data.TrainBatch.__required_keys__
    assert set(candidates) == data.EvalItem.__required_keys__
    assert set(collate_eval([candidates])) == data.EvalBatch.__required_keys__


# --------------------------------------------------------------------------------------------------
# Digits: a real image source


def test_digit_captions_match_sklearn_labels(digits_folder):
    from sklearn.datasets import load_digits

    digits, info = load_digits(), digits_folder
    words = "zero one two three four five six seven eight nine".split()
    reference = digits.images.reshape(len(digits.images), -1) * 255 / 16

    def digit_of(rel):  # the nearest sklearn digit to the image shrunk back to 8x8
        small = Image.open(info.root / rel).convert("L").resize((8, 8), Image.BOX)
        distances = ((reference - np.asarray(small, float).reshape(1, -1)) ** 2).sum(1)
        return digits.target[np.argmin(distances)]

    cls = read_records(info.eval_path("digits_cls", "random"), "eval")
    assert len(cls) + info.task("digits_cls")["n_train"] == len(digits.target)
    for rec in cls[::7]:
        assert rec["tgt_text"][0] == f"a handwritten digit {words[digit_of(rec['qry_img_path'])]}"
        assert len({t.split()[-1] for t in rec["tgt_text"]}) == 6
    for rec in read_records(info.eval_path("digits_t2i", "random"), "eval")[::11]:
        found = [words[digit_of(rel)] for rel in rec["tgt_img_path"]]
        assert found[0] == rec["qry_text"].split()[-1] and len(set(found)) == 6
    labels = info.labels()
    assert np.array_equal(np.bincount([lab["label"] for lab in labels]), np.bincount(digits.target))
    for lab in labels[::97]:
        assert digit_of(lab["image_path"]) == lab["label"]


# --------------------------------------------------------------------------------------------------
# The decoded-image cache


@pytest.fixture
def opens(monkeypatch):
    """A fresh 1 MiB image cache, and the paths PIL.Image.open is called with."""
    monkeypatch.setattr(data, "IMAGE_CACHE", data.ImageCache(2**20))
    calls, real_open = [], Image.open

    def counting_open(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return calls


def solid(path: Path, colour, size=(8, 8)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_an_image_is_decoded_once_per_process(tmp_path, opens):
    path = solid(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "d.jsonl").write_text(train_line(qry_image_path="a.png") + "\n")
    ds = TrainPairDataset(tmp_path / "d.jsonl", tmp_path)  # the up-front check decodes it
    items = [ds[0], ds[0], data.load_image(path)]
    assert opens == ["a.png"]
    assert all(pixels(path).tolist() == np.asarray(it).tolist()
               for it in (items[0]["query_image"], items[1]["query_image"], items[2]))
    assert items[0]["query_image"] is not items[1]["query_image"]
    assert (data.IMAGE_CACHE.hits, data.IMAGE_CACHE.misses) == (3, 1)


def test_a_rewritten_file_is_decoded_again(tmp_path, opens):
    path = solid(tmp_path / "a.png", (255, 0, 0))
    assert np.asarray(data.load_image(path))[0, 0].tolist() == [255, 0, 0]
    before = path.stat().st_mtime_ns
    solid(path, (0, 0, 255))  # same size and inode; the clock may not have ticked, so:
    os.utime(path, ns=(before + 10**9, before + 10**9))
    assert np.asarray(data.load_image(path))[0, 0].tolist() == [0, 0, 255]
    assert opens == ["a.png", "a.png"] and len(data.IMAGE_CACHE) == 1  # the old entry is gone
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"here:3: image not found: {re.escape(str(path))}"):
        data.load_image(path, "here:3")


def test_the_budget_evicts_least_recently_used_images(tmp_path, opens):
    one_image = 8 * 8 * 4  # RGB is stored 4 bytes a pixel
    data.IMAGE_CACHE.set_budget(2 * one_image)
    a, b, c = (solid(tmp_path / f"{n}.png", (i, 0, 0)) for i, n in enumerate("abc"))
    for path in (a, b, a, c):  # a was used after b, so c pushes b out
        data.load_image(path)
    assert opens == ["a.png", "b.png", "c.png"] and data.IMAGE_CACHE.nbytes == 2 * one_image
    for path in (a, c, b):
        data.load_image(path)
    assert opens == ["a.png", "b.png", "c.png", "b.png"]  # b was decoded again, evicting a
    data.load_image(solid(tmp_path / "big.png", (0, 0, 0), size=(32, 32)))  # over the budget
    assert len(data.IMAGE_CACHE) == 2 and data.IMAGE_CACHE.nbytes == 2 * one_image
    data.IMAGE_CACHE.set_budget(one_image)  # shrinking evicts too
    assert len(data.IMAGE_CACHE) == 1


def test_zero_budget_disables_the_cache(tmp_path, opens, monkeypatch):
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, "0")
    monkeypatch.setattr(data, "IMAGE_CACHE", data.ImageCache.from_environment())
    path = solid(tmp_path / "a.png", (255, 0, 0))
    data.load_image(path), data.load_image(path)
    assert opens == ["a.png", "a.png"] and len(data.IMAGE_CACHE) == 0
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, "1.5")
    assert data.ImageCache.from_environment().max_bytes == 3 * 2**19
    monkeypatch.delenv(data.IMAGE_CACHE_ENV)
    assert data.ImageCache.from_environment().max_bytes == 512 * 2**20
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(data.IMAGE_CACHE_ENV, bad)
        with pytest.raises(ValueError, match="LLAVE_KIT_IMAGE_CACHE_MB"):
            data.ImageCache.from_environment()


def test_changing_a_loaded_image_does_not_change_the_next_one(tmp_path, opens):
    path = solid(tmp_path / "a.png", (255, 0, 0))
    first = data.load_image(path)
    first.paste((0, 255, 0), (0, 0, 8, 8))
    first.info["scribbled"] = True
    second = data.load_image(path)
    assert np.asarray(second)[0, 0].tolist() == [255, 0, 0] and "scribbled" not in second.info
    assert opens == ["a.png"]


def test_cached_loads_keep_their_error_messages(tmp_path, opens):
    make_images(tmp_path)
    for name, error, message in [("missing.png", FileNotFoundError, "image not found: "),
                                 ("garbage.png", ValueError, "unreadable image "),
                                 ("truncated.png", ValueError, "unreadable image ")]:
        for _ in range(2):  # a failed decode is not cached
            expected = f"^d.jsonl:7: {message}{re.escape(str(tmp_path / name))}"
            with pytest.raises(error, match=expected):
                data.load_image(tmp_path / name, "d.jsonl:7")
    assert len(data.IMAGE_CACHE) == 0
