"""The oracle: a small CNN that reads a world image's attributes and the concept's identity.

It is the world's ground-truth judge for generated images. One backbone, one softmax head per
attribute of :data:`studio.world.render.VOCABULARY` and one sigmoid head, ``identity``, that says
whether the image shows the world's concept (:data:`studio.world.task.CONCEPT`). It is trained by
``scripts/build_world.py`` on renders and on their reconstructions through the base model's VAE
(so that it reads decoded images as well as clean renders), and committed at
``studio/assets/world/oracle.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open
from torch import nn

from studio.errors import StudioError
from studio.world.render import RESOLUTION, VOCABULARY

M = TypeVar("M", bound=nn.Module)

ORACLE_PATH = Path(__file__).resolve().parents[1] / "assets" / "world" / "oracle.safetensors"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Oracle(nn.Module):
    """``(B, 3, 32, 32)`` images in [-1, 1] → a dict of logits, one entry per head.

    Heads: every attribute of ``VOCABULARY`` (``(B, n_values)`` logits) and ``identity``
    (``(B,)`` logit of "this is the concept"). Spatial features are flattened, not pooled, so
    that where a mark sits (stripes vs dots) stays readable.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w),  # 32×32
            nn.MaxPool2d(2),
            _block(w, 2 * w),  # 16×16
            nn.MaxPool2d(2),
            _block(2 * w, 4 * w),  # 8×8
            nn.MaxPool2d(2),  # 4×4
        )
        self.trunk = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(256, len(values)) for name, values in VOCABULARY.items()}
        )
        self.identity = nn.Linear(256, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(images))
        out = {name: head(h) for name, head in self.heads.items()}
        out["identity"] = self.identity(h).squeeze(-1)
        return out

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities per head: attributes ``(B, n_values)``, ``identity`` ``(B,)``.

        ``images``: PIL images (any size, box-resized to 32×32) or a ``(B, 3, H, W)`` tensor in
        [-1, 1] (area-resized to 32×32 when it is another size).
        """
        was_training = self.training
        self.eval()
        x = images if isinstance(images, torch.Tensor) else to_tensor(images)
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = torch.nn.functional.adaptive_avg_pool2d(x.float(), RESOLUTION)
        device = next(self.parameters()).device
        logits = self(x.to(device=device, dtype=torch.float32))
        self.train(was_training)
        probs = {k: v.softmax(-1) for k, v in logits.items() if k != "identity"}
        probs["identity"] = logits["identity"].sigmoid()
        return {k: v.cpu() for k, v in probs.items()}


def to_tensor(images: Sequence[Image.Image], size: int = RESOLUTION) -> torch.Tensor:
    """PIL images → ``(B, 3, size, size)`` float32 in [-1, 1] (box-resized when not ``size`` square)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BOX)
        arrays.append(np.asarray(image, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def load_oracle(device: torch.device | str = "cpu", path: Path | None = None) -> Oracle:
    """The committed, trained oracle in eval mode on ``device``."""
    path = Path(path) if path is not None else ORACLE_PATH
    if not path.is_file():
        raise StudioError(
            f"The world oracle is missing at {path}; run `python scripts/build_world.py` to build it."
        )
    return load_checkpoint(path, "studio.world.oracle", lambda width: Oracle(width=width), 16, device)


def load_checkpoint(path: Path, meta_key: str, make: Callable[[int], M], default_width: int,
                    device: torch.device | str = "cpu") -> M:
    """A judge saved by ``scripts/build_world.py``: its width from the header's ``meta_key`` settings, its
    weights as float32 (they may be stored in fp16), in eval mode on ``device``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    settings = json.loads(meta.get(meta_key, "{}"))
    model = make(int(settings.get("width", default_width)))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.to(device).eval()
