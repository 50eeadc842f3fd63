"""Training end to end on the real pieces: the tiny Qwen2-VL embedder, the scenes data, P@1.

Also launches `torchrun -m llave_kit.train` with two CPU processes, the path that initialises the
process group from torchrun's environment variables.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llave_kit.encoders import LmmEmbedder, default_model
from llave_kit.evaluation import evaluate_eval_set
from llave_kit.scenes import make_scenes_dataset
from llave_kit.train import TrainConfig, train

TASK = "cls_object"
NUM_CANDIDATES = 8


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes_dataset(tmp_path_factory.mktemp("data") / "scenes", n_train=256, n_eval=50,
                               num_candidates=NUM_CANDIDATES, tasks=[TASK], seed=0)


@pytest.fixture
def one_thread():
    # The tiny model's matmuls are too small to share: two threads on a busy 2-core machine ran
    # this test 5x slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_short_cpu_run_raises_p_at_1_above_start_and_chance(scenes, tmp_path, one_thread):
    """P@1 on 8-candidate lists (chance 1/8): 0.06 before, ~0.38 after 200 steps (~15 s)."""
    model = default_model("tiny-qwen2-vl", scenes.vocabulary(), hidden_size=32, seed=0)
    eval_set = scenes.eval_dataset(TASK, "random")

    def eval_fn(m):
        return {"p@1": evaluate_eval_set(m, eval_set, progress=False)["p@1"]}

    cfg = TrainConfig(output_dir=str(tmp_path / "run"), loss="hardness_weighted", alpha=9.0,
                      temperature=0.05, lr=1e-3, batch_size=32, max_steps=200, seed=0)
    result = train(cfg, model, scenes.train_dataset(), eval_fn=eval_fn)

    start, end = (result.eval_history[i]["p@1"] for i in (0, -1))
    assert [e["step"] for e in result.eval_history] == [0, 200]
    assert end > start + 0.15 and end > 3 / NUM_CANDIDATES, (start, end)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first - 1.0, (first, last)
    # final/ is the embedder's own save_pretrained folder and reloads to the same embeddings
    reloaded = LmmEmbedder.from_pretrained(result.final_model_path)
    item = eval_set[0]
    with torch.no_grad():
        expected = model.encode_queries([item["query_text"]], [item["query_image"]])
        torch.testing.assert_close(
            reloaded.encode_queries([item["query_text"]], [item["query_image"]]), expected)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this interpreter")
def test_torchrun_two_cpu_processes_train_from_a_yaml_config(scenes, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: tiny-qwen2-vl\ndata: {scenes.root}\noutput_dir: {out}\n"
                      "batch_size: 4\nmax_steps: 2\nlr: 1e-3\ntemperature: 0.05\n")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llave_kit.train",
         "--config", str(config), "alpha=3"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["alpha"] == 3.0
    assert len(state["rng"]) == 2  # every rank's RNG state, for an exact resume
    assert LmmEmbedder.from_pretrained(out / "final").embedding_dim == 128
