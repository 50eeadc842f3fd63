"""Tests for llave_kit.encoders: pooling, padding, prompts, gradients, save/load, bad input.

Tiny Qwen2-VL and LLaVA-OneVision models (hidden 32, 2 layers) built in code with an offline
word-level tokenizer; references are computed by hand from the base model's hidden states.
Run: .venv/bin/python -m pytest -q tests/test_encoders.py
"""
import doctest
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from llave_kit import encoders
from llave_kit.encoders import (
    MODEL_NAMES,
    TINY_DUAL,
    Embedder,
    LmmEmbedder,
    build_word_tokenizer,
    default_model,
    load_embedder,
    missing_checkpoint,
)
from llave_kit.losses import info_nce

VOCABULARY = [
    "Represent the given image with the following question: what color is the cube?",
    "Find an image that matches the caption.",
    "a red cube left of a blue sphere",
    "a green cylinder",
]
FAMILIES = {"tiny-qwen2-vl": "qwen2_vl", "tiny-llava-onevision": "llava_onevision"}
HIDDEN = 32


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mixed_batch():
    """Image+text (placeholder first and in the middle), text-only, image-only; mixed sizes."""
    texts = [
        "<|image_1|> Represent the given image with the following question: what color is it?",
        "a red cube left of a blue sphere",
        "",
        "a green <|image_1|> cylinder",
        "find an image that matches the caption. a blue sphere",
    ]
    images = [_image(56, 56, 0), None, _image(120, 70, 1), _image(30, 44, 2), _image(64, 64, 3)]
    return texts, images


@pytest.fixture(scope="module", params=MODEL_NAMES)
def embedder(request):
    return default_model(request.param, VOCABULARY, hidden_size=HIDDEN)


def _encode(embedder, texts, images, padding_side="right", **kwargs):
    embedder.processor.tokenizer.padding_side = padding_side
    with torch.no_grad():
        return embedder.encode(texts, images, **kwargs)


def _vision_encoder_params(embedder):
    model = embedder.model.model
    if hasattr(model, "visual"):  # Qwen2-VL: patch embedding, blocks; the merger is the projector
        return list(model.visual.patch_embed.parameters()) + list(model.visual.blocks.parameters())
    # LLaVA-OV uses the SigLIP encoder's last hidden state, before its (unused) post-layernorm
    tower = model.vision_tower
    return list(tower.embeddings.parameters()) + list(tower.encoder.parameters())


def _projector_params(embedder):
    model = embedder.model.model
    if hasattr(model, "visual"):
        return list(model.visual.merger.parameters())
    return list(model.multi_modal_projector.parameters())


# --------------------------------------------------------------------------------------------------
# Pooling and padding


def test_pooled_vector_is_hidden_state_of_last_real_token(embedder):
    texts, images = _mixed_batch()
    embedder.processor.tokenizer.padding_side = "right"
    batch = embedder.tokenize(texts, images)
    with torch.no_grad():
        pooled = embedder(batch)
        # right padding: default positions 0..len-1 are right for the real tokens
        hidden = embedder.model.model(**batch).last_hidden_state  # (N, T, D)
    mask = batch["attention_mask"]
    for i in range(len(texts)):
        last = max(t for t in range(mask.shape[1]) if mask[i, t] == 1)
        expected = hidden[i, last] / hidden[i, last].norm()
        torch.testing.assert_close(pooled[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pooled_vector_is_the_final_norm_output_at_the_last_real_token(name, padding_side):
    embedder = default_model(name, VOCABULARY, hidden_size=HIDDEN)
    norm = embedder.model.model.language_model.norm  # both families: the text model's RMSNorm
    with torch.no_grad():  # a new RMSNorm scales by ones: pre- and post-norm directions would agree
        norm.weight.copy_(torch.linspace(0.2, 3.0, HIDDEN))
    captured = {}
    hook = norm.register_forward_hook(
        lambda module, args, output: captured.update(pre=args[0], post=output))
    texts, images = _mixed_batch()
    embedder.processor.tokenizer.padding_side = padding_side
    batch = embedder.tokenize(texts, images)
    try:
        with torch.no_grad():
            pooled = embedder(batch)  # (N, D)
    finally:
        hook.remove()
    mask = batch["attention_mask"]
    real_end = 0 if padding_side == "right" else -1  # column that every row holds a token in
    assert mask[:, real_end].all() and not mask.all()
    for i in range(len(texts)):
        last = max(t for t in range(mask.shape[1]) if mask[i, t] == 1)
        post, pre = captured["post"][i, last], captured["pre"][i, last]
        torch.testing.assert_close(pooled[i], post / post.norm(), rtol=1e-5, atol=1e-5)
        assert (pooled[i] - pre / pre.norm()).abs().max() > 1e-2


def test_batched_embedding_equals_each_input_run_alone(embedder):
    texts, images = _mixed_batch()
    batched = _encode(embedder, texts, images, padding_side="left")  # right: see the next test
    for i in range(len(texts)):
        single = embedder.tokenize([texts[i]], [images[i]])
        assert single["attention_mask"].all()  # one input alone: no padding at all
        with torch.no_grad():
            hidden = embedder.model.model(**single).last_hidden_state[0, -1]  # (D,)
        torch.testing.assert_close(batched[i], hidden / hidden.norm(), rtol=1e-5, atol=1e-5)


def test_left_and_right_padding_give_same_unit_vectors(embedder):
    texts, images = _mixed_batch()
    left = _encode(embedder, texts, images, padding_side="left")
    right = _encode(embedder, texts, images, padding_side="right")
    assert left.shape == (len(texts), embedder.embedding_dim) == (5, HIDDEN)
    assert left.dtype == torch.float32
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left.norm(dim=1), torch.ones(len(texts)), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Prompts and images


def _tokens(embedder, text, image, instruction=None):
    ids = embedder.tokenize([text], [image], instruction)["input_ids"][0]
    return embedder.processor.tokenizer.convert_ids_to_tokens(ids.tolist())


def test_prompt_puts_image_at_placeholder_or_first():
    embedder = default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN)
    image = [Image.new("RGB", (84, 84), "red")]
    vision = ["<|vision_start|>", *["<|image_pad|>"] * 9, "<|vision_end|>"]  # 3 x 3 tokens
    end = ["<|im_end|>", "<|im_start|>", "assistant"]
    head = ["<|im_start|>", "user"]
    assert _tokens(embedder, "a green <|image_1|> Cylinder", image[0]) == [
        *head, "a", "green", *vision, "cylinder", *end]
    assert _tokens(embedder, "a green cylinder", image[0]) == [
        *head, *vision, "a", "green", "cylinder", *end]
    assert _tokens(embedder, "a cube!", None, instruction="find an image") == [
        *head, "find", "an", "image", "a", "cube", "<|unk|>", *end]


def test_instructions_change_the_embedding():
    embedder = default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN)
    embedder.query_instruction = "find an image that matches the caption."
    texts, images = ["a red cube"], [None]
    plain = _encode(embedder, texts, images)
    with torch.no_grad():
        query = embedder.encode_queries(texts, images)
        target = embedder.encode_targets(texts, images)  # no target instruction: texts as given
    explicit = _encode(embedder, texts, images, instruction=embedder.query_instruction)
    torch.testing.assert_close(query, explicit, rtol=0, atol=0)
    torch.testing.assert_close(target, plain, rtol=0, atol=0)
    assert (query - plain).abs().max() > 1e-3


def test_qwen2_vl_images_of_any_size_are_resized_to_the_84x84_budget():
    embedder = default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN)
    squares = [17, 84, 200, 1000]
    images = [_image(side, side, seed) for seed, side in enumerate(squares)] + [_image(200, 120, 9)]
    batch = embedder.tokenize(["a cube"] * len(images), images)
    patches = batch["image_grid_thw"]  # (n_images, 3): frames, rows, columns of 14x14 patches
    # any square becomes 84x84: 6x6 patches, merged 2x2 -> 3x3 image tokens
    assert patches[: len(squares)].tolist() == [[1, 6, 6]] * len(squares)
    assert (patches[:, 1:] % 2 == 0).all()  # sides snap to multiples of patch x merge = 28
    n_image_tokens = (batch["input_ids"] == embedder.model.config.image_token_id).sum()
    assert n_image_tokens == (patches.prod(dim=1) // 4).sum()


def test_word_tokenizer_is_lower_cased_deterministic_and_maps_unknown_words():
    special = ["<|endoftext|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
    first = build_word_tokenizer(["Red cube.", "blue"], special, "")
    second = build_word_tokenizer(["blue .", "red CUBE"], special, "")
    assert first.get_vocab() == second.get_vocab()
    tokens = first.convert_ids_to_tokens(first("<|im_start|>RED. cube purple")["input_ids"])
    assert tokens == ["<|im_start|>", "red", ".", "cube", "<|unk|>"]
    with pytest.raises(ValueError, match="vocabulary entries must be str"):
        build_word_tokenizer(["red", 3], special, "")


# --------------------------------------------------------------------------------------------------
# Gradients and freezing


def _contrastive_loss(embedder):
    texts, images = _mixed_batch()
    query = embedder.encode(texts, images)  # (5, D)
    target = embedder.encode([t.replace("<|image_1|>", "") or "a cube" for t in texts], [None] * 5)
    return info_nce(query, target, temperature=0.05)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_trainable_parameters_and_not_frozen_vision(name):
    embedder = default_model(name, VOCABULARY, hidden_size=HIDDEN, freeze_vision=True)
    _contrastive_loss(embedder).backward()
    frozen = _vision_encoder_params(embedder)
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert not embedder.model.get_output_embeddings().weight.requires_grad  # unused LM head
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    assert {id(p) for p in _projector_params(embedder)} <= {id(p) for p in trainable}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unfrozen_vision_encoder_gets_gradients(name):
    embedder = default_model(name, VOCABULARY, hidden_size=HIDDEN)  # random weights: it trains
    _contrastive_loss(embedder).backward()
    assert all(p.requires_grad for p in _vision_encoder_params(embedder))
    # every trainable parameter is used (none left for DDP to complain about), the encoder included
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_gradient_matches_finite_difference_along_a_direction():
    embedder = default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN,
                             freeze_vision=True).double()
    params = [p for p in embedder.parameters() if p.requires_grad]
    _contrastive_loss(embedder).backward()
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    analytic = sum((p.grad * v).sum() for p, v in zip(params, directions))

    def loss_at(step):
        with torch.no_grad():
            for p, v in zip(params, directions):
                p.add_(step * v)
            value = _contrastive_loss(embedder).item()
            for p, v in zip(params, directions):
                p.sub_(step * v)
        return value

    eps = 1e-5  # the loss is strongly curved along a random direction; RoPE runs in float32
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert numeric == pytest.approx(analytic.item(), rel=1e-3)


# --------------------------------------------------------------------------------------------------
# Building, saving, loading


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_then_from_pretrained_restores_identical_embeddings(name, tmp_path):
    embedder = default_model(name, VOCABULARY, hidden_size=HIDDEN, seed=3)
    texts, images = _mixed_batch()
    before = _encode(embedder, texts, images)
    embedder.save_pretrained(tmp_path / "ckpt")
    restored = LmmEmbedder.from_pretrained(tmp_path / "ckpt")
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.startswith(".saving-")]
    assert restored.model.config.model_type == FAMILIES[name]
    assert restored.processor.image_processor.size == embedder.processor.image_processor.size
    assert all(not p.requires_grad for p in _vision_encoder_params(restored))
    torch.testing.assert_close(_encode(restored, texts, images), before, rtol=0, atol=0)
    unfrozen = load_embedder(str(tmp_path / "ckpt"), freeze_vision=False)
    assert all(p.requires_grad for p in _vision_encoder_params(unfrozen))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_round_trips_padding_side_and_instructions(name, tmp_path):
    embedder = default_model(name, VOCABULARY, hidden_size=HIDDEN)
    embedder.query_instruction = "find an image that matches the caption."
    embedder.target_instruction = "represent the given image"
    texts, images = _mixed_batch()
    for side in ("left", "right"):  # the tokenizer's default is right
        embedder.processor.tokenizer.padding_side = side
        embedder.save_pretrained(tmp_path / side)
        restored = LmmEmbedder.from_pretrained(tmp_path / side)
        assert type(restored.processor) is type(embedder.processor)
        assert restored.processor.tokenizer.padding_side == side
        assert (restored.query_instruction, restored.target_instruction) == (
            embedder.query_instruction, embedder.target_instruction)
        masks = [e.tokenize(texts, images)["attention_mask"] for e in (embedder, restored)]
        assert torch.equal(*masks) and not masks[0].all()
        with torch.no_grad():
            for encode in ("encode_queries", "encode_targets"):
                torch.testing.assert_close(getattr(restored, encode)(texts, images),
                                           getattr(embedder, encode)(texts, images), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_saved_folder_loads_piecewise_with_transformers_auto_classes(name, tmp_path):
    embedder = default_model(name, VOCABULARY, hidden_size=HIDDEN)
    embedder.save_pretrained(tmp_path)
    text = "find an image that matches the caption. a red cube"
    expected_ids = embedder.processor.tokenizer(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == expected_ids
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(image_processor) is type(embedder.processor.image_processor)  # the PIL one
    image = [_image(120, 70, 1)]
    torch.testing.assert_close(
        image_processor(image, return_tensors="pt")["pixel_values"],
        embedder.processor.image_processor(image, return_tensors="pt")["pixel_values"])
    # as the save_pretrained docstring says: the stock processors need torchvision's video slot
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, PreTrainedTokenizerBase)
    assert processor(text)["input_ids"] == expected_ids


@pytest.mark.parametrize("name", [*MODEL_NAMES, TINY_DUAL])
def test_every_embedder_provides_the_embedder_protocol(name, tmp_path):
    sizes = {} if name == TINY_DUAL else {"hidden_size": HIDDEN}
    embedder = load_embedder(name, VOCABULARY, **sizes)
    assert isinstance(embedder, Embedder) and isinstance(embedder, torch.nn.Module)
    assert not isinstance(torch.nn.Linear(2, 2), Embedder)
    texts, images = ["<|image_1|> a red cube", "a green cylinder"], [_image(56, 56, 0), None]
    with torch.no_grad():
        for encode in (embedder.encode, embedder.encode_queries, embedder.encode_targets):
            emb = encode(texts, images)
            assert emb.shape == (2, embedder.embedding_dim)
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
        embedder.save_pretrained(tmp_path / "saved")
        reloaded = load_embedder(str(tmp_path / "saved"))
        assert type(reloaded) is type(embedder)
        torch.testing.assert_close(reloaded.encode_targets(texts, images),
                                   embedder.encode_targets(texts, images))


def test_module_examples_run():
    assert doctest.testmod(encoders).failed == 0


def test_from_pretrained_rejects_unsupported_model_types(tmp_path):
    default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match="unsupported model type 'qwen2_5_vl'"):
        LmmEmbedder.from_pretrained(tmp_path)


def test_default_model_is_seeded_and_sized():
    first = default_model("tiny-qwen2-vl", VOCABULARY, seed=1, hidden_size=HIDDEN)
    again = load_embedder("tiny-qwen2-vl", VOCABULARY, seed=1, hidden_size=HIDDEN)
    other = default_model("tiny-qwen2-vl", VOCABULARY, seed=2, hidden_size=HIDDEN)
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))
    full = default_model("tiny-qwen2-vl", VOCABULARY)
    assert full.embedding_dim == 128
    assert 0.6e6 < sum(p.numel() for p in full.parameters()) < 0.8e6  # REFERENCE: ~0.73M
    assert full.device == torch.device("cpu")


def test_default_vocabulary_covers_the_scenes_words():
    scenes = pytest.importorskip("llave_kit.scenes")
    words = scenes.scenes_vocabulary()
    tokenizer = default_model("tiny-qwen2-vl", hidden_size=HIDDEN).processor.tokenizer
    ids = tokenizer(" ".join(words))["input_ids"]
    assert len(ids) == len(words) and tokenizer.unk_token_id not in ids


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "texts, images, message",
    [
        (["a", "b"], [None], "texts and images differ in length: 2 vs 1"),
        ([], [], "empty batch"),
        (["<|image_1|> a cube"], [None],
         r"texts\[0\] contains <\|image_1\|> but images\[0\] is None"),
        (["a", ""], [None, None], "input 1 has neither text nor image"),
        (["<|image_1|> <|image_1|>"], [Image.new("RGB", (56, 56))], "more than one"),
        (["a"], ["not an image"], r"images\[0\] must be a PIL image"),
        ([None], [Image.new("RGB", (56, 56))], r"texts\[0\] must be a str"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(embedder, texts, images, message):
    with pytest.raises(ValueError, match=message):
        embedder.encode(texts, images)


def test_bad_model_names_and_folders_raise():
    with pytest.raises(ValueError, match="unknown default model 'tiny-gpt'"):
        default_model("tiny-gpt", VOCABULARY)
    with pytest.raises(ValueError, match="unknown default model 'tiny-qwen2'"):
        load_embedder("tiny-qwen2", VOCABULARY)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at ./no-such-checkpoint"):
        load_embedder("./no-such-checkpoint")
    with pytest.raises(ValueError, match="hidden_size must be a multiple of 16, at least 32"):
        default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=40)


def test_missing_checkpoint_tells_local_folders_from_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train" / "final").mkdir(parents=True)
    assert missing_checkpoint("runs/train/final") is None
    assert missing_checkpoint("Qwen/Qwen2-VL-2B-Instruct") is None  # cannot be checked offline
    assert missing_checkpoint("runs/other") == "no checkpoint folder at runs/other"  # runs/ is local
    for path in ("runs/pretrain/final", "../checkpoints/x", "./model", "~/no-such-model-here"):
        assert missing_checkpoint(path) == f"no checkpoint folder at {path}"
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at runs/pretrain/final"):
        load_embedder("runs/pretrain/final")


def test_a_checkpoint_path_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # an unexpanded "~" would become the folder tmp_path / "~"
    saved = default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN)
    saved.save_pretrained("~/model")
    assert (tmp_path / "home" / "model" / "config.json").is_file()
    assert not (tmp_path / "~").exists()
    assert missing_checkpoint("~/model") is None
    texts = ["a green cylinder"]
    with torch.no_grad():
        for loaded in (LmmEmbedder.from_pretrained("~/model"), load_embedder("~/model")):
            torch.testing.assert_close(loaded.encode(texts, [None]), saved.encode(texts, [None]))
