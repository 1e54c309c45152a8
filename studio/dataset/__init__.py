"""Dataset preparation: from a folder of phone photos to a training set.

One module per step, each usable from Python, from ``python -m studio dataset STEP DIR`` and from the
Train tab's dataset step:

* :mod:`.inspect` — per image size, aspect, blur, near-duplicates, EXIF orientation; a report with warnings;
* :mod:`.caption` — captions from an image-to-text model (or tags), trigger and class word inserted,
  ``name.txt`` sidecars;
* :mod:`.mask` — subject masks from a text-prompted segmenter, or an offline classical fallback,
  ``name.mask.png`` sidecars (every trainer's masked loss reads them);
* :mod:`.crop` — subject-aware crops to the training size.

The folder layout is the one :mod:`trainers.data` reads. This package sits below the trainers
(``pyproject.toml``'s layers): it never imports them.
"""
