"""Train a few TI steps on the tiny base; used by the multi-process equivalence test.

usage: train_ti.py IMAGES OUT BATCH_SIZE   (run plainly, or under ``accelerate launch``)
"""

import sys

import torch

torch.set_num_threads(1)

from studio.models import load_base  # noqa: E402
from trainers import get_trainer  # noqa: E402
from trainers.runner import train  # noqa: E402

images, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = get_trainer("textual-inversion").resolve(images=images, out=out, class_word="cat", steps=3,
                  batch_size=batch, lr=5e-2, log_every=0, flip=True)
train(get_trainer("textual-inversion"), cfg, load_base("tiny", device="cpu"))
