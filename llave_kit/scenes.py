"""Compositional scenes: a seeded offline generator of MMEB-style tasks with natural hard negatives.

An image (default 84x84 RGB) is a 3x3 grid of cells on a dark background; each object sits in its
own cell and has a shape (4), a colour (6), a size (2) and a position (its cell). The values are few
and distinct on purpose: small models must be able to learn every attribute (with 7 shapes, 8
colours and 3 sizes at 56 px, small CNN and LMM embedders stayed near chance on the hard lists),
while a hard candidate one attribute off stays hard. Objects are drawn with PIL
without anti-aliasing, so every object pixel has exactly its colour's RGB value. Six tasks mirror
MMEB's four meta-tasks:

    task          meta-task       query                                  target
    cls_object    classification  one object + instruction               "a small red circle"
    vqa_count     vqa             1-4 alike objects + question           "three red circles"
    vqa_position  vqa             2-4 objects + "what is in the top left"  "a small red circle"
    ret_i2t       retrieval       two objects + instruction              caption of both objects
    ret_t2i       retrieval       caption                                image
    grd_position  grounding       2-4 objects + referring expression     crop of the object's cell

What a target shows is a flat dict of attributes, the task's *answer*: e.g. {"size": "small",
"color": "red", "shape": "circle"}. A hard candidate differs from the truth in exactly one attribute
(one key); a random candidate is drawn uniformly from the task's attribute space. `hard_fraction`
sets the share of a list's negatives that are hard. `make_scenes_dataset` writes one eval file per
hardness level (default "hard" = 1.0 and "random" = 0.0), all levels sharing queries and positives,
and a `<file>.attributes.jsonl` beside each with every candidate's attributes.

Write one: llave-kit make-data scenes OUT_DIR [--seed 0] [--n-train 500] [--n-eval 200]
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from string import Formatter

import numpy as np
from PIL import Image, ImageDraw

from llave_kit.data import (
    IMAGE_PLACEHOLDER,
    INSTRUCTIONS,
    MANIFEST_VERSION,
    DatasetInfo,
    existing_dataset,
    load_manifest,
    text_words,
    write_manifest,
    write_records,
)
from llave_kit.digits import DIGIT_CAPTION, DIGIT_WORDS
from llave_kit.files import staged_directory, write_text

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (240, 220, 40), "purple": (150, 60, 200), "white": (240, 240, 240),
}
SIZES = {"small": 0.55, "large": 1.0}  # radius, as a share of the largest that fits
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # cells in row-major order
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
BACKGROUND = (28, 28, 28)

QUERIES = {
    "count": f"{IMAGE_PLACEHOLDER} how many objects are there and what are they",
    "what": IMAGE_PLACEHOLDER + " what is in the {position}",
    "ground": IMAGE_PLACEHOLDER
    + " select the portion of the image that shows the object in the {position}",
}
OBJECT_PHRASE = "a {size} {color} {shape}"
COUNT_PHRASE = "{count} {color} {shape}"
PLACED_PHRASE = "{object} in the {position}"
CAPTION_JOINER = " and "


# --------------------------------------------------------------------------------------------------
# Scenes and rendering


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: int  # cell index 0..8, row-major
    offset: tuple[float, float] = (0.0, 0.0)  # jitter inside the cell, in units of the free room


@dataclass(frozen=True)
class ImageSpec:
    """What to draw: objects, and the cell to crop and scale back up (grounding targets)."""

    objects: tuple[SceneObject, ...]
    crop: int | None = None


def cell_box(position: int, image_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel bounds of a cell, right/bottom exclusive."""
    row, col = divmod(position, 3)
    edges = [round(k * image_size / 3) for k in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon of a shape inside the unit circle (y points down)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.9, 0.75), (-0.9, 0.75)]
    if shape == "cross":
        a, b = 0.33, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int) -> None:
    left, top, right, bottom = cell_box(obj.position, image_size)
    # Objects keep one background pixel to their cell's border, so objects never touch and a
    # cell's crop holds exactly its own object.
    radius = SIZES[obj.size] * (image_size // 3 / 2 - 1.5)
    room = min(right - left, bottom - top) / 2 - radius - 1.5  # how far the centre may move
    cx = (left + right - 1) / 2 + obj.offset[0] * room
    cy = (top + bottom - 1) / 2 + obj.offset[1] * room
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        points = [(cx + radius * x, cy + radius * y) for x, y in _outline(obj.shape)]
        draw.polygon(points, fill=fill)


def render(spec: ImageSpec, image_size: int) -> Image.Image:
    """Draw a scene; a crop spec returns its cell scaled (nearest) to image_size x image_size."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in spec.objects:
        _draw_object(draw, obj, image_size)
    if spec.crop is None:
        return image
    cell = image.crop(cell_box(spec.crop, image_size))
    return cell.resize((image_size, image_size), Image.NEAREST)


# --------------------------------------------------------------------------------------------------
# Tasks: sample a query with its true answer; turn any answer into a target (text or image)


@dataclass
class Example:
    query_text: str
    query_image: ImageSpec | None
    truth: dict  # the answer's attributes
    referred: SceneObject | None = None  # the object a position question or expression points at


@dataclass(frozen=True)
class Task:
    name: str
    meta_task: str
    space: dict  # attribute -> allowed values
    sample: Callable[[np.random.Generator], Example]
    target: Callable[[dict, Example, np.random.Generator], tuple[str, ImageSpec | None]]
    valid: Callable[[dict], bool] = lambda attrs: True


def _pick(rng: np.random.Generator, values):
    values = tuple(values)
    return values[rng.integers(len(values))]


def _offset(rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))


def _random_objects(rng: np.random.Generator, count: int) -> tuple[SceneObject, ...]:
    cells = sorted(int(c) for c in rng.choice(9, size=count, replace=False))
    return tuple(SceneObject(_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES), cell,
                             _offset(rng)) for cell in cells)


def _object_attrs(obj: SceneObject) -> dict:
    return {"size": obj.size, "color": obj.color, "shape": obj.shape}


def _object_phrase(attrs: dict) -> str:
    return OBJECT_PHRASE.format(**attrs)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _count_phrase(attrs: dict) -> str:
    count = attrs["count"]
    shape = attrs["shape"] if count == 1 else plural(attrs["shape"])
    return COUNT_PHRASE.format(count=NUMBER_WORDS[count], color=attrs["color"], shape=shape)


def _text_target(phrase: Callable[[dict], str]):
    return lambda attrs, example, rng: (phrase(attrs), None)


OBJECT_SPACE = {"size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES}
COUNT_SPACE = {"count": tuple(NUMBER_WORDS), "color": tuple(COLORS), "shape": SHAPES}


def _sample_cls(rng):
    (obj,) = _random_objects(rng, 1)
    return Example(INSTRUCTIONS["classify"], ImageSpec((obj,)), _object_attrs(obj))


def _sample_count(rng):
    count, color, shape = _pick(rng, NUMBER_WORDS), _pick(rng, COLORS), _pick(rng, SHAPES)
    objects = tuple(replace(o, color=color, shape=shape) for o in _random_objects(rng, count))
    truth = {"count": count, "color": color, "shape": shape}
    return Example(QUERIES["count"], ImageSpec(objects), truth)


def _referring_sampler(query: str):
    def sample(rng):
        objects = _random_objects(rng, int(rng.integers(2, 5)))
        referred = objects[rng.integers(len(objects))]
        text = query.format(position=POSITIONS[referred.position])
        return Example(text, ImageSpec(objects), _object_attrs(referred), referred)

    return sample


def _crop_target(attrs, example, rng):
    """The referred cell, drawn with the candidate's object in the referred object's place."""
    obj = replace(example.referred, **attrs)
    return INSTRUCTIONS["crop_target"], ImageSpec((obj,), crop=obj.position)


# Retrieval scenes hold two objects listed in reading order (position_1 before position_2), so
# that every scene has exactly one attribute dict and one caption.
PAIR_SPACE = {f"{key}_{i}": values for i in (1, 2)
              for key, values in {**OBJECT_SPACE, "position": POSITIONS}.items()}


def _pair_valid(attrs: dict) -> bool:
    return POSITIONS.index(attrs["position_1"]) < POSITIONS.index(attrs["position_2"])


def _pair_objects(attrs: dict, rng) -> tuple[SceneObject, ...]:
    return tuple(SceneObject(attrs[f"shape_{i}"], attrs[f"color_{i}"], attrs[f"size_{i}"],
                             POSITIONS.index(attrs[f"position_{i}"]), _offset(rng))
                 for i in (1, 2))


def caption(attrs: dict) -> str:
    """"a small red circle in the top left and a large blue cross in the center"."""
    parts = []
    for i in (1, 2):
        obj = _object_phrase({key: attrs[f"{key}_{i}"] for key in OBJECT_SPACE})
        parts.append(PLACED_PHRASE.format(object=obj, position=attrs[f"position_{i}"]))
    return CAPTION_JOINER.join(parts)


def _retrieval_sampler(image_query: bool):
    def sample(rng):
        truth = random_attributes(rng, TASKS["ret_i2t"])
        if image_query:
            image = ImageSpec(_pair_objects(truth, rng))
            return Example(INSTRUCTIONS["caption_image"], image, truth)
        return Example(INSTRUCTIONS["find_image"].format(caption=caption(truth)), None, truth)

    return sample


def _image_target(attrs, example, rng):
    return INSTRUCTIONS["image_target"], ImageSpec(_pair_objects(attrs, rng))


def _make_tasks() -> dict[str, Task]:
    what, ground = _referring_sampler(QUERIES["what"]), _referring_sampler(QUERIES["ground"])
    object_text = _text_target(_object_phrase)
    tasks = [
        Task("cls_object", "classification", OBJECT_SPACE, _sample_cls, object_text),
        Task("vqa_count", "vqa", COUNT_SPACE, _sample_count, _text_target(_count_phrase)),
        Task("vqa_position", "vqa", OBJECT_SPACE, what, object_text),
        Task("ret_i2t", "retrieval", PAIR_SPACE, _retrieval_sampler(True), _text_target(caption),
             _pair_valid),
        Task("ret_t2i", "retrieval", PAIR_SPACE, _retrieval_sampler(False), _image_target,
             _pair_valid),
        Task("grd_position", "grounding", OBJECT_SPACE, ground, _crop_target),
    ]
    return {t.name: t for t in tasks}


TASKS = _make_tasks()


# --------------------------------------------------------------------------------------------------
# Candidates: truth first, then hard (one attribute off) and random negatives, shuffled


def random_attributes(rng: np.random.Generator, task: Task) -> dict:
    """A uniform draw from the task's attribute space (rejecting invalid combinations)."""
    while True:
        attrs = {key: _pick(rng, values) for key, values in task.space.items()}
        if task.valid(attrs):
            return attrs


def one_attribute_off(truth: dict, task: Task) -> list[dict]:
    """Every valid answer that differs from `truth` in exactly one attribute."""
    variants = ({**truth, key: value} for key, values in task.space.items()
                for value in values if value != truth[key])
    return [v for v in variants if task.valid(v)]


def candidate_attributes(rng, task: Task, truth: dict, num_candidates: int, hard_fraction: float):
    """[(attrs, is_hard)] of length num_candidates: the truth, then distinct negatives, shuffled.

    round(hard_fraction * (num_candidates - 1)) negatives are one attribute off, the rest random.
    """
    n_hard = round(hard_fraction * (num_candidates - 1))
    pool = one_attribute_off(truth, task)
    if n_hard > len(pool):
        raise ValueError(f"task {task.name}: hard_fraction {hard_fraction} needs {n_hard} "
                         f"one-attribute-off candidates but only {len(pool)} exist; lower "
                         f"num_candidates or hard_fraction")
    negatives = [(pool[i], True) for i in rng.choice(len(pool), size=n_hard, replace=False)]
    seen = [truth] + [attrs for attrs, _ in negatives]
    for _ in range(1000 * num_candidates):
        if len(negatives) == num_candidates - 1:
            break
        attrs = random_attributes(rng, task)
        if attrs not in seen:
            seen.append(attrs)
            negatives.append((attrs, False))
    else:
        raise ValueError(f"task {task.name}: cannot draw {num_candidates - 1} distinct negatives")
    return [(truth, False)] + [negatives[i] for i in rng.permutation(len(negatives))]


# --------------------------------------------------------------------------------------------------
# Writing a data set folder


def image_labels(spec: ImageSpec) -> dict:
    """kind, count, the shape/color/size every object shares (else null), and the objects."""
    objects = [o for o in spec.objects if spec.crop is None or o.position == spec.crop]
    shared = {}
    for key in ("shape", "color", "size"):
        values = {getattr(o, key) for o in objects}
        shared[key] = values.pop() if len(values) == 1 else None
    listed = [{**_object_attrs(o), "position": POSITIONS[o.position]} for o in objects]
    kind = "scene" if spec.crop is None else "crop"
    return {"kind": kind, "count": len(objects), **shared, "objects": listed}


class _ImageWriter:
    """Renders ImageSpecs to PNG files under a root and keeps each image's labels."""

    def __init__(self, root: Path, image_size: int):
        self.root, self.image_size, self.labels = root, image_size, []

    def folder(self, split: str, task: str) -> Callable[[ImageSpec | None, str, str], str]:
        """write(spec, name, role) -> "images/<split>/<task>/<name>.png" ("" for no image)."""
        def write(spec: ImageSpec | None, name: str, role: str) -> str:
            return self.write(spec, f"images/{split}/{task}/{name}.png", split, task, role)

        return write

    def write(self, spec: ImageSpec | None, rel: str, split: str, task: str, role: str) -> str:
        if spec is None:
            return ""
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        render(spec, self.image_size).save(self.root / rel, format="PNG")
        labels = {"image_path": rel, "split": split, "task": task, "role": role}
        self.labels.append({**labels, **image_labels(spec)})
        return rel


def _train_records(task: Task, rng, n: int, negatives: bool, images: _ImageWriter) -> list[dict]:
    write, records = images.folder("train", task.name), []
    for i in range(n):
        example = task.sample(rng)
        text, spec = task.target(example.truth, example, rng)
        record = {"qry": example.query_text,
                  "qry_image_path": write(example.query_image, f"{i:05d}_q", "query"),
                  "pos_text": text, "pos_image_path": write(spec, f"{i:05d}_pos", "positive")}
        if negatives:
            attrs = _pick(rng, one_attribute_off(example.truth, task))
            neg_text, neg_spec = task.target(attrs, example, rng)
            record["neg_text"] = neg_text
            record["neg_image_path"] = write(neg_spec, f"{i:05d}_neg", "negative")
        records.append(record)
    return records


def _eval_records(task: Task, rngs: dict, params: dict, images: _ImageWriter):
    """{level: eval records}, {level: attribute rows}; every level shares queries and positives."""
    write, levels = images.folder("eval", task.name), params["hard_fractions"]
    records, attributes = {level: [] for level in levels}, {level: [] for level in levels}
    for i in range(params["n_eval"]):
        example = task.sample(rngs["query"])
        query_image = write(example.query_image, f"{i:05d}_q", "query")
        pos_text, pos_spec = task.target(example.truth, example, rngs["query"])
        texts, paths = [pos_text], [write(pos_spec, f"{i:05d}_pos", "positive")]
        for level, fraction in levels.items():
            candidates = candidate_attributes(rngs[level], task, example.truth,
                                              params["num_candidates"], fraction)
            targets = [task.target(attrs, example, rngs[level]) for attrs, _ in candidates[1:]]
            records[level].append({
                "qry_text": example.query_text, "qry_img_path": query_image,
                "tgt_text": texts + [text for text, _ in targets],
                "tgt_img_path": paths + [write(spec, f"{i:05d}_{level}_{j:02d}", "candidate")
                                         for j, (_, spec) in enumerate(targets, 1)]})
            attributes[level].append({"truth": example.truth,
                                      "candidates": [attrs for attrs, _ in candidates],
                                      "hard": [hard for _, hard in candidates]})
    return records, attributes


def _task_rngs(seed: int, task_index: int, levels) -> dict:
    """Independent streams per task and purpose, so changing one size leaves the rest unchanged."""
    rngs = {"train": np.random.default_rng([seed, task_index, 0]),
            "query": np.random.default_rng([seed, task_index, 1])}
    for k, level in enumerate(levels):
        rngs[level] = np.random.default_rng([seed, task_index, 2, k])
    return rngs


def _write_task(stage: Path, t: int, task: Task, params: dict, images: _ImageWriter) -> dict:
    """Write one task's train and eval files; return its manifest entry."""
    rngs = _task_rngs(params["seed"], t, params["hard_fractions"])
    train = _train_records(task, rngs["train"], params["n_train"], params["train_hard_negatives"],
                           images)
    records, attributes = _eval_records(task, rngs, params, images)
    entry = {"meta_task": task.meta_task,
             "query_modality": _modality(train[0]["qry"], train[0]["qry_image_path"]),
             "target_modality": _modality(train[0]["pos_text"], train[0]["pos_image_path"]),
             "train": f"train/{task.name}.jsonl", "n_train": len(train),
             "eval": {}, "attributes": {}, "hard_fraction": dict(params["hard_fractions"]),
             "n_eval": params["n_eval"], "num_candidates": params["num_candidates"]}
    write_records(stage / entry["train"], train, kind="train")
    for level in params["hard_fractions"]:
        entry["eval"][level] = f"eval/{task.name}_{level}.jsonl"
        entry["attributes"][level] = f"eval/{task.name}_{level}.attributes.jsonl"
        write_records(stage / entry["eval"][level], records[level], kind="eval")
        write_records(stage / entry["attributes"][level], attributes[level])
    return entry


def _modality(text: str, image_path: str) -> str:
    """"image", "text" or "image+text": what a query or target carries besides instructions."""
    has_text = bool(text_words(text)) and text not in INSTRUCTIONS.values()
    parts = [m for m, present in (("image", bool(image_path)), ("text", has_text)) if present]
    return "+".join(parts)


def _check_parameters(params: dict) -> None:
    unknown = [t for t in params["tasks"] if t not in TASKS]
    if unknown or not params["tasks"]:
        raise ValueError(f"unknown or no tasks {unknown}; choose from {list(TASKS)}")
    minimum = {"n_train": 1, "n_eval": 1, "num_candidates": 2, "image_size": 24}
    for key, least in minimum.items():
        if not (isinstance(params[key], int) and params[key] >= least):
            raise ValueError(f"{key} must be an integer >= {least}, got {params[key]!r}")
    for level, fraction in params["hard_fractions"].items():
        if not (level.isidentifier() and 0 <= fraction <= 1):
            raise ValueError(f"hard_fractions: level names must be identifiers and fractions in "
                             f"[0, 1], got {level!r}: {fraction!r}")


def make_scenes_dataset(
    out_dir,
    *,
    n_train: int = 500,
    n_eval: int = 200,
    num_candidates: int = 8,
    hard_fractions: dict[str, float] | None = None,
    train_hard_negatives: bool = False,
    image_size: int = 84,
    tasks: list[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> DatasetInfo:
    """Write the compositional-scenes data set folder (layout in llave_kit.data) and describe it.

    Args:
        n_train: training pairs per task. n_eval: eval queries per task.
        num_candidates: candidates per eval list (the positive first).
        hard_fractions: {level: share of one-attribute-off negatives}; one eval file per level.
            Default {"hard": 1.0, "random": 0.0}.
        train_hard_negatives: give every training pair a one-attribute-off neg_text/neg_image_path.
        tasks: subset of TASKS (default all six). seed: same seed and parameters -> same bytes.
        overwrite: replace a folder holding something else. A folder made with the same
            parameters is reused as it is.
    """
    params = {"n_train": n_train, "n_eval": n_eval, "num_candidates": num_candidates,
              "hard_fractions": dict(hard_fractions or {"hard": 1.0, "random": 0.0}),
              "train_hard_negatives": train_hard_negatives, "image_size": image_size,
              "tasks": list(tasks or TASKS), "seed": seed}
    _check_parameters(params)
    if (info := existing_dataset(out_dir, "scenes", params, overwrite)) is not None:
        return info
    with staged_directory(out_dir, overwrite) as stage:
        images = _ImageWriter(stage, image_size)
        entries = {name: _write_task(stage, t, TASKS[name], params, images)
                   for t, name in enumerate(params["tasks"])}
        write_records(stage / "labels.jsonl", images.labels)
        write_text(stage / "vocabulary.txt", "\n".join(scenes_vocabulary()) + "\n")
        counts = {"train_pairs": sum(e["n_train"] for e in entries.values()),
                  "eval_queries": sum(e["n_eval"] for e in entries.values()),
                  "images": len(images.labels)}
        write_manifest(stage, {
            "name": "scenes", "version": MANIFEST_VERSION, "seed": seed, "parameters": params,
            "image_root": ".", "vocabulary": "vocabulary.txt", "labels": "labels.jsonl",
            "tasks": entries, "counts": counts})
    return load_manifest(out_dir)


def _template_words(template: str) -> list[str]:
    """Words of a str.format template, without its {fields}."""
    return [w for literal, *_ in Formatter().parse(template) for w in text_words(literal)]


def scenes_vocabulary() -> list[str]:
    """Sorted list of every word the built-in data sets can emit (scenes, digits, instructions).

    For the CPU default model's offline word-level tokenizer. Texts hold only lower-case words
    separated by spaces, plus the image placeholder, which is not a word.
    """
    templates = [*INSTRUCTIONS.values(), *QUERIES.values(), OBJECT_PHRASE, COUNT_PHRASE,
                 PLACED_PHRASE, CAPTION_JOINER, DIGIT_CAPTION]
    values = [*SHAPES, *map(plural, SHAPES), *COLORS, *SIZES, *POSITIONS, *NUMBER_WORDS.values(),
              *DIGIT_WORDS]
    words = {w for t in templates for w in _template_words(t)}
    return sorted(words | {w for v in values for w in v.split()})
