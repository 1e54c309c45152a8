"""One row per registered method: how to make a small random concept of it for a given base.

The table-driven tests in ``test_methods.py`` run every row; a method registered without a row
fails ``test_every_method_has_a_row``. Trainer issues add their rows here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from studio.concept import Concept
from studio.methods.runtime import text_encoders


def make_ti(base, trigger: str, seed: int) -> Concept:
    g = torch.Generator().manual_seed(seed)
    encs = text_encoders(base.pipe)
    keys = ["emb_params"] if len(encs) == 1 else ["clip_l", "clip_g"]
    tensors = {k: torch.randn(2, te.config.hidden_size, generator=g) * 2.0 for k, (_, te) in zip(keys, encs)}
    return Concept(method="textual_inversion", tokens=[trigger], tensors=tensors, class_word="cat",
                   name=trigger.strip("<>"), base=base.fingerprint())


CASES: dict[str, Callable] = {
    "textual_inversion": make_ti,
}
