"""The fast two-tower CPU model: same interface as LmmEmbedder, rows independent, exact reload."""
import doctest

import pytest
import torch
from PIL import Image

from llave_kit import dual_encoder
from llave_kit.dual_encoder import TinyDualEmbedder
from llave_kit.encoders import load_embedder

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
