"""LMM embedders: a vision-language model used as an image+text embedder, the LLaVE way.

`LmmEmbedder` wraps a transformers Qwen2-VL or LLaVA-OneVision model. For each input it

1. builds a one-turn chat prompt (an optional instruction, the text, the image at the MMEB
   placeholder `<|image_1|>` or first), ending with the assistant-turn opener;
2. runs the base model (`model.model`, not the LM head) on the padded batch;
3. takes the final-layer hidden state of the last non-padding token and L2-normalises it:
       e_i = h_i[t_i] / ||h_i[t_i]||,   t_i = max{t : attention_mask[i, t] = 1}.

h is the base model's `last_hidden_state`: the output of the language model's final norm
(`model.model.language_model.norm`, an RMSNorm, in both families), the state LLaVE and VLM2Vec
checkpoints were trained on. `hidden_states[-1]` is not used: whether a wrapper returns it before
or after the final norm has changed between transformers versions and models (VLM2Vec traced a
reproduction gap on Qwen3-VL to it); in transformers 5.24 it is post-norm for both families.

Real checkpoints load with `LmmEmbedder.from_pretrained(hub_id_or_dir)` (on a GPU machine, e.g.
"llava-hf/llava-onevision-qwen2-0.5b-ov-hf"). The CPU default, `default_model("tiny-qwen2-vl",
vocabulary)`, is the same class over a ~0.7M-parameter Qwen2-VL built in code with an offline
word-level tokenizer and 84x84 images (9 image tokens), small enough to train in minutes on a CPU.

Every embedding model of the kit (this class and `dual_encoder.TinyDualEmbedder`) provides the
`Embedder` protocol, and `load_embedder` picks one by name or folder.

Example, on a tiny model with random weights built in code:

    >>> from PIL import Image
    >>> from llave_kit.encoders import load_embedder
    >>> embedder = load_embedder("tiny-qwen2-vl", vocabulary=["a red cube", "a blue sphere"])
    >>> image = Image.new("RGB", (84, 84), "red")
    >>> embedder.encode(["<|image_1|> a red cube", "a blue sphere"], [image, None]).shape
    torch.Size([2, 128])

Train-step speed of the defaults: `python benchmarks/bench_encoder.py`.

References: Lan et al. 2025, "LLaVE: Large Language and Vision Embedding Models with
Hardness-Weighted Contrastive Learning"; Jiang et al. 2024, "VLM2Vec" (MMEB, `<|image_1|>`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from llave_kit.data import IMAGE_PLACEHOLDER  # MMEB / VLM2Vec marker of the image position

MODEL_NAMES = ("tiny-qwen2-vl", "tiny-llava-onevision")  # tiny configs of the real LMM classes
TINY_DUAL = "tiny-dual"  # llave_kit.dual_encoder: fast two-tower model for CPU studies
CPU_MODELS = (*MODEL_NAMES, TINY_DUAL)
# Working resolutions of the tiny defaults. Qwen2-VL: 84 / 14 = 6 patches a side, merged 2 x 2 into
# 3 x 3 image tokens, one per cell of the scenes' 3 x 3 grid (56 px gave 2 x 2 tokens, and the
# position tasks stayed at chance). LLaVA-OneVision: 56 px, 16 patches per view.
TINY_IMAGE_SIZE = 84
TINY_LLAVA_IMAGE_SIZE = 56
EMBEDDER_CONFIG = "embedder_config.json"  # the embedder's own settings, next to the HF files


# --------------------------------------------------------------------------------------------------
# Processors without the video slot: the stock ones build a video processor (needs torchvision).


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` taking only an image processor, a tokenizer and a chat template.

    Other settings (LLaVA-OV's, when a caller passes a shared dict) are ignored.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)


class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` taking only an image processor, a tokenizer and a chat template."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            vision_aspect_ratio=vision_aspect_ratio,
        )


# --------------------------------------------------------------------------------------------------
# Model families: what differs between Qwen2-VL and LLaVA-OneVision, in one place.


@dataclass(frozen=True)
class _Family:
    model_class: type
    image_processor_class: type
    processor_class: type
    # vision encoder parameters that freeze_vision freezes; the projector stays trainable (LLaVE)
    vision_encoder: Callable[[nn.Module], list[nn.Module]]
    # modules the embedding never runs through, besides the LM head
    unused: Callable[[nn.Module], list[nn.Module]]


_FAMILIES = {
    "qwen2_vl": _Family(
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLImageTextProcessor,
        lambda m: [m.model.visual.patch_embed, m.model.visual.blocks],
        lambda m: [],
    ),
    "llava_onevision": _Family(
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionImageTextProcessor,
        lambda m: [m.model.vision_tower],
        # image features are a hidden state of the vision tower, taken before its final norm
        lambda m: [m.model.vision_tower.post_layernorm],
    ),
}


def _family(model_type: str) -> _Family:
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported: {sorted(_FAMILIES)}"
        )
    return _FAMILIES[model_type]


# --------------------------------------------------------------------------------------------------
# Prompts and pooling


def _check_inputs(texts: Sequence[str], images: Sequence[Image.Image | None]) -> None:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of str, got a single str")
    if len(texts) != len(images):
        raise ValueError(f"texts and images differ in length: {len(texts)} vs {len(images)}")
    if len(texts) == 0:
        raise ValueError("empty batch: no texts and images given")
    for i, (text, image) in enumerate(zip(texts, images)):
        if not isinstance(text, str):
            raise ValueError(
                f"texts[{i}] must be a str ('' for image-only), got {type(text).__name__}")
        if image is not None and not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL image or None, got {type(image).__name__}")
        if text.count(IMAGE_PLACEHOLDER) > 1:
            raise ValueError(f"texts[{i}] has more than one {IMAGE_PLACEHOLDER}; one image each")
        if IMAGE_PLACEHOLDER in text and image is None:
            raise ValueError(f"texts[{i}] contains {IMAGE_PLACEHOLDER} but images[{i}] is None")
        if image is None and not text.strip():
            raise ValueError(f"input {i} has neither text nor image")


def user_content(text: str, has_image: bool, instruction: str | None = None) -> list[dict]:
    """Chat-message content for one input: the image at the placeholder (or first), then the text.

    The instruction, when given, precedes the text: "{instruction}\\n{text}".
    """
    if instruction:
        text = f"{instruction}\n{text}" if text else instruction
    if not has_image:
        return [{"type": "text", "text": text}]
    if IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + text  # no placeholder: the image goes first
    before, _, after = text.partition(IMAGE_PLACEHOLDER)
    parts = [{"type": "text", "text": before.strip()}, {"type": "image"},
             {"type": "text", "text": after.strip()}]
    return [p for p in parts if p["type"] == "image" or p["text"]]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last non-padding token; works for left and right padding.

    hidden (N, T, D), attention_mask (N, T) -> (N, D), row i taken at t_i = max{t : mask[i, t] = 1}.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    last = (attention_mask.long() * positions).argmax(dim=1)  # (N,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# --------------------------------------------------------------------------------------------------
# The embedder


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "owner/name", e.g. "Qwen/Qwen2-VL-2B-Instruct"


def missing_checkpoint(name_or_path: str | os.PathLike) -> str | None:
    """"no checkpoint folder at …" when `name_or_path` can only be a local folder and none
    exists there; None when it exists or can be a hub id ("owner/name" where "owner" is not a
    local folder). "runs/x/final", "./model" and "~/model" are folders."""
    name = os.fspath(name_or_path)
    if os.path.exists(os.path.expanduser(name)):
        return None
    if HUB_ID.fullmatch(name) and not os.path.isdir(name.split("/")[0]):
        return None
    return f"no checkpoint folder at {name}"


@runtime_checkable
class Embedder(Protocol):
    """What the kit asks of an embedding model; `LmmEmbedder` and `TinyDualEmbedder` provide it.

    `encode(texts, images)` -> (N, D) unit vectors: texts[i] may hold `<|image_1|>`, "" is
    image-only, images[i] is a PIL image or None. Training and evaluation embed each side of a pair
    through its own method, `encode_queries` or `encode_targets`, so that a model can give each side
    an instruction; `save_pretrained(directory)` writes a folder that `load_embedder` reads back.
    Embedders are also `torch.nn.Module`s, and the kit relies on it (members declared last).
    """

    embedding_dim: int  # D

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> torch.Tensor: ...

    def encode_queries(self, texts: Sequence[str],
                       images: Sequence[Image.Image | None]) -> torch.Tensor: ...

    def encode_targets(self, texts: Sequence[str],
                       images: Sequence[Image.Image | None]) -> torch.Tensor: ...

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...

    # torch.nn.Module: training needs parameters, device moves and mode switches, evaluation the
    # eval mode, and the embedding cache and checkpoints the state dict.
    training: bool

    def train(self, mode: bool = True) -> nn.Module: ...

    def eval(self) -> nn.Module: ...

    def to(self, *args: Any, **kwargs: Any) -> nn.Module: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...


class LmmEmbedder(nn.Module):
    """A vision-language model as an embedder: last token, final layer after the final norm, L2.

    Args:
        model: a `Qwen2VLForConditionalGeneration` or `LlavaOnevisionForConditionalGeneration`.
        processor: the matching image-text processor (chat template included).
        query_instruction / target_instruction: optional texts that `encode_queries` /
            `encode_targets` put before each text. MMEB and VLM2Vec texts already carry their
            instructions, so both default to None and `encode` uses the texts as given.
        freeze_vision: freeze the vision encoder (LLaVE trains with it frozen); the projector
            (Qwen2-VL merger, LLaVA-OV multi_modal_projector) stays trainable.

    Parameters the embedding never uses (an untied LM head, LLaVA-OV's SigLIP post-layernorm)
    are frozen, so that DDP sees no unused trainable parameters. The padding side follows
    `processor.tokenizer.padding_side` (saved with the checkpoint); pooling handles both. DDP
    must wrap a module whose forward calls `encode` (or this one, called on `tokenize`'s output),
    so that its hooks run.
    """

    def __init__(self, model, processor, *, query_instruction=None, target_instruction=None,
                 freeze_vision: bool = True):
        super().__init__()
        self.model = model
        self.processor = processor
        self.family = _family(model.config.model_type)
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction
        self.embedding_dim = model.config.text_config.hidden_size
        self._freeze_unused()
        if freeze_vision:
            self.freeze_vision_encoder()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _freeze_unused(self) -> None:
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:  # a tied head is the embedding
            head.requires_grad_(False)
        for module in self.family.unused(self.model):
            module.requires_grad_(False)

    def freeze_vision_encoder(self) -> None:
        for module in self.family.vision_encoder(self.model):
            module.requires_grad_(False)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward instead of storing them (transformers'
        own switch, active in train mode): less memory, the same gradients. Non-reentrant, which
        works with frozen inputs and under FSDP."""
        if hasattr(self.model, "activation_checkpointing_enable"):  # its name since 5.2x
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})

    def tokenize(self, texts: Sequence[str], images: Sequence[Image.Image | None],
                 instruction: str | None = None):
        """Chat prompts -> padded model inputs (a BatchFeature of tensors on the CPU)."""
        _check_inputs(texts, images)
        conversations = [
            [{"role": "user", "content": user_content(text, image is not None, instruction)}]
            for text, image in zip(texts, images)
        ]
        prompts = self.processor.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=True
        )
        present = [image.convert("RGB") for image in images if image is not None]
        return self.processor(text=prompts, images=present or None, padding=True,
                              return_tensors="pt")

    def forward(self, batch) -> torch.Tensor:
        """Processed batch (from `tokenize`) -> (N, D) unit vectors, float32 (float64 for a float64
        model: half-precision states are promoted for the loss, double ones are kept)."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # Left padding shifts a row's positions by a constant; RoPE (and Qwen2-VL's M-RoPE) only
        # sees relative positions, so the embedding is unchanged and default positions suffice.
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state  # (N, T, D), normed
        pooled = last_token_pool(hidden, inputs["attention_mask"])  # (N, D)
        return F.normalize(pooled.to(torch.promote_types(pooled.dtype, torch.float32)), dim=-1)

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image | None], *,
               instruction: str | None = None) -> torch.Tensor:
        """Embed a batch; texts[i] may hold `<|image_1|>`; "" is image-only. -> (N, D) float32."""
        return self(self.tokenize(texts, images, instruction))

    def encode_queries(self, texts: Sequence[str],
                       images: Sequence[Image.Image | None]) -> torch.Tensor:
        return self.encode(texts, images, instruction=self.query_instruction)

    def encode_targets(self, texts: Sequence[str],
                       images: Sequence[Image.Image | None]) -> torch.Tensor:
        return self.encode(texts, images, instruction=self.target_instruction)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config, safetensors weights, tokenizer, image processor and embedder settings.

        `from_pretrained` restores the instructions and the tokenizer's padding side. Files are
        written to a hidden temporary folder inside `directory`, then moved in one by one
        (os.replace), so an interrupted save leaves no half-written file.

        Plain transformers loads the model (its model class), the tokenizer (`AutoTokenizer`) and
        the image processor (`AutoImageProcessor`, the PIL one), but `AutoProcessor` returns only
        the tokenizer: the saved processor class is the kit's video-less subclass, because the
        stock `Qwen2VLProcessor` / `LlavaOnevisionProcessor` need a video processor, which needs
        torchvision. Load with `LmmEmbedder.from_pretrained`, or, with torchvision, build the stock
        processor from the tokenizer, the image processor and a video processor.
        """
        directory = os.path.expanduser(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".saving-", dir=directory)
        tokenizer = self.processor.tokenizer
        # transformers saves the tokenizer's init kwargs, not a padding side set after construction
        tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side
        try:
            self.model.save_pretrained(staging)
            self.processor.save_pretrained(staging)
            settings = {"query_instruction": self.query_instruction,
                        "target_instruction": self.target_instruction}
            with open(os.path.join(staging, EMBEDDER_CONFIG), "w") as f:
                json.dump(settings, f, indent=2)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        freeze_vision: bool = True) -> LmmEmbedder:
        """Load a Qwen2-VL / LLaVA-OneVision checkpoint (hub id or local folder) as an embedder.

        dtype None keeps transformers' default; device None leaves the model on the CPU.
        """
        if problem := missing_checkpoint(name_or_path):
            raise FileNotFoundError(problem)
        name_or_path = os.path.expanduser(os.fspath(name_or_path))
        family = _family(AutoConfig.from_pretrained(name_or_path).model_type)
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = family.model_class.from_pretrained(name_or_path, **kwargs)
        if device is not None:
            model = model.to(device)
        settings = _read_embedder_settings(name_or_path)
        return cls(model, _load_processor(family, name_or_path), freeze_vision=freeze_vision,
                   **settings)


def _load_processor(family: _Family, name_or_path: str):
    """Tokenizer + PIL image processor + the checkpoint's chat template and processor settings."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = family.image_processor_class.from_pretrained(name_or_path)
    processor_dict, _ = ProcessorMixin.get_processor_dict(name_or_path)
    accepted = ("chat_template", "num_image_tokens", "vision_feature_select_strategy",
                "vision_aspect_ratio")
    settings = {k: processor_dict[k] for k in accepted if processor_dict.get(k) is not None}
    settings.setdefault("chat_template", tokenizer.chat_template)
    return family.processor_class(image_processor, tokenizer, **settings)


def _read_embedder_settings(name_or_path: str) -> dict:
    path = os.path.join(name_or_path, EMBEDDER_CONFIG)
    if not os.path.isfile(path):  # a hub id or a plain HF checkpoint: no instructions
        return {}
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# The CPU defaults: tiny models and an offline word-level tokenizer, built in code


_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|unk|>", "<|im_start|>", "<|im_end|>",
                        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|unk|>", "<|im_start|>", "<|im_end|>",
                         "<image>", "<video>"]
_ROLE_WORDS = ["system", "user", "assistant"]


def _chat_template(image_markup: str) -> str:
    """A small Qwen-style chat template: one <|im_start|>role ... <|im_end|> block per message."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_markup +
        "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_word_tokenizer(vocabulary: Iterable[str], special_tokens: Sequence[str],
                         chat_template: str) -> PreTrainedTokenizerFast:
    """Offline word-level tokenizer: one id per lower-cased word or punctuation mark.

    Words are taken from `vocabulary` (words or whole sentences; split on white space and
    punctuation, lower-cased) plus the chat role words. Unknown words map to `<|unk|>`.
    Ids: the special tokens first, in the given order, then the words sorted.
    """
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    words = set(_ROLE_WORDS)
    for text in vocabulary:
        if not isinstance(text, str):
            raise ValueError(f"vocabulary entries must be str, got {type(text).__name__}")
        text = text.replace(IMAGE_PLACEHOLDER, " ")
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words.difference_update(special_tokens)
    vocab = {token: i for i, token in enumerate([*special_tokens, *sorted(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    # special tokens match on the raw text, before lower-casing and splitting
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", unk_token="<|unk|>",
        eos_token="<|im_end|>", chat_template=chat_template,
    )


def _text_config(tokenizer, hidden_size: int, **extra) -> dict:
    """Qwen2 text settings of the tiny models: 2 layers, 4 heads / 2 KV heads, MLP 4x."""
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra,
    )


def _tiny_qwen2_vl(vocabulary, hidden_size: int):
    tokenizer = build_word_tokenizer(
        vocabulary, _QWEN_SPECIAL_TOKENS,
        _chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    half = hidden_size // 4 // 2  # 4 heads; head_dim / 2 rotary frequencies, split t / h / w
    mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 16 -> [4, 6, 6]
    text = _text_config(tokenizer, hidden_size, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section})
    vision = dict(depth=1, embed_dim=hidden_size // 2, hidden_size=hidden_size, num_heads=2,
                  mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE  # min = max: every image gets ~84x84 worth of pixels
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    )
    processor = Qwen2VLImageTextProcessor(image_processor, tokenizer, tokenizer.chat_template)
    return Qwen2VLForConditionalGeneration(config), processor


def _tiny_llava_onevision(vocabulary, hidden_size: int):
    tokenizer = build_word_tokenizer(vocabulary, _LLAVA_SPECIAL_TOKENS, _chat_template("<image>"))
    side = TINY_LLAVA_IMAGE_SIZE
    vision = SiglipVisionConfig(
        hidden_size=hidden_size // 2, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=2, image_size=side, patch_size=14, vision_use_head=False,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_text_config(tokenizer, hidden_size),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[side, side]],
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=[[side, side]],
    )
    processor = LlavaOnevisionImageTextProcessor(
        image_processor, tokenizer, tokenizer.chat_template,
        num_image_tokens=(side // 14) ** 2, vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def default_model(name: str = "tiny-qwen2-vl", vocabulary: Iterable[str] | None = None,
                  seed: int = 0, *, hidden_size: int = 128, freeze_vision: bool = False,
                  dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> LmmEmbedder:
    """The CPU default embedder, built in code with random weights (seeded), in eval mode.

    "tiny-qwen2-vl": Qwen2-VL, text hidden 128, 2 layers, 4 heads / 2 KV heads, MLP 512; vision
    width 64, depth 1, 2 heads, patch 14, merge 2 (84x84 image -> 9 tokens); ~0.73M parameters.
    "tiny-llava-onevision": LLaVA-OneVision, same text model, a 1-layer SigLIP at 56x56 and grid
    pinpoints [[56, 56]] (base view + one crop, ~36 image tokens); ~0.61M parameters.
    `hidden_size` scales both (tests use 32). The vision tower trains by default: LLaVE freezes a
    *pre-trained* tower, and a randomly initialised one that is frozen can learn nothing
    (`freeze_vision=True` follows LLaVE once a checkpoint's tower is trained). `vocabulary`: words
    or sentences the tokenizer should know (see `build_word_tokenizer`); None takes
    `llave_kit.scenes.scenes_vocabulary()`.
    """
    builders = {"tiny-qwen2-vl": _tiny_qwen2_vl, "tiny-llava-onevision": _tiny_llava_onevision}
    if name not in builders:
        raise ValueError(f"unknown default model {name!r}; choose one of {list(MODEL_NAMES)}")
    if hidden_size < 32 or hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16, at least 32; got {hidden_size}")
    if vocabulary is None:
        vocabulary = _scenes_vocabulary()
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching global RNG state
        torch.manual_seed(seed)
        model, processor = builders[name](list(vocabulary), hidden_size)
    model = model.to(device=device, dtype=dtype).eval()
    return LmmEmbedder(model, processor, freeze_vision=freeze_vision)


def _scenes_vocabulary() -> list[str]:
    from llave_kit.scenes import scenes_vocabulary

    return scenes_vocabulary()


def load_embedder(model: str, vocabulary: Iterable[str] | None = None, **kwargs) -> Embedder:
    """A default name (see MODEL_NAMES) -> `default_model`, "tiny-dual" -> `TinyDualEmbedder`;
    a saved model folder or hub id -> the matching `from_pretrained`.

    `vocabulary` only matters for the defaults (a checkpoint brings its own tokenizer).
    """
    from llave_kit.dual_encoder import TinyDualEmbedder

    if model == TINY_DUAL:
        return TinyDualEmbedder.build(vocabulary or _scenes_vocabulary(), **kwargs)
    if model in MODEL_NAMES:
        return default_model(model, vocabulary, **kwargs)
    if model.startswith("tiny-") and not os.path.exists(model):  # a typo, not a hub download
        raise ValueError(f"unknown default model {model!r}; choose one of {list(CPU_MODELS)}")
    model = os.path.expanduser(model)
    if TinyDualEmbedder.is_saved_in(model):
        return TinyDualEmbedder.from_pretrained(model, **kwargs)
    return LmmEmbedder.from_pretrained(model, **kwargs)
