"""Custom Diffusion's tensor names and its files for other tools: the ``diffusers`` export
(docs/methods.md, "Custom Diffusion").

**The diffusers layout** (what ``examples/custom_diffusion/train_custom_diffusion.py`` writes and the
diffusers documentation loads, checked against the pinned diffusers 0.42.1)::

    pipe.unet.load_attn_procs(FOLDER, weight_name="pytorch_custom_diffusion_weights.bin")
    pipe.load_textual_inversion(FOLDER / "token_0.safetensors", token="<new1>")
    pipe("photo of a <new1> cat")

``pytorch_custom_diffusion_weights.bin`` is the state dict ``UNet2DConditionModel.save_attn_procs``
writes with ``safe_serialization=False``: ``<layer>.processor.to_k_custom_diffusion.weight`` /
``…to_v…`` ``(inner, D)`` for every trained cross-attention layer, and an empty dict under
``<layer>.processor`` for each attention layer that keeps its own weights — the self-attention
``attn1`` beside every ``attn2``. ``load_attn_procs`` builds one ``CustomDiffusionAttnProcessor`` per
entry and must get one for *every* attention layer of the UNet (``set_attn_processor`` refuses a
partial dict), which is why the layout is a pickle: safetensors cannot hold the empty entries, and a
``.safetensors`` file with the trained layers alone does not load. It is written with
``torch.save`` of tensors and empty dicts only (``torch.load(weights_only=True)`` reads it).
The export names the self-attention partners from the cross-attention names (``…attn2`` →
``…attn1``, diffusers' ``BasicTransformerBlock``, the only block SD 1/2 and SDXL UNets use), so it
needs no base model.

The tokens go into ``token_<i>.safetensors``, one per token: ``{token: (1, D)}`` for SD 1/2 (diffusers'
textual-inversion format), ``clip_l`` + ``clip_g`` for SDXL (load each with ``text_encoder=`` /
``tokenizer=`` of its encoder). ``studio_custom_diffusion.json`` says which file is which token and its
class noun.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from studio.errors import ConceptFormatError, StudioError

if TYPE_CHECKING:
    from studio.concept import Concept

METHOD = "custom_diffusion"
EMBEDDINGS = ("custom_diffusion.embedding", "custom_diffusion.embedding_2")  # per text encoder
META_CLASS_WORDS = "custom_diffusion.class_words"
K_NAME = "{}.processor.to_k_custom_diffusion.weight"
V_NAME = "{}.processor.to_v_custom_diffusion.weight"
_KV = re.compile(r"^([a-z][A-Za-z0-9_.]*)\.processor\.to_([kv])_custom_diffusion\.weight$")
WEIGHT_NAME = "pytorch_custom_diffusion_weights.bin"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME
INFO_NAME = "studio_custom_diffusion.json"


def kv_layers(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (W_k, W_v)}`` of a concept's tensors, sorted by name (every layer has both)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _KV.match(name)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = t
    half = sorted(n for n, kv in found.items() if len(kv) != 2)
    if half:
        raise ConceptFormatError(f"Custom Diffusion layer {half[0]} has only one of to_k/to_v; a concept stores both.")
    return {n: (kv["k"], kv["v"]) for n, kv in sorted(found.items())}


def concept_embeddings(concept: Concept) -> list[torch.Tensor]:
    """The modifier tokens' input embeddings per text encoder, each ``(n, D_in)``."""
    return [concept.tensors[k] for k in EMBEDDINGS if k in concept.tensors]


def class_words(concept: Concept) -> list[str]:
    """The class noun of every token (one per token; a single concept's is ``concept.class_word``)."""
    raw = concept.meta.get(META_CLASS_WORDS)
    if raw is None:
        return [concept.class_word] * len(concept.tokens)
    try:
        words = json.loads(raw)
    except ValueError:
        words = None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or len(words) != len(concept.tokens):
        raise ConceptFormatError(f"Custom Diffusion concept {concept.name or concept.trigger}: {META_CLASS_WORDS} must "
                                 f"be a JSON list of {len(concept.tokens)} strings (one class word per token).")
    return words


def export_diffusers(concept: Concept, out: Path) -> Path:
    """The folder diffusers' Custom Diffusion loader reads (module doc); returns the folder."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    folder = Path(out)
    if folder.suffix in (".safetensors", ".bin"):
        raise StudioError(f"{folder}: the diffusers Custom Diffusion export is a folder (weights + one file per "
                          "token); pass a folder path.")
    kv = kv_layers(concept.tensors)
    state: dict[str, object] = {}
    for name, (wk, wv) in kv.items():
        state[K_NAME.format(name)] = wk.detach().float().contiguous()
        state[V_NAME.format(name)] = wv.detach().float().contiguous()
        if name.endswith(".attn2"):  # the block's self-attention keeps its weights: an empty entry
            state[name[: -len("attn2")] + "attn1.processor"] = {}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHT_NAME) as tmp:
        torch.save(state, str(tmp))
    embs = concept_embeddings(concept)
    files = []
    for i, token in enumerate(concept.tokens):
        rows = [e[i : i + 1].detach().float().contiguous() for e in embs]
        tensors = {token: rows[0]} if len(rows) == 1 else {"clip_l": rows[0], "clip_g": rows[1]}
        name = f"token_{i}.safetensors"
        with atomic_path(folder / name) as tmp:
            save_file(tensors, str(tmp), metadata={"modelspec.trigger_phrase": token})
        files.append(name)
    info = {"weights": WEIGHT_NAME, "tokens": list(concept.tokens), "class_words": class_words(concept),
            "token_files": files, "load": f'pipe.unet.load_attn_procs(folder, weight_name="{WEIGHT_NAME}"); '
            'pipe.load_textual_inversion(folder / token_file, token=token) for each token '
            "(SDXL: clip_l into text_encoder/tokenizer, clip_g into text_encoder_2/tokenizer_2)"}
    with atomic_path(folder / INFO_NAME) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


IMPORTERS: tuple = ()  # a diffusers export keeps the token in a second file: import is not offered yet
EXPORTERS = {"diffusers": export_diffusers}
