"""Break-A-Scene (Avrahami et al., "Break-A-Scene: Extracting Multiple Concepts from a Single Image",
SIGGRAPH Asia 2023, arXiv 2305.16311; docs/methods.md, "Break-A-Scene"): from one or a few photos and a
mask per concept, learn one token per concept (plus a LoRA they share), so that each concept can be
rendered alone or with the others.

**Inputs.** ``--images DIR`` (the photos) and ``--masks DIR`` holding ``<image-stem>.<concept>.png`` for
every image and every concept (white = the concept; soft edges allowed; masks may overlap). ``--concepts
name:class-word,…`` names the concepts (each becomes the token ``<name>``); left empty, the names are read
from the mask files and each class word is ``--class-word`` or the name. :func:`load_scene_masks`
checks everything before the pipeline is touched, each problem one line naming the file.

**Per step** (the shared loop draws the photos, flips, timesteps and noise; :mod:`trainers.loop`):

1. *union sampling* — each row draws ``k ~ U{1..N}`` and a random subset ``S`` of ``k`` concepts (in a
   random order); its prompt is ``"a photo of <a> and <b>"`` (``--prompt``, ``{}`` = the subset's
   tokens joined by " and "). A mirrored photo has mirrored masks (the loop's flip, p = 0.5);
2. *masked diffusion loss* (paper Eq. 1) — the denoising loss on the union ``M_S = max_{i∈S} M_i`` of the
   subset's masks, at the latent grid (the masks area-averaged to the latent's own size; the loop's
   masked MSE, normalised by the mask's area);
3. *cross-attention loss* (paper Eq. 2) — for each token ``i`` of ``S`` its cross-attention probability
   map, averaged over heads and over the cross-attention layers of **one** resolution, divided by its
   maximum, against ``M_i`` area-averaged to that grid: ``L_attn = (1/B) Σ_b Σ_{i∈S_b} mean((CA_i/max CA_i −
   M_i↓)²)``, weighted by ``λ_attn`` (``--attention-weight``, the paper's 1e-2). The maps come from the
   **same** UNet call as the diffusion loss, read only on the chosen layers (the shared processor's
   ``wants_probs``; every other layer keeps SDPA), and only from the instance rows: the class images of
   prior preservation sit after them and are never read;
4. ``L = L_rec + λ_prior·L_prior + λ_attn·L_attn`` (prior preservation optional, off by default:
   ``--prior-preservation``; without it the batch holds the instance rows only, and nothing breaks).

The layers read: those whose map side is ``latent_side / 4`` (the paper's 16 × 16 of SD's 64 × 64
latents) when the UNet has cross-attention there, else the coarsest level that has cross-attention
(:func:`attention_layers`; derived from the UNet's blocks, never a fixed list).

**Two phases** (paper §3.2). Phase 1 (``--phase1-steps``): only the new token rows train, at a high
rate. Phase 2: the tokens (at ``--phase2-token-factor`` × their phase-1 rate) and a LoRA of the UNet's
attention (``--rank``; ``--train-text-encoder`` adds one to the text encoder) at a low rate. Each phase
has its own Adam state, as the paper's fresh optimizer: the tokens of phase 2 are a second tensor, a copy
of phase 1's at the switch, and a tensor that does not train in a phase gets no gradient (Adam skips it).

**Rates in the base's units** (:mod:`trainers.rates`): the tokens ``--token-lr-scale`` × the RMS of the
class words' input embeddings on this base (as textual inversion), the LoRA ``--lr-scale`` / the mean
fan-in of the attention projections (as DreamBooth-LoRA, at a quarter of its rate: 0.02 = 2.6e-5 on SD
1.5 — the paper's phase 2 also runs below DreamBooth's rate). ``--token-lr`` /
``--lr`` give the optimizer's values as they are.

**Output**: one concept file per token (:mod:`studio.methods.break_a_scene`), each with its token and
the run's LoRA, named ``<out-stem>-<concept>.safetensors`` beside ``--out`` (or in the library, with
``--name`` as the stem). Resumable checkpoints, the NaN guard, previews and the verdict are the loop's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from studio.concept import Concept
from studio.configs import option
from studio.errors import DatasetError, TrainingError
from studio.images import open_image
from studio.methods.attention import AttentionHook, ConditioningStore, LayerInfo, add_hook, remove_hook, store_of
from studio.methods.break_a_scene import META_GROUP, META_TOKENS, METHOD, concept_tensors, group_id
from studio.methods.lora.keys import (
    TE_PREFIXES,
    UNET_PREFIX,
    LoraModule,
    kohya_metadata,
    kohya_name,
    kohya_tensors,
    te_path,
)
from studio.methods.runtime import SplicedEmbedding, text_encoders, token_table
from studio.methods.textual_inversion import class_embedding
from studio.models.profile import DEFAULT_GUIDANCE
from studio.prompts import normalize_token
from trainers.conditioning import Conditioning, TokenCache, encode_prompts
from trainers.core import layer_levels
from trainers.data import Example, _fit, _to_tensor, load_image_files, load_image_folder
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig, PriorSet, load_training_images
from trainers.rates import TEXT_ATTENTION, UNET_ATTENTION, attention_fan_in, embedding_rms, fan_in_rate

ADAPTER = "studio_break_a_scene"  # the PEFT adapter name while training
HOOK_KEY = "break_a_scene:train"
TABLE_KEY = "train:break_a_scene"
MASK_SUFFIX = ".png"


# -- the config -------------------------------------------------------------------------------------------------
@dataclass
class BreakASceneConfig(CommonTrainConfig):
    masks: str = option("", "folder of the concept masks: <image-stem>.<concept>.png for every image of --images and "
                        "every concept (white = the concept; masks may overlap), e.g. photo.dog.png, photo.mug.png",
                        group="data", path="folder")
    concepts: str = option("", "the concepts as name:class-word,… (e.g. dog:dog,mug:cup); each becomes the token "
                           "<name> and one concept file; empty = the names the mask files carry, class word = "
                           "--class-word or the name", group="concept")
    prompt: str = option("a photo of {}", "training prompt; {} = the drawn concepts' tokens joined by ' and '",
                         group="concept")
    use_templates: bool = option(False, "vary the prompt over --templates instead of --prompt", group="concept")
    steps: int = option(400, "optimizer steps, both phases", group="training")
    phase1_steps: int | None = option(None, "steps of phase 1, where only the tokens train (default: half of --steps)",
                                      group="training")
    batch_size: int = option(4, "images per step per process (each row draws its own concepts)", group="training")
    lr: float | None = option(None, "phase-2 learning rate of the LoRA, given to the optimizer as is (default: "
                              "--lr-scale / the mean fan-in of the base's attention projections)", group="training")
    lr_scale: float = option(0.02, "phase-2 LoRA rate in units of 1/fan-in of the adapted layers (μP; 0.02 = 2.6e-5 "
                             "on SD 1.5, a quarter of DreamBooth-LoRA's 0.078: at 0.078 one of three world photos lost "
                             "its editability, docs/methods.md)", group="training")
    token_lr: float | None = option(None, "phase-1 learning rate of the tokens, as is (default: --token-lr-scale × "
                                    "the RMS of the class words' input embeddings on this base)", group="training")
    token_lr_scale: float = option(0.35, "phase-1 token rate in units of the class words' embedding RMS (0.35 = "
                                   "textual inversion's 5e-3 on SD 1.5)", group="training")
    phase2_token_factor: float = option(0.1, "phase-2 token rate = this × the phase-1 rate (the paper: the tokens "
                                        "go on at the model's low rate)", group="training")
    rank: int = option(8, "LoRA rank of phase 2", group="lora")
    alpha: float | None = option(None, "LoRA alpha (default: the rank, so α/r = 1)", group="lora")
    target_modules: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get a LoRA",
                                       group="lora")
    train_text_encoder: bool = option(False, "also give the text encoder(s) a LoRA in phase 2", group="lora")
    text_encoder_targets: list[str] = option(["q_proj", "k_proj", "v_proj", "out_proj"],
                                             "text-encoder modules that get a LoRA", group="lora")
    attention_weight: float = option(1e-2, "λ_attn: weight of the cross-attention loss (each token's attention map "
                                     "vs its mask; the paper's 1e-2; 0 = off)", group="method")
    attention_side: int = option(0, "side of the cross-attention maps the loss reads (0 = latent side / 4 when the "
                                 "UNet attends there, else its coarsest cross-attention level)", group="method")
    prior_preservation: bool = option(False, "train on class images too (generated by the base from --class-prompt, "
                                      "unmasked; on in the paper's code, off here: on both learnable bases it lowered "
                                      "fidelity and did not raise editability, docs/methods.md)", group="prior")
    prior_weight: float = option(1.0, "λ_prior: weight of the class-image loss", group="prior")
    class_prompt: str | None = option(None, "class prompt (default: 'a photo of ' + the class words joined by ' and ')",
                                      group="prior")
    num_class_images: int = option(100, "class images to generate with the base (cached per base)", group="prior")
    class_images: str | None = option(None, "a folder of your own class images instead of generated ones",
                                      group="prior", path="folder")
    class_cache_dir: str | None = option(None, "class-image cache (default: ~/.cache/studio/class_images)",
                                         group="prior")
    class_steps: int = option(30, "sampling steps per generated class image", group="prior")
    class_guidance: float = option(DEFAULT_GUIDANCE, "guidance scale of generated class images", group="prior")
    class_batch_size: int = option(4, "class images generated per pipeline call", group="prior")
    budget: str = option("fixed", "fixed: train --steps steps (the two phases run their set lengths; the auto "
                         "budget would stop inside phase 1)", choices=["fixed"], group="training")

    def __post_init__(self) -> None:
        self.target_modules = [t.strip() for item in self.target_modules for t in item.split(",") if t.strip()]
        self.text_encoder_targets = [t.strip() for item in self.text_encoder_targets for t in item.split(",")
                                     if t.strip()]
        super().__post_init__()
        if self.budget != "fixed":
            raise TrainingError("Break-A-Scene runs its two phases for their set lengths: use --budget fixed.")
        if self.phase1_steps is None:
            self.phase1_steps = self.steps // 2
        if not 0 <= self.phase1_steps <= self.steps:
            raise TrainingError(f"phase1_steps must be between 0 and --steps ({self.steps}), got {self.phase1_steps}.")
        if self.token:
            raise TrainingError("Break-A-Scene names one token per concept (--concepts name:class-word makes <name>); "
                                "leave out --token.")
        if self.buckets:
            raise TrainingError("Break-A-Scene trains square crops (its masks follow the centre crop); leave out "
                                "--buckets.")
        if self.eval_every:
            raise TrainingError("--eval-every scores one concept and a Break-A-Scene run makes several; leave it out "
                                "and evaluate each concept file afterwards (python -m studio evaluate).")
        if self.gradient_checkpointing and self.attention_weight > 0:
            raise TrainingError("The cross-attention loss reads the maps of the training forward, which gradient "
                                "checkpointing recomputes without them: drop --gradient-checkpointing or set "
                                "--attention-weight 0.")
        for name in ("lr_scale", "token_lr_scale", "phase2_token_factor", "attention_weight", "prior_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise TrainingError(f"{name} must be a non-negative number, got {value}.")
        if self.token_lr is not None and not (self.token_lr >= 0 and math.isfinite(self.token_lr)):
            raise TrainingError(f"token_lr must be a non-negative number, got {self.token_lr}.")
        if self.attention_side < 0:
            raise TrainingError(f"attention_side must be ≥ 0 (0 = chosen from the UNet), got {self.attention_side}.")
        if self.rank < 1 or (self.alpha is not None and self.alpha <= 0):
            raise TrainingError(f"rank must be ≥ 1 and alpha > 0, got rank {self.rank}, alpha {self.alpha}.")
        if not self.target_modules or (self.train_text_encoder and not self.text_encoder_targets):
            raise TrainingError("--target-modules (and --text-encoder-targets with --train-text-encoder) must name "
                                "at least one module, e.g. to_q.")
        if "{}" not in self.prompt:
            raise TrainingError(f"--prompt {self.prompt!r} needs a {{}} where the concepts' tokens go, e.g. "
                                "'a photo of {}'.")
        if self.num_class_images < 1 or self.class_steps < 1 or self.class_batch_size < 1:
            raise TrainingError("num_class_images, class_steps and class_batch_size must be ≥ 1.")
        parse_concepts(self.concepts)  # syntax now; against the masks when training starts

    def derives_lr(self) -> bool:
        return True


PRESETS = {
    # The paper's recipe in the base's units: 400 + 400 steps, batch 1, prior preservation on.
    "paper": dict(steps=800, phase1_steps=400, batch_size=1, prior_preservation=True),
}


# -- concepts and masks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConcept:
    """One concept of the scene: its name (in mask file names), trigger token ``<name>`` and class word."""

    name: str
    token: str
    class_word: str


def parse_concepts(spec: str) -> list[tuple[str, str | None]]:
    """``"dog:dog,mug:cup"`` → ``[("dog", "dog"), ("mug", "cup")]`` (a missing class word is None)."""
    out: list[tuple[str, str | None]] = []
    if not spec.strip():
        return out
    for part in spec.split(","):
        name, _, word = part.strip().partition(":")
        name, word = name.strip(), word.strip()
        if not name or (":" in word):
            raise TrainingError(f"--concepts {spec!r}: each entry is name:class-word (or a name alone), e.g. "
                                "dog:dog,mug:cup.")
        normalize_token(name)  # the token <name> must be a valid trigger
        if name in {n for n, _ in out}:
            raise TrainingError(f"--concepts {spec!r} names {name!r} twice; give each concept its own name.")
        out.append((name, word or None))
    return out


@dataclass
class SceneMasks:
    """The concepts and, per training image (in the loop's order), their masks at the training crop:
    ``masks[i]`` (K, R, R) float32 in [0, 1], concept ``k`` on row ``k``."""

    concepts: list[SceneConcept]
    masks: list[torch.Tensor]


def _mask_image(path: Path) -> Image.Image:
    """A mask file as mode "L": its luminance, times its alpha when it has one (a transparent pixel is
    not the concept)."""
    img = open_image(path)
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        lum = img.convert("RGB").convert("L")
        return Image.composite(lum, Image.new("L", img.size, 0), alpha)
    return img.convert("L")


def load_scene_masks(masks_dir: str | os.PathLike[str], images: Sequence[Path], resolution: int, *,
                     concepts: str = "", class_word: str | None = None) -> SceneMasks:
    """Read and check the masks of ``images`` (the training photos, in the loop's order) from ``masks_dir``
    (module docstring): every image has a mask for every concept, of its size, not empty, inside the
    training crop; every file of the folder is such a mask. Each problem raises one
    :class:`~studio.errors.DatasetError` naming the file and what to do."""
    root = Path(masks_dir).expanduser() if masks_dir else None
    if root is None or not root.is_dir():
        raise DatasetError(f"--masks {masks_dir or '(empty)'} is not a folder; pass the folder that holds "
                           "<image-stem>.<concept>.png for every training image and concept.")
    stems = sorted({p.stem for p in images}, key=len, reverse=True)  # the longest stem wins ("a.b" before "a")
    found: dict[tuple[str, str], Path] = {}
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if not p.name.lower().endswith(MASK_SUFFIX):
            raise DatasetError(f"{p.name} in {root} is not a mask: masks are <image-stem>.<concept>.png; move it out.")
        body = p.name[: -len(MASK_SUFFIX)]
        stem = next((s for s in stems if body.startswith(s + ".") and len(body) > len(s) + 1), None)
        if stem is None:
            raise DatasetError(f"{p.name} in {root} names no training image: masks are <image-stem>.<concept>.png "
                               f"for images {', '.join(sorted(stems)[:4])}{' …' if len(stems) > 4 else ''}.")
        found[(stem, body[len(stem) + 1:])] = p
    listed = parse_concepts(concepts)
    names = [n for n, _ in listed] or sorted({c for _, c in found})
    if not names:
        raise DatasetError(f"{root} holds no masks; add <image-stem>.<concept>.png for each image and concept "
                           "(white = the concept).")
    for (_, name), p in found.items():
        if name not in names:
            raise DatasetError(f"{p.name} is a mask of concept {name!r}, which --concepts does not list "
                               f"({', '.join(names)}); add it there or move the file out of {root}.")
    words = dict(listed)
    scene = []
    for name in names:
        try:
            token = normalize_token(name)
        except Exception as err:
            raise DatasetError(f"Concept name {name!r} (from the mask files) cannot be a token: {err}") from None
        scene.append(SceneConcept(name, token, words.get(name) or class_word or name))
    masks = []
    for image in images:
        with Image.open(image) as im:
            size = im.size
        rows = []
        for c in scene:
            found_path = found.get((image.stem, c.name))
            if found_path is None:
                raise DatasetError(f"No mask of concept {c.name!r} for {image.name}: add {root / f'{image.stem}.{c.name}.png'} "
                                   "(white = the concept).")
            p = found_path
            m = _mask_image(p)
            if m.size != size:
                raise DatasetError(f"{p.name} is {m.size[0]}×{m.size[1]} but {image.name} is {size[0]}×{size[1]}; a "
                                   "mask must have the size of its image.")
            if m.getbbox() is None:
                raise DatasetError(f"{p.name} is empty (all black); paint concept {c.name!r} white, or leave the "
                                   "concept out of --concepts.")
            t = _to_tensor(_fit(m, resolution, Image.Resampling.BILINEAR))[0]
            if float(t.max()) <= 0:
                raise DatasetError(f"{p.name}: concept {c.name!r} lies outside the square centre crop the photo is "
                                   "trained on; crop the photo so the concept is near its middle.")
            rows.append(t)
        masks.append(torch.stack(rows))
    return SceneMasks(scene, masks)


# -- which cross-attention layers the loss reads --------------------------------------------------------------------
def attention_layers(unet: Any, latent_side: int, side: int = 0) -> tuple[int, list[int]]:
    """``(map side, layer indices in execution order)`` of the cross-attention layers the loss reads: with
    ``side`` 0, those whose maps are ``latent_side / 4`` on a side when such layers exist, else the layers of
    the coarsest level that has cross-attention; else exactly the layers of side ``side`` (an error lists
    the sides this UNet has). Sides follow the UNet's downsamplers: ``⌈s / 2⌉`` per level."""
    levels = layer_levels(unet)
    if not levels:
        raise TrainingError("This UNet has no cross-attention layers; Break-A-Scene needs them.")
    sides = []
    for level in levels:
        s = latent_side
        for _ in range(level):
            s = -(-s // 2)
        sides.append(s)
    if side:
        chosen = [i for i, s in enumerate(sides) if s == side]
        if not chosen:
            raise TrainingError(f"--attention-side {side}: this UNet's cross-attention maps are "
                                f"{', '.join(str(s) for s in sorted(set(sides), reverse=True))} on a side at this "
                                "resolution; pass one of them, or 0 to choose.")
        return side, chosen
    target = latent_side // 4 if latent_side % 4 == 0 else -1
    chosen = [i for i, s in enumerate(sides) if s == target]
    if not chosen:
        coarsest = max(levels)
        chosen = [i for i, lv in enumerate(levels) if lv == coarsest]
    return sides[chosen[0]], chosen


class AttentionMaps(AttentionHook):
    """Keeps, per read layer, the training forward's cross-attention probabilities averaged over heads —
    ``(B, N, T)``, in the autograd graph — while :attr:`active` (set by the trainer for the training
    call only: not the probe's, not previews)."""

    def __init__(self, layers: Sequence[int]):
        self.layers = frozenset(layers)
        self.active = False
        self.maps: dict[int, torch.Tensor] = {}

    def wants_probs(self, store: ConditioningStore, layer: LayerInfo) -> bool:
        return self.active and layer.index in self.layers and torch.is_grad_enabled()

    def probs(self, store: ConditioningStore, layer: LayerInfo, probs: torch.Tensor, rows: slice) -> None:
        self.maps[layer.index] = probs.mean(dim=1)  # (B, heads, N, T) -> (B, N, T)


def attention_loss(maps: torch.Tensor, positions: Sequence[Sequence[int]], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Paper Eq. 2 over a batch: ``(1/B) Σ_b Σ_k mean((A_bk / max A_bk − M_bk)²)``.

    ``maps`` (B, N, T): attention probabilities averaged over heads and layers (``N = side²`` pixels);
    ``positions[b]``: the prompt positions of row ``b``'s tokens; ``targets[b]`` (K_b, side, side): their
    masks at the maps' grid, in the same order."""
    total = maps.new_zeros(())
    for b, (pos, target) in enumerate(zip(positions, targets)):
        if not pos:
            continue
        a = maps[b][:, list(pos)].transpose(0, 1)  # (K_b, N)
        a = a / a.amax(dim=1, keepdim=True).clamp_min(1e-12)
        t = target.reshape(len(pos), -1).to(a)
        total = total + ((a - t) ** 2).mean(dim=1).sum()
    return total / max(len(positions), 1)


# -- class images ---------------------------------------------------------------------------------------------------
def scene_prior(base: Any, cfg: BreakASceneConfig, class_text: str, resolution: int) -> PriorSet | None:
    """Prior preservation's class images (the user's folder, or generated by the untouched base from
    ``class_text`` and cached per base, as DreamBooth's), or None when off."""
    if not cfg.prior_preservation:
        return None
    from trainers.lora import ensure_class_images

    if cfg.class_images:
        examples = load_image_folder(cfg.class_images, resolution)
    else:
        paths = ensure_class_images(base, class_text, resolution, cfg.num_class_images, root=cfg.class_cache_dir,
                                    steps=cfg.class_steps, guidance=cfg.class_guidance, batch_size=cfg.class_batch_size)
        examples = load_image_files(paths, resolution)
    return PriorSet(examples=examples, prompts=[e.caption or class_text for e in examples], weight=cfg.prior_weight)


# -- the trainer ----------------------------------------------------------------------------------------------------
class BreakASceneTrainer:
    """Tokens (one row per concept and text encoder) and a LoRA, in two phases (module docstring)."""

    def __init__(self, base: Any, cfg: BreakASceneConfig, token: str = ""):
        from studio.models.families import check_unet_family

        check_unet_family(base, "Break-A-Scene concepts")  # SD 3 / FLUX: one sentence, nothing touched
        self.base, self.cfg = base, cfg
        pipe = base.pipe
        self.unet = pipe.unet
        table = getattr(pipe, "_studio_tokens", None)
        store = store_of(self.unet)
        if (table is not None and table.entries) or getattr(pipe, "_studio_lora", None) \
                or getattr(self.unet, "peft_config", None) \
                or (store is not None and any(not h.passive for h in store.hooks.values())):
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        self.resolution = cfg.resolution or base.native_size
        self.measuring = False  # set by the probe while it measures
        # 1. the photos in the loop's order, their masks; everything checked before the pipeline is touched
        examples = load_training_images(cfg, base)
        scene = load_scene_masks(cfg.masks, [ex.path for ex in examples], self.resolution, concepts=cfg.concepts,
                                 class_word=cfg.class_word)
        self.concepts, self.masks = scene.concepts, scene.masks
        self.tokens = [c.token for c in self.concepts]
        self.class_text = cfg.class_prompt or "a photo of " + " and ".join(c.class_word for c in self.concepts)
        # 2. class images come from the untouched base
        self._prior = scene_prior(base, cfg, self.class_text, self.resolution)
        latent_side = self.resolution // int(getattr(pipe, "vae_scale_factor", 8))
        self.side, self.layers = attention_layers(self.unet, latent_side, cfg.attention_side)
        self.state = torch.zeros(1, dtype=torch.int64)  # optimizer steps done (run state, checkpointed)
        self.micro = 0
        self.phase = 0  # the phase whose tensors are installed (0 = none yet)
        self._rows: list[list[int]] | None = None  # this micro-step's concepts per row (indices into self.concepts)
        self._prompts: list[str] = []
        self._targets: list[torch.Tensor] = []
        self._lat: dict[tuple[int, int, int, int], torch.Tensor] = {}  # (image, flip, h, w) -> (K, h, w)
        self._ids = TokenCache()
        self.values: dict[str, float] = {}  # the last attention loss, unweighted (logs, tests)
        self._position_cache: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        self.drawn: list[list[int]] = []  # every training row's concepts, in order (tests: union sampling)
        self.exported: list[Concept] = []  # the concepts of the last export()
        self.written: list[Path] = []  # the files save_concepts() wrote
        self._frozen = freeze_pipeline(pipe)
        self.table = token_table(pipe)
        self.hook: AttentionMaps | None = None
        self.components: list[tuple[str, nn.Module, list[str]]] = []
        try:
            self._install()
        except BaseException:
            self.teardown()
            raise

    def _install(self) -> None:
        pipe, cfg = self.base.pipe, self.cfg
        # tokens: each concept starts from its class word's input embedding (mean over its tokens)
        init = [torch.stack([class_embedding(tok, emb, c.class_word) for c in self.concepts])
                for tok, emb in zip(self.table.pristine_tokenizers, self.table.original_embeddings)]
        try:
            self.table.set(TABLE_KEY, self.tokens, init)
        except ValueError as err:
            raise TrainingError(f"Cannot add the tokens {', '.join(self.tokens)}: {err}; rename the concepts.") from None
        encoders = [te for _, te in text_encoders(pipe)]
        self.originals = [te.get_input_embeddings().original for te in encoders]
        dev = [te.device for te in encoders]
        self.phase1 = [nn.Parameter(v.clone().to(d, torch.float32)) for v, d in zip(init, dev)]
        self.phase2 = [nn.Parameter(v.clone().to(d, torch.float32)) for v, d in zip(init, dev)]
        # rates (trainers.rates): tokens in units of the class words' embedding RMS, the LoRA in 1/fan-in
        self.scales = []
        for tok, emb in zip(self.table.pristine_tokenizers, self.table.original_embeddings):
            ids = [i for c in self.concepts for i in tok(c.class_word, add_special_tokens=False).input_ids]
            self.scales.append(embedding_rms(emb, ids) if ids else 1.0)
        self.token_lrs = [cfg.token_lr if cfg.token_lr is not None else cfg.token_lr_scale * s for s in self.scales]
        # 3. the LoRA (trains in phase 2 only; B = 0, so it changes nothing before)
        from peft import LoraConfig

        alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        self.alpha = alpha
        self.components = [(UNET_PREFIX, self.unet, cfg.target_modules)]
        if cfg.train_text_encoder:
            self.components += [(p, te, cfg.text_encoder_targets) for p, te in zip(TE_PREFIXES[len(encoders)], encoders)]
        try:
            for _, model, targets in self.components:
                config = LoraConfig(r=cfg.rank, lora_alpha=alpha,  # type: ignore[arg-type]  # peft: alpha is a float scale
                                    init_lora_weights="gaussian", target_modules=targets)
                cast(Any, model).add_adapter(config, adapter_name=ADAPTER)
        except ValueError as err:
            raise TrainingError(f"Could not add the LoRA: {str(err).splitlines()[0]} (check --target-modules / "
                                "--text-encoder-targets).") from None
        g = torch.Generator().manual_seed(cfg.seed)
        self.lora: dict[str, nn.Parameter] = {}
        for prefix, model, _ in self.components:
            for name, p in sorted(model.named_parameters()):
                if f".{ADAPTER}." not in name:
                    continue
                with torch.no_grad():  # PEFT's "gaussian" init from our seed: A ~ N(0, 1/r²), B = 0
                    p.data = p.data.float()
                    value = torch.randn(p.shape, generator=g) / cfg.rank if ".lora_A." in name else torch.zeros(p.shape)
                    p.copy_(value.to(p.device))
                self.lora[f"{prefix}.{name}"] = p
        self.fan_in = [attention_fan_in(self.unet, UNET_ATTENTION)]
        if cfg.train_text_encoder:
            self.fan_in += [attention_fan_in(te, TEXT_ATTENTION) for te in encoders]
        self.lora_lrs = [cfg.lr if cfg.lr is not None else fan_in_rate(cfg.lr_scale, w) for w in self.fan_in]
        # 4. the attention maps of the chosen layers, read from the training forward
        if cfg.attention_weight > 0:
            self.hook = AttentionMaps(self.layers)
            add_hook(self.unet, HOOK_KEY, self.hook)
        self._set_phase()

    # -- phases ------------------------------------------------------------------------------------------------
    def _wanted_phase(self) -> int:
        return 1 if int(self.state[0]) < cast(int, self.cfg.phase1_steps) else 2

    def _set_phase(self) -> None:
        """Install the tensors of the phase the step count says (after a resume too): which token tensor the
        encoders read, and which tensors take gradients."""
        phase = self._wanted_phase()
        if phase == self.phase:
            return
        tokens = self.phase1 if phase == 1 else self.phase2
        for (_, te), original, p in zip(text_encoders(self.base.pipe), self.originals, tokens):
            te.set_input_embeddings(SplicedEmbedding(original, p))
        for p in self.phase1:
            p.requires_grad_(phase == 1)
        for p in [*self.phase2, *self.lora.values()]:
            p.requires_grad_(phase == 2)
        self.phase = phase

    def _tokens(self) -> list[nn.Parameter]:
        return self.phase1 if self.phase == 1 else self.phase2

    # -- what the loop asks --------------------------------------------------------------------------------------
    def prior(self) -> PriorSet | None:
        return self._prior

    def trainable(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for e, (p1, p2) in enumerate(zip(self.phase1, self.phase2)):
            out[f"break_a_scene.phase1.embedding.{e}"] = p1
            out[f"break_a_scene.phase2.embedding.{e}"] = p2
        out.update(self.lora)
        out["break_a_scene.step"] = self.state  # run state (no gradient): a resumed run draws what this one would
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        """Tokens of phase 1 at their rate, of phase 2 at ``phase2_token_factor`` × it, the LoRA per model at
        its rate; a group whose tensors do not train in a phase gets no gradient there (Adam skips it)."""
        groups: list[dict[str, Any]] = []
        for p, lr in zip(self.phase1, self.token_lrs):
            groups.append({"params": [p], "lr": lr})
        for p, lr in zip(self.phase2, self.token_lrs):
            groups.append({"params": [p], "lr": lr * self.cfg.phase2_token_factor})
        for (prefix, _, _), lr in zip(self.components, self.lora_lrs):
            ps = [p for k, p in self.lora.items() if k.startswith(prefix + ".")]
            if ps:
                groups.append({"params": ps, "lr": lr})
        return groups

    def announce(self, log: Any) -> None:
        how = "--token-lr" if self.cfg.token_lr is not None else f"{self.cfg.token_lr_scale:g} × embedding RMS " + \
            ", ".join(f"{s:.4f}" for s in self.scales)
        log(f"Break-A-Scene: {len(self.concepts)} concepts ({', '.join(c.token + ' ' + c.class_word for c in self.concepts)}); "
            f"phase 1 {self.cfg.phase1_steps} steps, tokens at {', '.join(f'{lr:.3g}' for lr in self.token_lrs)} ({how}); "
            f"phase 2 {self.cfg.steps - cast(int, self.cfg.phase1_steps)} steps, LoRA at "
            f"{', '.join(f'{lr:.3g}' for lr in self.lora_lrs)}, tokens × {self.cfg.phase2_token_factor:g}")
        if self.hook is not None:
            log(f"cross-attention loss: {self.side}×{self.side} maps of {len(self.layers)} layer(s) {self.layers}, "
                f"λ_attn {self.cfg.attention_weight:g}")

    def record(self) -> dict[str, Any]:
        return {"concepts": [{"name": c.name, "token": c.token, "class_word": c.class_word} for c in self.concepts],
                "lr_effective": {"tokens": [round(lr, 10) for lr in self.token_lrs],
                                 "lora": [round(lr, 10) for lr in self.lora_lrs]},
                "embedding_rms": [round(s, 6) for s in self.scales], "fan_in": [round(w, 2) for w in self.fan_in],
                "attention_layers": list(self.layers), "attention_side": self.side}

    def class_prompts(self, templates: list[str]) -> list[str]:
        """What the probe compares the concepts' prompt with: every class word in its place."""
        words = " and ".join(c.class_word for c in self.concepts)
        return [self._template(t).format(words) for t in templates]

    def _template(self, template: str) -> str:
        return template if self.cfg.use_templates else self.cfg.prompt

    def _draw(self, n: int) -> list[list[int]]:
        """Union sampling for this micro-step's global batch of ``n`` rows (``k ~ U{1..N}``, then ``k`` of
        the concepts in a random order), from a generator seeded by (seed, step, micro-step)."""
        key = hash((int(self.cfg.seed), int(self.state[0]), self.micro, 0xB45)) & 0x7FFF_FFFF_FFFF_FFFF
        gen = torch.Generator().manual_seed(key)
        count = len(self.concepts)
        rows = []
        for _ in range(n):
            k = int(torch.randint(1, count + 1, (1,), generator=gen))
            rows.append([int(i) for i in torch.randperm(count, generator=gen)[:k]])
        return rows

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        """Each row's prompt: its drawn concepts' tokens (while the probe measures: all of them)."""
        if self.measuring:
            text = " and ".join(self.tokens)
            return [self._template(t).format(text) for t in templates]
        self._set_phase()
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        b = len(examples)
        rows = self._draw(b * world)[rank * b:(rank + 1) * b]
        self.micro += 1
        self._rows = rows
        self.drawn.extend(rows)
        self._prompts = [self._template(t).format(" and ".join(self.tokens[k] for k in row))
                         for t, row in zip(templates, rows)]
        return list(self._prompts)

    def _image_masks(self, image: int, flip: bool, h: int, w: int) -> torch.Tensor:
        """(K, h, w): image ``image``'s concept masks (mirrored with ``flip``), area-averaged to ``h × w``."""
        key = (image, int(flip), h, w)
        m = self._lat.get(key)
        if m is None:
            full = self.masks[image].flip(-1) if flip else self.masks[image]
            m = self._lat[key] = F.interpolate(full[:, None], size=(h, w), mode="area")[:, 0]
        return m

    def loss_mask(self, idx: torch.Tensor, flips: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B, 1, h, w): each row's union mask ``M_S`` at the latent grid ``size`` (paper Eq. 1); keeps each
        row's token masks at the attention grid for :meth:`extra_loss`. Called by the loop after
        :meth:`prompts` drew the rows' concepts."""
        rows = self._rows
        if rows is None or len(rows) != len(idx):
            raise RuntimeError("loss_mask called without the rows drawn by prompts()")
        h, w = int(size[-2]), int(size[-1])
        out, targets = [], []
        for row, i, f in zip(rows, idx.tolist(), flips.tolist()):
            out.append(self._image_masks(int(i), bool(f), h, w)[row].amax(dim=0, keepdim=True))
            targets.append(self._image_masks(int(i), bool(f), self.side, self.side)[row])
        self._targets = targets
        return torch.stack(out)

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        """(B, T, D) states; for a training call, the attention maps of the UNet call that follows are kept."""
        if self.hook is not None and not self.measuring and torch.is_grad_enabled() and self._rows is not None:
            self.hook.maps.clear()
            self.hook.active = True
        return encode_prompts(self.base.pipe, prompts, resolution=resolution, device=self.base.device, ids=self._ids)

    def _positions(self, prompt: str, row: list[int]) -> list[int]:
        """Where each of ``row``'s tokens sits in ``prompt`` (first text encoder's ids; start-of-text = 0);
        each (prompt, row) tokenized once — the rows repeat a handful of prompts every step."""
        key = (prompt, tuple(row))
        if key not in self._position_cache:
            self._position_cache[key] = self._find_positions(prompt, row)
        return list(self._position_cache[key])

    def _find_positions(self, prompt: str, row: list[int]) -> list[int]:
        tok = self.base.pipe.tokenizer
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        out = []
        for k in row:
            tid = tok.convert_tokens_to_ids(self.tokens[k])
            if tid not in ids:
                raise TrainingError(f"The prompt {prompt!r} is cut before {self.tokens[k]} (the text encoder reads "
                                    f"{tok.model_max_length} tokens); shorten --prompt.")
            out.append(ids.index(tid))
        return out

    def extra_loss(self) -> torch.Tensor | None:
        """``λ_attn · L_attn`` of the training call just made (paper Eq. 2), or None."""
        hook, rows = self.hook, self._rows
        if hook is None or not hook.active or rows is None:
            return None
        hook.active = False
        maps = dict(hook.maps)
        hook.maps.clear()
        missing = sorted(set(self.layers) - set(maps))
        if missing:
            raise RuntimeError(f"attention of layers {missing} was not captured")
        n = len(rows)
        avg = torch.stack([maps[i][:n].float() for i in self.layers]).mean(0)  # (n, N, T): the instance rows only
        if avg.shape[1] != self.side * self.side:
            raise RuntimeError(f"attention maps of {avg.shape[1]} pixels, expected {self.side}²")
        positions = [self._positions(p, row) for p, row in zip(self._prompts, rows)]
        loss = attention_loss(avg, positions, [t.to(avg.device) for t in self._targets])
        self.values["attention"] = float(loss.detach())
        return self.cfg.attention_weight * loss

    def after_step(self) -> None:
        self.state += 1
        self.micro = 0
        self._rows = None
        if int(self.state[0]) == self.cfg.phase1_steps:  # the switch: phase 2's tokens go on from phase 1's
            with torch.no_grad():
                for p1, p2 in zip(self.phase1, self.phase2):
                    p2.copy_(p1)
        self._set_phase()

    def preview_prompt(self, prompt: str) -> str:
        return prompt.format(" and ".join(self.tokens))

    # -- the result ----------------------------------------------------------------------------------------------
    def lora_layers(self) -> dict[str, Any]:
        """The PEFT LoRA layers of this training, by kohya module name."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        out: dict[str, Any] = {}
        for prefix, model, _ in self.components:
            for name, mod in model.named_modules():
                if isinstance(mod, BaseTunerLayer) and ADAPTER in getattr(mod, "lora_A", {}):
                    out[kohya_name(prefix, name if prefix == UNET_PREFIX else te_path(name))] = mod
        return out

    def export_all(self) -> list[Concept]:
        """One concept per token, each with the run's LoRA and the same group id (no I/O)."""
        modules = {name: LoraModule(down=mod.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                                    up=mod.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
                                    alpha=float(mod.lora_alpha[ADAPTER]))
                   for name, mod in self.lora_layers().items()}
        lora = kohya_tensors(modules)
        meta = kohya_metadata(modules, self.base.family) | {
            META_GROUP: group_id(lora), META_TOKENS: json.dumps(self.tokens),
            "ss_training_comment": f"studio Break-A-Scene; tokens: {' '.join(self.tokens)}"}
        tokens = self._tokens() if self.phase else self.phase1
        out = []
        for k, c in enumerate(self.concepts):
            embedding = [p.detach()[k:k + 1] for p in tokens]
            name = f"{self.cfg.name}-{c.name}" if self.cfg.name else c.name
            out.append(Concept(method=METHOD, tokens=[c.token], tensors=concept_tensors(embedding, lora),
                               class_word=c.class_word, name=name, meta=dict(meta)))
        return out

    def export(self) -> Concept:
        """The first concept (what the loop reports and probes); :meth:`save_concepts` writes every one, and
        :attr:`exported` keeps them all (the pipeline is handed back after the loop's last export)."""
        self.exported = self.export_all()
        return self.exported[0]

    def concept_paths(self, out: Path) -> list[Path]:
        """Where the files go: ``<out-stem>-<concept>.safetensors`` beside ``out``."""
        out = Path(out).expanduser()
        return [out.with_name(f"{out.stem}-{c.name}.safetensors") for c in self.concepts]

    def save_concepts(self, out: Path, concept: Concept) -> Path:
        """Write one file per token (:meth:`concept_paths`), each with ``concept``'s training record, base
        fingerprint and verdict; returns the first path."""
        from studio.methods import save_concept

        paths = self.concept_paths(out)
        for path, c in zip(paths, self.exported):
            c = replace(c, name=path.stem, train=dict(concept.train), base=dict(concept.base),
                        metrics=dict(concept.metrics))
            save_concept(c, path)
        self.written = paths
        return paths[0]

    def teardown(self) -> None:
        """Idempotent: the hook, the tokens and the LoRA leave; the modules get their gradient flags back."""
        pipe = self.base.pipe
        if getattr(self, "hook", None) is not None:
            remove_hook(self.unet, HOOK_KEY)
            self.hook = None
        table = getattr(self, "table", None)
        if table is not None:
            table.drop(TABLE_KEY)
        if getattr(self, "components", None):
            pipe.unload_lora_weights()
            self.components = []
        unfreeze(getattr(self, "_frozen", []))
        self._frozen = []


def make_trainer(base: Any, cfg: BreakASceneConfig, token: str = "") -> BreakASceneTrainer:
    return BreakASceneTrainer(base, cfg, token)


ENTRY = TrainerEntry(
    cli_name="break-a-scene", method=METHOD,
    help="Break-A-Scene: several concepts from one photo and a mask per concept — a token per concept + a shared "
         "LoRA, one file per token",
    config_cls=BreakASceneConfig, make_trainer=make_trainer, presets=PRESETS, default_preset=None, min_images=1,
    tokens_per_concept=True,
    gives="one file per concept: its token + the run's shared LoRA (megabytes on SD 1.5); several concepts from one "
          "photo, each alone or together",
)


@dataclass
class SceneResult:
    """What :func:`train_break_a_scene` returns: the concepts (each with its training record), the files
    written (empty without ``out``), and the loop's result."""

    concepts: list[Concept]
    paths: list[Path]
    result: Any


def train_break_a_scene(base: Any, images: str | os.PathLike[str], masks: str | os.PathLike[str],
                        cfg: BreakASceneConfig | None = None, *, out: str | os.PathLike[str] | None = None,
                        callbacks: Any = None, control: Any = None, **overrides: Any) -> SceneResult:
    """Train Break-A-Scene on ``base`` from the photos in ``images`` and the masks in ``masks`` (the CLI's
    ``--images`` / ``--masks``); ``cfg`` (default: the trainer's defaults) with ``overrides`` applied. With
    ``out`` (a ``.safetensors`` path) the files are written beside it (:meth:`BreakASceneTrainer.concept_paths`)."""
    from trainers.loop import run_training

    values = (dict(vars(cfg)) if cfg is not None else {}) | overrides | {"images": str(images), "masks": str(masks)}
    if out is not None:
        values["out"] = str(out)
    config = ENTRY.resolve("", **values)
    examples = load_training_images(config, base, min_images=ENTRY.min_images)
    trainer = make_trainer(base, config)
    result = run_training(base, trainer, config, method=METHOD, examples=examples, callbacks=callbacks,
                          control=control, save=out is not None)
    concepts = [replace(c, train=dict(result.concept.train), base=dict(result.concept.base),
                        metrics=dict(result.concept.metrics)) for c in trainer.exported]
    return SceneResult(concepts=concepts, paths=list(trainer.written), result=result)
