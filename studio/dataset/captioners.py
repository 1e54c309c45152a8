"""The models behind ``python -m studio dataset caption``: image-to-text captioners and a CLIP tagger.

* :class:`HFCaptioner` — a transformers image-to-text model that runs without remote code, chosen by
  the checkpoint's ``config.json`` (``model_type``):

  - ``blip`` — ``BlipForConditionalGeneration`` (``Salesforce/blip-image-captioning-base``, ``-large``);
    an optional prompt prefix ("a photo of") makes it a conditional captioner;
  - ``blip-2`` — ``Blip2ForConditionalGeneration`` (``Salesforce/blip2-opt-2.7b``, ``…-flan-t5-xl``);
  - ``florence2`` — ``Florence2ForConditionalGeneration``, native in transformers ≥ 4.56: the converted
    ``florence-community/Florence-2-base`` / ``-large`` checkpoints. ``microsoft/Florence-2-*`` need
    remote code and are refused. The prompt is a task token: ``<CAPTION>`` (default, one short
    sentence), ``<DETAILED_CAPTION>`` or ``<MORE_DETAILED_CAPTION>``.

* :class:`TagCaptioner` — comma-separated tags from a CLIP zero-shot over a vocabulary
  (:data:`TAG_VOCABULARY`: subject, setting, lighting, framing, background, medium), by hub id or
  local folder; default ``openai/clip-vit-base-patch32``.

Images are preprocessed by transformers' PIL image processors (``backend="pil"``): torchvision is
never needed. Models are found offline first (:func:`load_pretrained`): a folder is read and nothing
else; a hub id is read from the Hugging Face cache, and downloaded only when it is not cached, the
environment allows it (``HF_HUB_OFFLINE`` unset) and the hub answers; otherwise one sentence says how
to get it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
from PIL import Image

from studio.devices import pick_device, pick_dtype
from studio.errors import StudioError

T = TypeVar("T")

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_TAG_MODEL = "openai/clip-vit-base-patch32"
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
# model_type -> (model class, processor class), all in transformers itself (no remote code)
CAPTION_FAMILIES: dict[str, tuple[str, str]] = {
    "blip": ("BlipForConditionalGeneration", "BlipProcessor"),
    "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "florence2": ("Florence2ForConditionalGeneration", "Florence2Processor"),
}
_TRUTHY = {"1", "true", "yes", "on"}

# Category -> (prompt template, tags, at most this many tags kept). Subject comes first in a caption.
TAG_VOCABULARY: dict[str, tuple[str, tuple[str, ...], int]] = {
    "subject": ("a photo of {}", (
        "person", "man", "woman", "child", "baby", "dog", "cat", "bird", "horse", "rabbit", "toy",
        "stuffed animal", "teddy bear", "figurine", "doll", "robot", "sculpture", "car", "bicycle",
        "motorcycle", "building", "house", "plant", "flower", "tree", "food", "cake", "cup", "mug",
        "bottle", "vase", "shoe", "sneaker", "bag", "backpack", "hat", "glasses", "watch", "jewelry",
        "chair", "lamp", "candle", "book", "guitar", "clock", "teapot", "bowl"), 2),
    "setting": ("a photo taken {}", (
        "indoors", "outdoors", "in a city street", "in a park", "on a beach", "in a forest",
        "in the mountains", "in the snow", "in a desert", "by the water", "in a living room",
        "in a kitchen", "in a bedroom", "in an office", "in a garden", "on a table", "on a bed",
        "on a sofa", "on the grass", "on the floor", "in a studio"), 2),
    "lighting": ("a photo with {}", (
        "daylight", "sunlight", "golden hour light", "night lighting", "soft light", "studio lighting",
        "backlighting", "dim light", "flash"), 1),
    "framing": ("a {} photo", (
        "close-up", "portrait", "full body", "wide shot", "top-down", "low angle", "side view",
        "front view", "back view"), 1),
    "background": ("a photo with {}", (
        "a plain background", "a white background", "a dark background", "a blurred background",
        "a busy background"), 1),
    "medium": ("{}", (
        "a photo", "a painting", "a drawing", "a cartoon", "a 3d render", "a black and white photo"), 1),
}
TAG_SHARE = 2.0  # a tag is kept when its probability within its category is ≥ TAG_SHARE × uniform


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbids downloads."""
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (``HF_ENDPOINT``) accepts a TCP connection within ``timeout`` s."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or (80 if endpoint.startswith("http:") else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def local_folder(spec: str | os.PathLike[str]) -> Path | None:
    """The folder ``spec`` names, or None for a hub id; a path-like ``spec`` that is no folder is an error."""
    text = os.fspath(spec)
    if not text.strip():
        raise StudioError("An empty model name was given; pass a Hugging Face hub id or a local folder.")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if isinstance(spec, Path) or text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1:
        raise StudioError(f"Model folder '{text}' does not exist; pass an existing folder or a Hugging Face hub id "
                          "(owner/name).")
    return None


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(err).__name__


def load_pretrained(loader: Callable[..., T], spec: str | os.PathLike[str], what: str, *, is_model: bool = False,
                    **kwargs: Any) -> T:
    """``loader(spec, **kwargs)`` (a ``from_pretrained``), offline first (module docstring).

    ``what`` names the thing in errors ("captioning model"); ``is_model``: a transformers model class,
    whose adapter probe must be kept offline too."""

    def call(target: str, local_only: bool) -> T:
        extra: dict[str, Any] = dict(kwargs, local_files_only=local_only)
        if is_model:
            extra["adapter_kwargs"] = {"local_files_only": local_only}
        return loader(target, **extra)

    folder = local_folder(spec)
    if folder is not None:
        try:
            return call(str(folder), True)
        except (OSError, ValueError, KeyError) as err:
            raise StudioError(f"Cannot load the {what} from folder '{folder}' ({_reason(err)}); it must be a "
                              "complete transformers checkpoint (config, weights, tokenizer, processor).") from None
    hub_id = os.fspath(spec)
    try:
        return call(hub_id, True)
    except (OSError, ValueError):
        pass  # not (completely) in the cache
    fix = f"download it once with `hf download {hub_id}` on a machine with network, or pass a local folder"
    if hub_offline():
        raise StudioError(f"The {what} '{hub_id}' was not found locally and HF_HUB_OFFLINE=1 forbids downloading "
                          f"it: {fix}.")
    if not hub_reachable():
        raise StudioError(f"The {what} '{hub_id}' was not found locally and the Hugging Face Hub cannot be reached "
                          f"(no network): {fix}.")
    try:
        return call(hub_id, False)
    except (OSError, ValueError) as err:
        raise StudioError(f"Cannot load the {what} '{hub_id}' from the Hugging Face Hub ({_reason(err)}); check "
                          "the id, or pass a local folder.") from None


def _read_config(target: str, *, local_files_only: bool) -> dict[str, Any]:
    path = Path(target) / "config.json"
    if not Path(target).is_dir():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(target, "config.json", local_files_only=local_files_only))
        except (OSError, ValueError):
            raise
        except Exception as err:  # noqa: BLE001 - the hub's other errors (entry not found, ...): one kind here
            raise OSError(_reason(err)) from err
    if not path.is_file():
        raise OSError("it has no config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"config.json is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError("config.json is not a JSON object")
    return data


def read_model_config(spec: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (offline first; downloads only that file)."""
    return load_pretrained(_read_config, spec, "captioning model")


def model_name(kind: str, spec: str | os.PathLike[str]) -> str:
    """``"<kind>:<hub id>"`` or ``"<kind>:folder:<folder name>"``: what a report says made the captions."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    return f"{kind}:folder:{path.name}" if path.is_dir() else f"{kind}:{text}"


def rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB; transparency is composited on white (as the trainers read it)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise StudioError(f"Expected PIL images to caption, got {type(image).__name__}.")
        out.append(rgb(image))
    return out


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) < 1:
            raise StudioError(f"{key.replace('_', ' ')} must be at least 1, got {value}.")


def _pil_image_processor(spec: str | os.PathLike[str]) -> Any:
    from transformers import AutoImageProcessor

    # backend="pil": the default torchvision processor would need torchvision (and differs slightly).
    return load_pretrained(AutoImageProcessor.from_pretrained, spec, "image processor", backend="pil")


def _load_processor(processor_class: Any, spec: str | os.PathLike[str]) -> Any:
    """``processor_class`` (BlipProcessor, …) from ``spec``, with its image processor swapped for the
    PIL one. (Passing ``backend="pil"`` to the processor would reach the tokenizer too.)"""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "torchvision backend not available, falling back to pil": expected
    try:
        processor = load_pretrained(processor_class.from_pretrained, spec, "captioning processor")
    finally:
        hf_logging.set_verbosity(level)
    if not type(processor.image_processor).__name__.endswith("Pil"):
        processor.image_processor = _pil_image_processor(spec)
    return processor


class HFCaptioner:
    """Captions from a transformers image-to-text model (BLIP, BLIP-2, Florence-2; module docstring).

    Args:
        model: hub id or local folder.
        device, dtype: ``cuda`` / ``mps`` / ``cpu`` (default: the best available) and ``fp16`` / ``bf16`` /
            ``fp32`` (default: fp16 on a GPU, fp32 on the CPU).
        batch_size: images per ``generate`` call.
        max_new_tokens, num_beams: generation length limit and beam count.
        prompt: BLIP / BLIP-2: a prefix the caption continues ("a photo of"), kept in the caption;
            Florence-2: one of :data:`FLORENCE_TASKS` (default ``<CAPTION>``).
        config: the checkpoint's ``config.json`` when already read (:func:`read_model_config`).
    """

    style = "sentence"

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_CAPTION_MODEL, *, device: str | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = 8, max_new_tokens: int = 40,
                 num_beams: int = 3, prompt: str | None = None, config: Mapping[str, Any] | None = None) -> None:
        import transformers

        _check_positive(batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams)
        config = dict(config) if config is not None else read_model_config(model)
        self.family = str(config.get("model_type", ""))
        if self.family not in CAPTION_FAMILIES:
            raise StudioError(f"'{os.fspath(model)}' is a {self.family or 'model of unknown type'} checkpoint, not an "
                              "image-to-text model; use BLIP (Salesforce/blip-image-captioning-base), BLIP-2 or "
                              "Florence-2 (florence-community/Florence-2-base).")
        model_class, processor_class = CAPTION_FAMILIES[self.family]
        architectures = config.get("architectures") or []
        if architectures and model_class not in architectures:
            raise StudioError(f"'{os.fspath(model)}' is a {architectures[0]} checkpoint, not a captioning one; use a "
                              f"{model_class} checkpoint such as {DEFAULT_CAPTION_MODEL}.")
        if config.get("auto_map"):
            raise StudioError(f"'{os.fspath(model)}' needs remote code, which the studio never runs; use the "
                              "transformers-native conversion (e.g. florence-community/Florence-2-base).")
        self.prompt = self._check_prompt(prompt)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.batch_size, self.max_new_tokens, self.num_beams = int(batch_size), int(max_new_tokens), int(num_beams)
        cls = getattr(transformers, model_class)
        self.model = load_pretrained(cls.from_pretrained, model, "captioning model", is_model=True, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.processor = _load_processor(getattr(transformers, processor_class), model)
        if self.family == "blip-2" and getattr(self.processor, "num_query_tokens", None) is None:
            self.processor.num_query_tokens = config.get("num_query_tokens")  # older processor configs
        # BLIP-2 on a decoder-only LM (OPT; not Flan-T5) returns the prompt's ids (image tokens, BOS, prefix) first.
        text_config = getattr(self.model.config, "text_config", None)
        self._decoder_only = self.family == "blip-2" and not getattr(text_config, "is_encoder_decoder", False)
        self.name = model_name(self.family, model)

    def _check_prompt(self, prompt: str | None) -> str | None:
        text = " ".join(prompt.split()) if prompt else None
        if self.family == "florence2":
            text = text or FLORENCE_TASKS[0]
            if text not in FLORENCE_TASKS:
                raise StudioError(f"Florence-2 takes a task as its prompt, one of {', '.join(FLORENCE_TASKS)}; "
                                  f"got {text!r}.")
        return text

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (any size and mode; converted to RGB), ``batch_size`` at a time."""
        rgb_images = _check_images(images)
        captions: list[str] = []
        for start in range(0, len(rgb_images), self.batch_size):
            captions += self._caption_batch(rgb_images[start : start + self.batch_size])
        return captions

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        if self.family == "blip":
            text: list[str] | None = [self.prompt] * len(images) if self.prompt else None
        else:  # BLIP-2 needs a text to place its image tokens; Florence-2 its task
            text = [self.prompt or ""] * len(images)
        inputs = self.processor(images=images, text=text, return_tensors="pt")
        feed = {k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask", "pixel_values") if k in inputs}
        feed["pixel_values"] = feed["pixel_values"].to(self.dtype)  # (B, 3, H, W)
        with torch.inference_mode():
            ids = self.model.generate(**feed, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        if self._decoder_only:
            ids = ids[:, feed["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        prefix = self.prompt if self.family == "blip-2" and self.prompt else ""
        return [" ".join(f"{prefix} {t}".split()) for t in texts]


def _clip_features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output (``pooler_output``) from ``get_*_features``; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TagCaptioner:
    """Comma-separated tags from a CLIP-like model's zero-shot scores over a vocabulary.

    Per category of ``vocabulary`` (default :data:`TAG_VOCABULARY`), the prompts' image–text scores are
    turned into probabilities (softmax within the category); its best tags (at most the category's
    count) are kept when their probability is at least ``share`` × uniform (1 / number of tags), and
    the best subject tag always. Tags keep the vocabulary's category order.

    Args:
        model: hub id or local folder of a CLIP-like model (``get_image_features`` /
            ``get_text_features``) with its tokenizer and image processor.
        device, dtype, batch_size: as :class:`HFCaptioner`.
        vocabulary: category -> (prompt template with ``{}``, tags, max tags kept).
        share: see above.
    """

    style = "tags"

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_TAG_MODEL, *, device: str | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = 16,
                 vocabulary: Mapping[str, tuple[str, Sequence[str], int]] | None = None,
                 share: float = TAG_SHARE) -> None:
        from transformers import AutoModel, AutoTokenizer

        _check_positive(batch_size=batch_size)
        self.vocabulary = dict(vocabulary if vocabulary is not None else TAG_VOCABULARY)
        if not self.vocabulary or any(not tags or keep < 1 for _, tags, keep in self.vocabulary.values()):
            raise StudioError("A tag vocabulary needs at least one category, each with tags and a count ≥ 1.")
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.batch_size, self.share = int(batch_size), float(share)
        self.model = load_pretrained(AutoModel.from_pretrained, model, "tagging model", is_model=True,
                                     dtype=self.dtype)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise StudioError(f"'{os.fspath(model)}' is not a CLIP-like model (no image and text towers); --kind tags "
                              f"needs one such as {DEFAULT_TAG_MODEL}.")
        self.model.to(self.device).eval()
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, "tagging tokenizer")
        self.image_processor = _pil_image_processor(model)
        scale = getattr(self.model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.text_features = self._embed_vocabulary(tokenizer)  # (V, D), unit rows
        self.name = model_name("tags", model)

    def _embed_vocabulary(self, tokenizer: Any) -> torch.Tensor:
        prompts = [template.format(tag) for template, tags, _ in self.vocabulary.values() for tag in tags]
        positions = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77) or 77
        max_length = min(int(getattr(tokenizer, "model_max_length", positions) or positions), int(positions))
        parts = []
        with torch.inference_mode():
            for start in range(0, len(prompts), 64):
                tokens = tokenizer(prompts[start : start + 64], padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt").to(self.device)
                out = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens.get("attention_mask"))
                parts.append(_clip_features(out).float())  # (b, D)
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1)

    def scores(self, images: list[Image.Image]) -> torch.Tensor:
        """``(N, V)`` float32 scaled cosine logits of each image against every vocabulary prompt."""
        rgb_images = _check_images(images)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(rgb_images), self.batch_size):
                pixels = self.image_processor(images=rgb_images[start : start + self.batch_size],
                                              return_tensors="pt")["pixel_values"]  # (b, 3, H, W)
                out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
                parts.append(torch.nn.functional.normalize(_clip_features(out).float(), dim=-1))  # (b, D)
        return self.logit_scale * torch.cat(parts) @ self.text_features.T

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One ``"tag, tag, …"`` caption per image."""
        if not images:
            return []
        logits = self.scores(images).cpu()
        captions = []
        for row in logits:
            tags: list[str] = []
            offset = 0
            for category, (_, names, keep) in self.vocabulary.items():
                probs = torch.softmax(row[offset : offset + len(names)], dim=0)
                offset += len(names)
                order = torch.argsort(probs, descending=True)[:keep].tolist()
                chosen = [i for i in order if float(probs[i]) >= self.share / len(names)]
                if category == "subject" and not chosen:
                    chosen = order[:1]
                tags += [_tag_text(names[i]) for i in chosen]
            captions.append(", ".join(dict.fromkeys(tags)))
        return captions


def _tag_text(tag: str) -> str:
    """The tag as written in a caption: without a leading article ("a blurred background" → "blurred background")."""
    for article in ("a ", "an "):
        if tag.startswith(article):
            return tag[len(article):]
    return tag
