"""Study recipes: per-query scores, fine-tunes stored by recipe, and honest verdicts."""
import json

import numpy as np
import pytest

from llave_kit import studies
from llave_kit.analysis import overlap_metrics, similarity_stats
from llave_kit.evaluation import embed_eval_dataset
from llave_kit.studies import (
    QueryScores,
    arm_intervals,
    load_data,
    load_model,
    paper_readings,
    query_scores,
    stack_scores,
    train_arms,
)

FINETUNE = {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "temperature": 0.05, "device": "cpu"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_data("scenes", tmp_path_factory.mktemp("data") / "scenes", n_train=4, n_eval=6)


@pytest.fixture(scope="module")
def untrained(scenes):
    return query_scores(load_model("tiny-dual", scenes), scenes)


def test_query_scores_match_the_per_task_embeddings(scenes, untrained):
    model = load_model("tiny-dual", scenes)
    tasks = list(dict.fromkeys(untrained.task))
    assert tasks == scenes.tasks and len(untrained.hit) == 6 * len(tasks)
    first = untrained.task == tasks[0]
    queries, candidates = embed_eval_dataset(model, scenes.eval_dataset(tasks[0], "hard"),
                                             progress=False)
    scores = np.einsum("qd,qcd->qc", queries, candidates)
    expected_hit = (scores[:, 1:] < scores[:, :1]).all(axis=1)  # strictly above every negative
    np.testing.assert_array_equal(untrained.hit[first], expected_hit)
    np.testing.assert_allclose(untrained.positive[first], scores[:, 0], atol=1e-6)
    np.testing.assert_allclose(untrained.hard[first], -np.sort(-scores[:, 1:])[:, :5], atol=1e-6)


def test_hardest_failures_are_the_queries_a_wrong_candidate_beats_by_most(scenes):
    model = load_model("tiny-dual", scenes)
    task = scenes.tasks[0]
    dataset = scenes.eval_dataset(task, "hard")
    queries, candidates = embed_eval_dataset(model, dataset, progress=False)
    scores = np.einsum("qd,qcd->qc", queries, candidates)
    chosen = 1 + scores[:, 1:].argmax(axis=1)
    margins = scores[np.arange(len(scores)), chosen] - scores[:, 0]
    failures = studies.hardest_failures(model, scenes, task, n=3)
    expected = -np.sort(-margins[margins >= 0])[:3]
    assert len(failures) == len(expected) > 0
    for failure, margin in zip(failures, expected):
        assert failure["margin"] == pytest.approx(margin, abs=1e-6)
        q = int(np.argmin(np.abs(margins - margin)))
        item = dataset[q]
        assert failure["chosen_text"] == item["candidate_texts"][chosen[q]]
        assert np.array_equal(np.asarray(failure["chosen_image"]),
                              np.asarray(item["candidate_images"][chosen[q]]))
        assert failure["positive_text"] == item["candidate_texts"][0]


def test_arm_statistics_equal_direct_computations(untrained):
    samples = stack_scores({"a": [untrained]})
    table = arm_intervals(samples, n_resamples=20).set_index("metric")["mean"]
    assert table["p@1"] == pytest.approx(untrained.hit.mean())
    assert table["gap"] == pytest.approx(untrained.positive.mean() - untrained.hard.mean())
    auroc = overlap_metrics(untrained.positive, untrained.hard.ravel()).auroc
    assert table["auroc"] == pytest.approx(auroc)
    stats = similarity_stats(np.eye(2), np.stack([np.eye(2), np.eye(2)]), k=1)
    assert stats.hard.shape == (2, 1)  # k is clipped by the caller, as query_scores does


def test_identical_or_untrained_arms_reproduce_nothing(untrained):
    """The null case: one untrained model in every arm. Every difference is exactly 0, so no
    reading may be called reproduced (or contradicted)."""
    samples = stack_scores({"before": [untrained], "info_nce": [untrained, untrained],
                            "weighted": [untrained, untrained]})
    readings = paper_readings(samples, "before", "info_nce", "weighted", n_resamples=200)
    assert len(readings) == 7 and any("P@1" in r for r in readings.reading)
    assert set(readings.verdict) == {"inconclusive"}
    assert np.allclose(readings[["estimate", "ci_low", "ci_high"]].to_numpy(), 0.0)


def test_a_clear_effect_is_reproduced_and_its_mirror_contradicted(untrained):
    better = QueryScores(np.ones_like(untrained.hit), untrained.positive + 0.1, untrained.hard,
                         untrained.easy, untrained.task)
    samples = stack_scores({"before": [untrained], "info_nce": [untrained],
                            "weighted": [better]})
    verdicts = paper_readings(samples, "before", "info_nce", "weighted", n_resamples=200)
    by_reading = dict(zip(verdicts.reading, verdicts.verdict))
    assert by_reading["weighting raises hard-list P@1 over InfoNCE"] == "reproduced"
    assert by_reading["weighting widens the positive-hard gap more than InfoNCE"] == "reproduced"
    # hard similarity did not move: a "falls" reading needs a fall
    falls = [r for r in by_reading if r.startswith("under weighting")]
    assert by_reading[falls[0]] == "inconclusive"
    mirrored = paper_readings(stack_scores({"before": [untrained], "info_nce": [better],
                                            "weighted": [untrained]}),
                              "before", "info_nce", "weighted", n_resamples=200)
    assert dict(zip(mirrored.reading, mirrored.verdict))[
        "weighting raises hard-list P@1 over InfoNCE"] == "contradicted"


def test_stack_scores_repeats_a_single_model_and_rejects_mismatched_arms(untrained):
    samples = stack_scores({"before": [untrained], "arm": [untrained] * 3})
    assert samples["before|hit"].shape == (3, len(untrained.hit))
    assert samples["arm|hard"].shape == (3, len(untrained.hit), untrained.hard.shape[1])
    with pytest.raises(ValueError, match="has 2 seeds; others have 3"):
        stack_scores({"a": [untrained] * 2, "b": [untrained] * 3})
    shorter = untrained.subset(np.arange(len(untrained.hit)) < 6)
    with pytest.raises(ValueError, match="separates arm and field"):
        stack_scores({"a|b": [untrained]})
    with pytest.raises(ValueError, match="different queries"):
        stack_scores({"a": [untrained, shorter]})


def test_train_arms_reuses_a_recipe_and_retrains_a_changed_one(scenes, tmp_path, monkeypatch):
    calls = []
    real = studies.train_embedder
    monkeypatch.setattr(studies, "train_embedder",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    arms = {"info_nce": {"loss": "info_nce"}}
    first = train_arms(arms, "tiny-dual", scenes, tmp_path, seeds=[0, 1], **FINETUNE)
    assert len(calls) == 2 and all(path.exists() for path in first["info_nce"])
    again = train_arms({"same recipe, other name": {"loss": "info_nce"}}, "tiny-dual", scenes,
                       tmp_path, seeds=[1], **FINETUNE)
    assert len(calls) == 2 and again["same recipe, other name"] == first["info_nce"][1:]
    train_arms(arms, "tiny-dual", scenes, tmp_path, seeds=[0], **{**FINETUNE, "lr": 5e-4})
    assert len(calls) == 3
    (first["info_nce"][0].parent / "recipe.json").unlink()  # an interrupted run: not reusable
    train_arms(arms, "tiny-dual", scenes, tmp_path, seeds=[0], **FINETUNE)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        train_arms({"bad": {"alhpa": 1.0}}, "tiny-dual", scenes, tmp_path, **FINETUNE)


def test_pretrain_ships_a_loadable_checkpoint_with_its_card_and_is_deterministic(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: tiny\ndata: {n_train: 4, n_eval: 3, seed: 1}\n"
                      "train: {model: tiny-dual, loss: info_nce, max_steps: 3, batch_size: 8}\n")
    card = studies.pretrain(recipe, tmp_path / "ckpt", work_dir=tmp_path / "work")
    assert card["recipe"]["train"]["max_steps"] == 3 and set(card["p@1"]) == {"hard", "random"}
    assert json.loads((tmp_path / "ckpt" / "pretraining.json").read_text()) == card
    first = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    model = load_model(str(tmp_path / "ckpt"))
    assert model.encode(["a small red circle"], [None]).shape == (1, model.embedding_dim)
    studies.pretrain(recipe, tmp_path / "ckpt", work_dir=tmp_path / "work")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == first
    recipe.write_text("name: tiny\ndata: {}\ntrain: {loss: info_nce}\n")
    with pytest.raises(ValueError, match="train.model"):
        studies.pretrain(recipe, tmp_path / "other")
    assert not (tmp_path / "other").exists()
