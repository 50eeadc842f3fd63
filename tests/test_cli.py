"""The command line as a user runs it: `python -m llave_kit <command>` in a subprocess, on tiny
inputs (a few scenes, two training steps); the KEY=VALUE and config readers in process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llave_kit.cli import UsageError, load_config, parse_assignments, run
from llave_kit.scenes import make_scenes_dataset

SCENES = dict(n_train=8, n_eval=4, num_candidates=4, tasks=["cls_object", "vqa_count"], seed=3)


def llave_kit(*args, module: str = "llave_kit") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "scenes"
    done = llave_kit("make-data", "scenes", out, "--n-train", 8, "--n-eval", 4,
                     "--num-candidates", 4, "--tasks", "cls_object", "vqa_count", "--seed", 3)
    return out, done


@pytest.fixture
def config(tmp_path, scenes):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: tiny-dual\ndata: {scenes[0]}\noutput_dir: {tmp_path / 'run'}\n"
                    "batch_size: 4\nmax_steps: 5\nlr: 1e-3\n")
    return path


def test_help_lists_every_command():
    done = llave_kit("--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "make-data", "describe-mmeb", "run-pipeline", "pretrain"):
        assert command in done.stdout


def test_make_data_scenes_writes_what_the_function_writes(scenes, tmp_path):
    out, done = scenes
    assert done.returncode == 0, done.stderr
    reference = make_scenes_dataset(tmp_path / "reference", **SCENES)
    assert json.loads(done.stdout) == reference.manifest["counts"]
    assert (out / "manifest.json").read_bytes() == (reference.root / "manifest.json").read_bytes()


def test_make_data_digits(tmp_path):
    done = llave_kit("make-data", "digits", tmp_path / "digits", "--train-fraction", 0.2,
                     "--num-candidates", 3, "--image-size", 16, "--seed", 1)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    assert manifest["parameters"] == {"train_fraction": 0.2, "num_candidates": 3,
                                      "image_size": 16, "seed": 1}
    assert json.loads(done.stdout) == manifest["counts"]


@pytest.mark.parametrize("module, command", [("llave_kit", ["train"]), ("llave_kit.train", [])])
def test_train_two_steps_by_either_entry_point(config, tmp_path, module, command):
    """`python -m llave_kit.train` is what torchrun launches; it is the same `train` command."""
    done = llave_kit(*command, "--config", config, "max_steps=2", "alpha=3", module=module)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_steps"], saved["alpha"], saved["model"]) == (2, 3.0, "tiny-dual")
    assert (out / "checkpoints" / "step_00000002").is_dir()
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "{config}", "max_steps"], "'max_steps' is not KEY=VALUE"),
    (["train", "--config", "{config}", "bogus=1"], "unknown TrainConfig keys: bogus"),
    (["train", "--config", "{config}", "batch_size=[4,"], "the value is not YAML"),
    (["train", "--config", "{config}", "resume=maybe"],
     "resume must be true or false, got 'maybe' (type str; expected bool)"),
    (["train", "--config", "{config}", 'loss_kwargs={{symmetric: "no"}}'],
     "loss_kwargs.symmetric must be true or false, got 'no'"),
    (["train", "--config", "{tmp}/missing.yaml"], "missing.yaml: No such file"),
    (["run-pipeline", "{config}", "--set", "seeds"], "'seeds' is not KEY=VALUE"),
    (["make-data", "scenes", "{scenes}", "--n-train", "9"], "exists and is not empty"),
])
def test_a_user_error_prints_one_line_and_exits_2(args, message, config, scenes, tmp_path):
    paths = {"config": config, "tmp": tmp_path, "scenes": scenes[0]}
    done = llave_kit(*(arg.format(**paths) for arg in args))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert message in done.stderr


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_config_that_does_not_fit_the_run_prints_one_line_exits_2_and_leaves_the_run(config,
                                                                                       tmp_path):
    """`overwrite: "false"` (a string, so truthy) used to delete the run it was meant to keep;
    train()'s own refusals (a run already there, a resume with another loss, fp16 on a CPU) used
    to end in a traceback."""
    done = llave_kit("train", "--config", config, "max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    before = snapshot(tmp_path / "run")
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text(config.read_text() + 'overwrite: "false"\n')
    cases = [
        ([quoted, "max_steps=2"], "overwrite must be true or false, got 'false'"),
        ([config, "max_steps=2"], "already holds a run; pass resume=True"),
        ([config, "max_steps=4", "resume=true", "loss=info_nce"],
         "changed config: loss='hardness_weighted' -> 'info_nce'"),
        ([config, "overwrite=true", "precision=fp16", "device=cpu"], "precision='fp16' needs CUDA"),
    ]
    for args, message in cases:
        done = llave_kit("train", "--config", *args)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
        assert message in done.stderr
        assert snapshot(tmp_path / "run") == before


def test_a_run_stopped_by_a_non_finite_gradient_prints_one_line_and_exits_1(config):
    done = llave_kit("train", "--config", config, "temperature=1e-30")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert errors[0].startswith("error: non-finite gradient norm (inf) at step 1; the step was not "
                                "applied. No checkpoint was saved before it")


# --------------------------------------------------------------------------------------------------
# In process: KEY=VALUE, the training config


def test_assignments_are_read_as_yaml():
    parsed = parse_assignments(["steps=50", "alpha=0.5", "lr=1e-3", "seeds=[0, 1]", "name=x=y",
                                "loss_kwargs={symmetric: false}", "save_every=", "steps=60"])
    assert parsed == {"steps": 60, "alpha": 0.5, "lr": "1e-3", "seeds": [0, 1], "name": "x=y",
                      "loss_kwargs": {"symmetric": False}, "save_every": None}
    for bad in ["steps", "=3", " =3", "seeds=[0,"]:
        with pytest.raises(UsageError):
            parse_assignments([bad])


def test_config_file_errors_name_the_file(tmp_path):
    cases = {"not_yaml.yaml": ("a: [1,\n", "not valid YAML"),
             "a_list.yaml": ("- 1\n", "expected a mapping of TrainConfig fields, got list")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=f"{name}: {message}"):
            load_config(tmp_path / name)
    (tmp_path / "empty.yaml").write_text("")  # every field at its default
    with pytest.raises(UsageError, match="batch_size must be an integer, got 'abc'"):
        load_config(tmp_path / "empty.yaml", ["batch_size=abc"])


def test_main_reads_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("loss: info_nce\nlr: 1e-3\nbatch_size: 4\n")
    cfg = load_config(path, ["max_steps=7", "loss_kwargs={symmetric: false}"])
    assert (cfg.loss, cfg.lr, cfg.batch_size, cfg.max_steps) == ("info_nce", 1e-3, 4, 7)
    assert cfg.loss_kwargs == {"symmetric": False}
    with pytest.raises(ValueError, match="set `model`"):
        run(["train", "--config", str(path)])
    with pytest.raises(ValueError, match="unknown TrainConfig keys: bogus"):
        load_config(path, ["bogus=1"])
