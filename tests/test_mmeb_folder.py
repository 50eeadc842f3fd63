"""A folder of real-MMEB-style files becomes a data set the studies can train and evaluate on."""
import pytest
from PIL import Image

from llave_kit.data import read_records, write_mmeb_manifest, write_records
from llave_kit.studies import (
    evaluate_embedder,
    load_data,
    load_model,
    train_arms,
    train_embedder,
)


@pytest.fixture
def mmeb_folder(tmp_path):
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    write_records(tmp_path / "train" / "MSCOCO_i2t.jsonl", [
        {"qry": "<|image_1|> Find an image caption", "qry_image_path": "red.png",
         "pos_text": "A red square", "pos_image_path": ""},
        {"qry": "<|image_1|> Find an image caption", "qry_image_path": "blue.png",
         "pos_text": "A blue square", "pos_image_path": ""}])
    write_records(tmp_path / "eval" / "MSCOCO_i2t.jsonl", [
        {"qry_text": "<|image_1|> Find an image caption", "qry_img_path": "red.png",
         "tgt_text": ["A red square", "A blue square"], "tgt_img_path": ["", ""]}])
    write_records(tmp_path / "eval" / "ObjectNet.parquet", [
        {"qry_text": "<|image_1|> Classify the object", "qry_img_path": "blue.png",
         "tgt_text": ["blue", "red", "green"], "tgt_img_path": ["", "", ""]}])
    return tmp_path


def test_manifest_describes_tasks_meta_tasks_and_vocabulary(mmeb_folder):
    info = write_mmeb_manifest(mmeb_folder)
    assert info.tasks == ["MSCOCO_i2t", "ObjectNet"]
    assert (info.meta_task("MSCOCO_i2t"), info.meta_task("ObjectNet")) == ("retrieval", "classification")
    assert info.levels("ObjectNet") == ["test"] and info.task("ObjectNet")["train"] is None
    assert len(info.train_dataset()) == 2  # eval-only tasks are skipped
    with pytest.raises(ValueError, match="'ObjectNet' .* has no training pairs"):
        info.train_path("ObjectNet")
    assert {"red", "blue", "green", "square", "classify"} <= set(info.vocabulary())


def test_studies_train_and_evaluate_on_the_folder(mmeb_folder, tmp_path_factory):
    write_mmeb_manifest(mmeb_folder)
    data = load_data(str(mmeb_folder))
    before = evaluate_embedder(load_model("tiny-dual", data), data, levels=("test",))
    model, result = train_embedder("tiny-dual", data, tmp_path_factory.mktemp("run"),
                                   loss="info_nce", batch_size=2, max_steps=12)
    table = evaluate_embedder(model, data, levels=("test",))
    assert list(table.task) == ["MSCOCO_i2t", "ObjectNet"]
    losses = [record["loss"] for record in result.history]
    # a batch of the two pairs starts near ln 2 (the captions not told apart) and is learnt by heart
    assert len(losses) == 12 and losses[0] > 0.5 and losses[-1] < 0.01
    trained, untrained = (t.set_index("task").loc["MSCOCO_i2t"] for t in (table, before))
    assert trained["p@1"] == 1.0
    assert trained["gap"] > untrained["gap"] + 0.2  # the other caption was pushed away
    with pytest.raises(ValueError, match="only apply to built-in data"):
        load_data(str(mmeb_folder), seed=3)
    with pytest.warns(UserWarning, match="read as it is"):  # notebooks pass sizes whatever the data
        assert load_data(str(mmeb_folder), n_train=3).tasks == data.tasks


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MMEB data"):
        write_mmeb_manifest(tmp_path)


def test_two_folders_sharing_a_train_dir_do_not_share_fine_tunes(mmeb_folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    for path in mmeb_folder.rglob("*"):
        if path.is_file() and path.suffix in (".png", ".jsonl", ".parquet"):
            target = other / path.relative_to(mmeb_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    records = read_records(other / "train" / "MSCOCO_i2t.jsonl", "train")
    write_records(other / "train" / "MSCOCO_i2t.jsonl", records[::-1])  # same pairs, new order
    train_dir = tmp_path_factory.mktemp("finetunes")
    arms = {"info_nce": {"loss": "info_nce"}}
    first, again, second = (
        train_arms(arms, "tiny-dual", load_data(str(folder)), train_dir, seeds=[0], batch_size=2,
                   max_steps=1)["info_nce"][0]
        for folder in (mmeb_folder, mmeb_folder, other))
    assert first == again  # the same folder reuses its fine-tune
    assert second != first
