"""Reference photos, and the reference embeddings stored in a concept file (``ref.clip``/``ref.dino``).

A concept is scored against a folder of its photos (:func:`load_reference_images`) or, when no folder
is given, against the embeddings stored in it (:func:`attach_reference_embeddings`, ``--store-refs``),
which :func:`stand_ins` feeds to the metrics without re-encoding anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image

from studio.concept import Concept
from studio.errors import StudioError
from studio.evaluation.judges import Judges
from studio.evaluation.metrics import Scorer, image_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_images(folder: str | Path) -> list[Image.Image]:
    """The photos of a concept folder (png/jpg/webp/bmp, sorted; ``*.mask.png`` skipped), as RGB."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise StudioError(f"Reference folder {path} does not exist; pass the concept's photo folder.")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and ".mask." not in p.name)
    if not files:
        raise StudioError(f"Reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    from studio.images import open_image  # size-checked before decoding; errors name the file

    return [open_image(file).convert("RGB") for file in files]


def attach_reference_embeddings(concept: Concept, images: Sequence[Image.Image], clip: Scorer,
                                dino: Scorer | None = None) -> Concept:
    """A copy of ``concept`` carrying ``refs["clip"]`` ``(N, D)`` (and ``refs["dino"]``) of ``images``
    and the scorer names (``ref_models``); save it with :func:`~studio.methods.save_concept`."""
    if not images:
        raise StudioError("No reference images were given to embed.")
    refs, models = dict(concept.refs), dict(concept.ref_models)
    for role, scorer in (("clip", clip), ("dino", dino)):
        if scorer is not None:
            refs[role] = scorer.embed_images(list(images)).float().cpu()  # (N, D)
            models[role] = scorer.name
    return replace(concept, refs=refs, ref_models=models)


def stand_ins(concept: Concept, judges: Judges) -> list[Image.Image]:
    """Reference "images" for a concept known only by its stored embeddings.

    :func:`studio.evaluation.metrics.evaluate` takes reference images and looks every image up in the
    embedding cache by its content hash before encoding it. Each stored row gets a distinct 1-pixel-high
    stand-in image whose embedding is put in the cache under each judge's backbone name, so the
    stand-ins are never encoded; the stored rows are what is scored.
    """
    roles = [("clip", judges.clip)] + ([("dino", judges.dino)] if judges.dino is not None else [])
    for role, scorer in roles:
        if role not in concept.refs:
            raise StudioError(f"Concept {concept.name} has no stored {role} reference embeddings; pass its photos "
                              "(--images DIR), or store them with --store-refs.")
        made_by = concept.ref_models.get(role, "?")
        if scorer is not None and made_by != scorer.name:
            raise StudioError(f"Concept {concept.name}'s stored {role} references were made with {made_by}, not "
                              f"{scorer.name}; pass its photos (--images DIR) or that model.")
    count = concept.refs["clip"].shape[0]
    if any(concept.refs[role].shape[0] != count for role, _ in roles):
        raise StudioError(f"Concept {concept.name}'s stored reference embeddings disagree on the number of photos.")
    seed = hashlib.sha256(f"{concept.trigger}/{concept.name}".encode()).digest()
    images = [Image.frombytes("RGB", (16, 1), hashlib.sha256(seed + str(k).encode()).digest()[:48].ljust(48, b"\0"))
              for k in range(count)]
    for role, scorer in roles:
        for image, row in zip(images, concept.refs[role]):
            judges.cache.put(scorer.name, "image", image_key(image), row)  # type: ignore[union-attr]
    return images
