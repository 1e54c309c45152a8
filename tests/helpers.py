"""Test helpers shared across test files: subject photos and a tiny random CLIP judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "studio" / "assets" / "clip_tokenizer"


def write_photos(folder: Path, n: int = 3, size: int = 32, name: str = "{i}.png") -> list[Path]:
    """``n`` subject photos in ``folder``: a blue square on a warm background that differs per photo."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (220, 40 + 40 * i, 40))
        im.paste((30, 30, 200), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        path = folder / name.format(i=i)
        im.save(path)
        paths.append(path)
    return paths


def write_square_photos(folder: Path, n: int = 2) -> Path:
    """``n`` 40 px subject photos ``{i}.png`` in ``folder`` (a blue square on an orange background that
    differs per photo), the instance images of the DreamBooth-family tests; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (40, 40), (200, 60 + 60 * i, 40))
        im.paste((20, 20, 220), (8, 8, 28, 28))
        im.save(folder / f"{i}.png")
    return folder


def dreambooth_config(images: Path, out: Path, cache: Path, **overrides: Any) -> Any:
    """The ``dreambooth`` trainer's config for a short test run on a tiny base: class word "dog", lr 3e-2,
    seed 0, one fixed instance prompt (``--no-use-templates``, so a test can name each step's prompt), two
    class images generated in one step into ``cache``; ``overrides`` set any other field."""
    from trainers import get_trainer

    values: dict[str, Any] = dict(images=str(images), out=str(out), class_word="dog", lr=3e-2, log_every=0, seed=0,
                                  num_class_images=2, class_steps=1, class_batch_size=2, class_cache_dir=str(cache),
                                  use_templates=False)
    values.update(overrides)
    return get_trainer("dreambooth").resolve(**values)


def write_tiny_clip(folder: Path) -> Path:
    """A tiny random ``CLIPModel`` (seed 0) saved with the committed tokenizer and a PIL image processor:
    the judge of evaluations on bases that have no oracle."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.model_max_length = 77
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
