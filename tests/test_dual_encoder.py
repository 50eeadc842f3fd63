"""The fast two-tower CPU model: same interface as LmmEmbedder, rows independent, exact reload."""
import doctest

import pytest
import torch
from PIL import Image

from llave_kit import dual_encoder
from llave_kit.dual_encoder import TinyDualEmbedder
from llave_kit.encoders import load_embedder
from llave_kit.losses import hardness_weighted_info_nce
from llave_kit.studies import load_data, load_model
from llave_kit.train import TrainConfig, train

VOCABULARY = ["<|image_1|> what is in the top left", "a small red circle", "a large blue square"]


def image(colour, size=56):
    return Image.new("RGB", (size, size), colour)


@pytest.fixture(scope="module")
def model():
    return TinyDualEmbedder.build(VOCABULARY, seed=0)


def test_batch_rows_equal_single_inputs_and_are_unit_norm(model):
    texts = ["<|image_1|> what is in the top left", "a small red circle", ""]
    images = [image("red"), None, image("blue", size=40)]
    batch = model.encode(texts, images)
    assert batch.shape == (3, 128)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-6)
    singles = torch.cat([model.encode([t], [i]) for t, i in zip(texts, images)])
    assert torch.allclose(batch, singles, atol=1e-6)


def test_queries_and_targets_are_encoded_as_before_they_had_their_own_methods(model):
    """Callers used to fall back to `encode` for both sides; the two methods keep that."""
    texts = ["<|image_1|> what is in the top left", "a small red circle", ""]
    images = [image("red"), None, image("blue", size=40)]
    with torch.no_grad():
        plain = model.encode(texts, images)
        assert torch.equal(model.encode_queries(texts, images), plain)
        assert torch.equal(model.encode_targets(texts, images), plain)


def test_word_order_and_unknown_words(model):
    a, b = model.encode(["a small red circle", "circle red small a"], [None, None])
    assert not torch.allclose(a, b, atol=1e-3)
    known, unknown = model.encode(["a small red circle", "a small red zebra"], [None, None])
    assert not torch.allclose(known, unknown, atol=1e-3)


def test_gradients_reach_both_towers_and_the_fusion(model):
    model.zero_grad()
    # text alone, image alone, and both (the text directs the look at the patches)
    texts, images = ["a small red circle", "", "what is in the top left"], [None, image("red"), image("blue")]
    model.encode(texts, images).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_forward_and_backward_under_bf16_autocast(model):
    """What TrainConfig(precision="bf16") does on a CPU: the convolutions and linear layers run in
    bf16 while the GRU stays float32, and the embeddings still match the float32 model's."""
    model.zero_grad()
    texts = ["a small red circle", "", "what is in the top left", "a large blue square"]
    images = [None, image("red"), image("blue"), image("green", size=40)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model.encode(texts, images)
    assert embeddings.dtype == torch.bfloat16
    with torch.no_grad():
        full = model.encode(texts, images)
    # bf16 keeps 8 significant bits: entries of a unit 128-vector move by about 1e-3.
    torch.testing.assert_close(embeddings.float(), full, rtol=0, atol=0.01)
    hardness_weighted_info_nce(embeddings[:2], embeddings[2:], temperature=0.1).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_two_bf16_training_steps_on_scenes(tmp_path):
    """The run that crashed in the image tower: tiny-dual on scenes with precision="bf16"."""
    data = load_data("scenes", tmp_path / "scenes", n_train=4, n_eval=2)
    model = load_model("tiny-dual", data)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path / "run"), precision="bf16", device="cpu",
                         max_steps=2, batch_size=4, lr=1e-3)
    result = train(config, model, data.train_dataset())
    assert [record["step"] for record in result.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in result.history)
    trained = TinyDualEmbedder.from_pretrained(result.final_model_path).state_dict()
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all()
               for value in trained.values())  # autocast keeps float32 master weights
    assert any(not torch.equal(trained[name], value) for name, value in before.items())


def test_save_and_reload_through_load_embedder(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_embedder(str(tmp_path / "saved"))
    assert isinstance(reloaded, TinyDualEmbedder)
    texts, images = ["a large blue square", ""], [None, image("green")]
    with torch.no_grad():
        assert torch.equal(model.encode(texts, images), reloaded.encode(texts, images))
    assert load_embedder("tiny-dual", vocabulary=VOCABULARY).words == model.words


def test_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        model.encode(["a", "b"], [None])
    with pytest.raises(ValueError, match="empty batch"):
        model.encode([], [])
    with pytest.raises(FileNotFoundError, match="not a saved TinyDualEmbedder"):
        TinyDualEmbedder.from_pretrained(tmp_path)


def test_module_example_runs():
    assert doctest.testmod(dual_encoder).failed == 0
