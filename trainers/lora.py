"""DreamBooth (Ruiz et al., CVPR 2023; docs/methods.md §3): bind a rare identifier + a class word
("sks dog") to a subject by fine-tuning, with prior preservation.

* **LoRA** (default, a small concept): PEFT ``LoraConfig`` adapters added through diffusers'
  ``unet.add_adapter`` on ``to_q, to_k, to_v, to_out.0`` (rank 8, α = rank), optionally on the
  text encoder(s)' ``q_proj, k_proj, v_proj, out_proj``; saved in kohya keys
  (:mod:`studio.methods.lora`). On by default on the text encoder too (as kohya's trainer does):
  at small widths the identifier has no trained meaning and a UNet-only LoRA cannot bind it
  (README, "Defaults that learn"). lr 1e-4 on SD 1.5, 500 steps.
* **Full** (``--full``): every UNet weight (and with ``--train-text-encoder`` every text-encoder
  weight) trains; the result is a diffusers folder (``--out DIR``) loadable as ``--base DIR``.
  lr 5e-6 (2e-6 with the text encoder) on SD 1.5, 800 steps. The base's weights are copied to CPU first and
  put back afterwards, so the loaded base is unchanged when training ends.
* **Prior preservation**: ``num_class_images`` images of the class prompt ("a photo of a dog") are
  generated once by the base and cached under ``class_cache_dir/<hash of base identity, prompt,
  resolution>/`` (reused by every later training on that base), or read from ``--class-images
  DIR``; each step trains on ``[instance ; class]`` in one forward with
  ``L = L_inst + w_prior · L_class`` (Ruiz et al., eq. 2; the loop does the batching).
* **Learning rate**: without ``--lr``, ``lr_scale / w`` per model, ``w`` the mean fan-in of its
  attention projections on this base (μP for Adam; :mod:`trainers.rates`): ``lr_scale`` 0.078 gives
  1e-4 on SD 1.5's UNet (w = 777) and text encoder (w = 768), 1.2e-3 on the demo world's (w ≈ 64).
  Printed at start and stored (``lr_effective``, ``fan_in``).
* **Identifier**: ``--token``, or the first of :data:`RARE_IDENTIFIERS` (rare, existing CLIP BPE
  tokens) that no concept of the library uses; the prompt text is ``"<identifier> <class word>"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from studio.atomic import atomic_path
from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.methods.base import plain_prompt_text
from studio.methods.lora import LoRA, quiet_loading
from studio.methods.lora.flow_keys import FLOW_PREFIX, default_targets, flow_te_prefixes
from studio.methods.lora.keys import (
    TE_PREFIXES,
    UNET_PREFIX,
    LoraModule,
    a1111_dropped,
    kohya_metadata,
    kohya_name,
    kohya_tensors,
    te_path,
)
from studio.methods.runtime import text_encoders
from studio.models.profile import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainers.classdiffusion import check_trainable_text, class_counterparts, semantic_preservation_loss
from trainers.conditioning import Conditioning, TokenCache, encode_prompts
from trainers.data import Example, load_image_files, load_image_folder
from trainers.entry import TrainerEntry
from trainers.flow import FlowOptions
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig, PriorSet
from trainers.output import finish_folder
from trainers.rates import TEXT_ATTENTION, UNET_ATTENTION, attention_fan_in, fan_in_rate
from trainers.templates import fill_templates

# Rare identifiers that the CLIP BPE vocabulary holds as one or two tokens (the paper picks rare
# tokens so the identifier starts with little meaning); tried in order, then with a digit suffix.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # --target-modules' default (the UNet's attention)
RARE_IDENTIFIERS = ("sks", "ohwx", "phol", "bnha", "zwx", "qwx", "vxn", "zkx", "zxq", "qzr")
ADAPTER = "studio_dreambooth"  # the PEFT adapter name while training
FULL_RECORD = "dreambooth-full"  # TrainResult.concept.method of a full fine-tune (weights are in the folder)
STUDIO_JSON = "studio.json"  # written into a full fine-tune's folder: trigger, class word, settings


def _split(items: list[str]) -> list[str]:
    """``["to_q,to_k", "to_v"]`` → ``["to_q", "to_k", "to_v"]`` (repeatable and comma-separated flags)."""
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


@dataclass
class DreamBoothConfig(FlowOptions, CommonTrainConfig):
    # None (→ the mode's default) is a valid input: the runtime hint ``| None`` makes these optional CLI/UI
    # fields; ``__post_init__`` always resolves them to numbers, as the base class's type promises.
    steps: int | None = option(None, "optimizer steps (default: 500 LoRA, 800 full)",  # type: ignore[assignment]
                               group="training")
    lr: float | None = option(None,
                              "learning rate given to the optimizer as is (default: --lr-scale / the mean fan-in of "
                              "the base's attention projections: 1e-4 for a LoRA on SD 1.5)", group="training")
    lr_scale: float | None = option(None, "learning rate in units of 1/fan-in of the trained layers (μP), used without "
                                    "--lr (default: 0.078 LoRA = 1e-4 on SD 1.5; 0.0039 full = 5e-6; 0.00155 full with "
                                    "the text encoder = 2e-6)", group="training")
    full: bool = option(False, "fine-tune every UNet weight and write a diffusers folder (--out DIR) instead of a LoRA",
                    group="method")
    rank: int = option(8, "LoRA rank r (8: measured on the learnable bases, where 4 under-fits one seed and 16 "
                           "over-fits the photos' backgrounds in 3 of 4 runs; README, \"Defaults that learn\")", group="lora")
    alpha: float | None = option(None, "LoRA alpha (default: the rank, so the update scale α/r is 1)", group="lora")
    target_modules: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get a LoRA "
                                   "(repeat or comma-separate; on SD 3 / FLUX this default means diffusers' "
                                   "example's transformer set: attention q/k/v/out of both streams, FLUX also the "
                                   "feed-forwards)", group="lora")
    train_text_encoder: bool = option(True, "also train the text encoder(s): LoRA on --text-encoder-targets (on by "
                                  "default, as kohya's), or with --full every weight", group="lora")
    text_encoder_targets: list[str] = option(["q_proj", "k_proj", "v_proj", "out_proj"],
                                         "text-encoder modules that get a LoRA", group="lora")
    text_encoder_lr: float | None = option(None, "text-encoder learning rate (default: --lr if given, else "
                                           "--lr-scale / the text encoder's fan-in)", group="lora")
    instance_prompt: str = option("a photo of a {}", "instance prompt; {} = identifier + class word", group="concept")
    use_templates: bool = option(True, "vary the instance prompt over --templates (on by default: with one fixed "
                                 "prompt the identifier also binds the photos' backgrounds — measured on the "
                                 "learnable bases, README \"Defaults that learn\"); off = --instance-prompt only",
                                 group="concept")
    prior_preservation: bool = option(True, "train on class images too (keeps the class word's meaning)", group="prior")
    prior_weight: float = option(1.0, "w_prior: weight of the class-image loss", group="prior")
    class_prompt: str | None = option(None, "class prompt (default: 'a photo of a CLASS_WORD')", group="prior")
    num_class_images: int = option(100, "class images to generate with the base (cached per base)", group="prior")
    class_images: str | None = option(None, "a folder of your own class images instead of generated ones", group="prior",
                                     path="folder")
    class_cache_dir: str | None = option(None, "class-image cache (default: ~/.cache/studio/class_images)", group="prior")
    class_steps: int = option(30, "sampling steps per generated class image", group="prior")
    class_guidance: float = option(DEFAULT_GUIDANCE, "guidance scale of generated class images", group="prior")
    class_batch_size: int = option(4, "class images generated per pipeline call", group="prior")
    cache_text_embeddings: bool = option(True, "encode each prompt once when the text encoder is frozen", group="memory")
    classdiffusion_weight: float = option(0.0, "ClassDiffusion: weight λ of the semantic preservation loss, 1 − cos "
                                          "between the text features of each training prompt and its class-word-only "
                                          "twin, added to the prior-preservation total (0 = off; the paper uses 1; "
                                          "needs --train-text-encoder)", group="classdiffusion")

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = 800 if self.full else 500
        if self.lr_scale is None:
            self.lr_scale = (0.00155 if self.train_text_encoder else 0.0039) if self.full else 0.078
        self.target_modules = _split(self.target_modules)
        self.text_encoder_targets = _split(self.text_encoder_targets)
        super().__post_init__()
        if not self.class_word:
            raise TrainingError("DreamBooth binds an identifier to a class: pass --class-word (what the subject is, "
                                "e.g. dog).")
        if "{}" not in self.instance_prompt:
            raise TrainingError(f"--instance-prompt {self.instance_prompt!r} needs a {{}} where the identifier and "
                                "class word go, e.g. 'a photo of a {}'.")
        if not (self.lr_scale >= 0 and math.isfinite(self.lr_scale)):
            raise TrainingError(f"lr_scale must be ≥ 0, got {self.lr_scale}.")
        if self.rank < 1 or (self.alpha is not None and self.alpha <= 0):
            raise TrainingError(f"rank must be ≥ 1 and alpha > 0, got rank {self.rank}, alpha {self.alpha}.")
        if not self.target_modules or (self.train_text_encoder and not self.text_encoder_targets):
            raise TrainingError("--target-modules (and --text-encoder-targets when training the text encoder) "
                                "must name at least one module, e.g. to_q.")
        if self.prior_weight < 0 or self.num_class_images < 1 or self.class_steps < 1 or self.class_batch_size < 1:
            raise TrainingError("prior_weight must be ≥ 0 and num_class_images, class_steps, class_batch_size ≥ 1.")
        check_trainable_text(self.classdiffusion_weight, self.train_text_encoder)

    def derives_lr(self) -> bool:
        return True

    def token_candidates(self) -> list[str]:
        return list(RARE_IDENTIFIERS) + [f"{t}{i}" for i in range(2, 10) for t in RARE_IDENTIFIERS]

    def writes_folder(self) -> bool:
        return self.full

    def class_text(self) -> str:
        return self.class_prompt or f"a photo of a {self.class_word}"


PRESETS = {
    # Rates in units of 1/fan-in (trainers.rates): the values in comments are SD 1.5's.
    "lora": dict(full=False, train_text_encoder=True, steps=500, lr_scale=0.078, rank=8, use_templates=True),  # 1e-4
    # diffusers' DreamBooth-LoRA example's recipe: rank 4, UNet only, one fixed instance prompt
    "lora-unet-only": dict(full=False, train_text_encoder=False, steps=500, lr_scale=0.078, rank=4,
                           use_templates=False),  # 1e-4
    # the paper's full fine-tune: one fixed instance prompt
    "full": dict(full=True, train_text_encoder=False, steps=800, lr_scale=0.0039, use_templates=False),  # 5e-6
    "full-text-encoder": dict(full=True, train_text_encoder=True, steps=800, lr_scale=0.00155,
                              use_templates=False),  # 2e-6
    # For --base demo (the learnable world: 32 px, a 64-wide text encoder), measured there: the
    # learning tests train with it (README, learning table).
    "demo-world": dict(full=False, train_text_encoder=True, steps=200, lr=2e-3, batch_size=4, rank=8,
                       num_class_images=48, class_steps=20, class_guidance=4.0, prior_weight=1.0, use_templates=False),
}
# ClassDiffusion (trainers.classdiffusion): the demo world's DreamBooth recipe with the semantic preservation
# loss on, beside prior preservation. λ = 0.01 (the low end of the paper's sweep): measured on the world,
# the paper's λ = 1 and 0.1 cost editability (README, "ClassDiffusion").
PRESETS["classdiffusion"] = dict(PRESETS["demo-world"], classdiffusion_weight=0.01)


# -- class images ---------------------------------------------------------------------------------
def default_class_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "studio" / "class_images"


def class_image_folder(base: Any, prompt: str, resolution: int, root: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of ``prompt`` at ``resolution`` on ``base``: keyed by the base's identity key,
    so two fine-tunes of one family never share class images."""
    key = json.dumps({"base": base.identity, "prompt": prompt, "resolution": int(resolution)}, sort_keys=True)
    return Path(root or default_class_cache()).expanduser() / hashlib.sha256(key.encode()).hexdigest()[:20]


@torch.no_grad()
def ensure_class_images(base: Any, prompt: str, resolution: int, count: int, *, root: str | os.PathLike[str] | None = None,
                        steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch_size: int = 4) -> list[Path]:
    """The paths of ``count`` class images, generating only the missing ones.

    Image ``i`` is sampled from a generator seeded with ``i``, so a cache grows consistently (100
    images now, 200 later) and concurrent processes write identical files (each atomically).
    """
    folder = class_image_folder(base, prompt, resolution, root)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"class-{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        print(f"generating {len(missing)} class image(s) of {prompt!r} with {base.name} → {folder}", file=sys.stderr)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        gens = [torch.Generator().manual_seed(i) for i in chunk]
        images = base.pipe(prompt=[prompt] * len(chunk), num_inference_steps=steps, guidance_scale=guidance,
                           width=resolution, height=resolution, generator=gens, output_type="pil").images
        for i, img in zip(chunk, images):
            with atomic_path(paths[i]) as tmp:
                img.save(tmp, format="PNG")
    info = folder / "meta.json"
    if not info.is_file():
        with atomic_path(info) as tmp:
            Path(tmp).write_text(json.dumps({"base": base.identity, "base_name": base.name, "prompt": prompt,
                                             "resolution": resolution, "steps": steps, "guidance": guidance}, indent=2))
    return paths


def class_prior(base: Any, cfg: Any, resolution: int) -> PriorSet | None:
    """Class images (the user's folder, or generated and cached) and their prompts, or None. ``cfg``: any config
    with DreamBooth's prior-preservation fields (DreamBooth's, Custom Diffusion's)."""
    if not cfg.prior_preservation:
        return None
    prompt = cfg.class_text()
    if cfg.class_images:
        examples = load_image_folder(cfg.class_images, resolution)
    else:
        paths = ensure_class_images(base, prompt, resolution, cfg.num_class_images, root=cfg.class_cache_dir,
                                    steps=cfg.class_steps, guidance=cfg.class_guidance, batch_size=cfg.class_batch_size)
        examples = load_image_files(paths, resolution)  # these only: the cache folder may hold more
    return PriorSet(examples=examples, prompts=[e.caption or prompt for e in examples], weight=cfg.prior_weight)


# -- trainers -------------------------------------------------------------------------------------
class _DreamBoothTrainer:
    """What LoRA and full fine-tuning share: the prior, prompts, cached text conditioning, freezing."""

    def __init__(self, base: Any, cfg: DreamBoothConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        pipe = base.pipe
        self.denoiser = base.denoiser  # the UNet, or the SD 3 / FLUX transformer
        # the pipeline's token table if it has one (making one here would copy every tokenizer for nothing)
        table = getattr(pipe, "_studio_tokens", None)
        if (table is not None and table.entries) or getattr(pipe, "_studio_lora", None) \
                or getattr(self.denoiser, "peft_config", None):
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        self.text = plain_prompt_text(Concept(method=LoRA.name, tokens=[token], tensors={},
                                              class_word=cfg.class_word or ""), 1.0)
        self.resolution = cfg.resolution or base.native_size
        # 1. class images come from the untouched base, before anything trains.
        self._prior = class_prior(base, cfg, self.resolution)
        # 2. freeze everything; subclasses unfreeze what trains.
        self.encoders = [te for _, te in text_encoders(pipe)]
        # 2b. the effective rates: the UNet's, then each trained text encoder's (trainers.rates)
        self.fan_in = [attention_fan_in(self.denoiser, UNET_ATTENTION)]
        if cfg.train_text_encoder:
            self.fan_in += [attention_fan_in(te, TEXT_ATTENTION) for te in self.encoders]
        scale = cast(float, cfg.lr_scale)
        self.lrs = [fan_in_rate(scale, w) for w in self.fan_in] if cfg.lr is None else \
            [cfg.lr] + [cfg.text_encoder_lr or cfg.lr] * (len(self.fan_in) - 1)
        if cfg.lr is None and cfg.text_encoder_lr is not None:
            self.lrs[1:] = [cfg.text_encoder_lr] * (len(self.fan_in) - 1)
        self._flags = freeze_pipeline(pipe)
        self._text_cache: dict[str, Conditioning] = {}
        self._ids = TokenCache()  # with a trained text encoder: each prompt tokenized once
        self._spl_pairs: tuple[list[str], list[str]] | None = None  # (concept prompts, class prompts) of this step
        self._te_checkpointing = cfg.gradient_checkpointing and cfg.train_text_encoder
        if self._te_checkpointing:
            for te in self.encoders:
                te.gradient_checkpointing_enable()

    def prior(self) -> PriorSet | None:
        return self._prior

    def _groups(self, params: dict[str, nn.Parameter], prefixes: list[str]) -> list[dict[str, Any]]:
        """One optimizer group per model (UNet, text encoder 1, 2) at its own rate, in ``self.lrs`` order."""
        groups = []
        for prefix, lr in zip(prefixes, self.lrs):
            ps = [p for k, p in params.items() if k.startswith(prefix + ".")]
            if ps:
                groups.append({"params": ps, "lr": lr})
        return groups

    def announce(self, log: Any) -> None:
        """Report the effective rates (before step 1)."""
        names = ["UNet"] + [f"text encoder {i + 1}" for i in range(len(self.lrs) - 1)]
        how = "--lr" if self.cfg.lr is not None else f"{self.cfg.lr_scale:g} / mean attention fan-in"
        rates = ", ".join(f"{n} {lr:.3g} (fan-in {w:.0f})" for n, lr, w in zip(names, self.lrs, self.fan_in))
        log(f"learning rate {rates} ({how})")

    def record(self) -> dict[str, Any]:
        """What the concept's ``studio.train`` keeps beyond the config: the effective rates and the widths."""
        return {"lr_effective": [round(lr, 10) for lr in self.lrs], "fan_in": [round(w, 2) for w in self.fan_in]}

    def class_prompts(self, templates: list[str]) -> list[str]:
        """What the probe compares the instance prompt with: the class prompt of prior preservation."""
        return [self.cfg.class_text()] * len(templates)

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        chosen = templates if self.cfg.use_templates else [self.cfg.instance_prompt] * len(examples)
        captions = [ex.caption for ex in examples]
        prompts = fill_templates(chosen, captions, self.token, self.text)
        if self.cfg.classdiffusion_weight > 0:  # this step's pairs for extra_loss (trainers.classdiffusion)
            self._spl_pairs = (prompts, class_counterparts(chosen, captions, self.token, self.cfg.class_word or ""))
        return prompts

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        """(B, 77, D) states (+ SDXL's pooled embeds and time ids). With frozen encoders each prompt is
        encoded once, alone (batch of one, so the values never depend on the batch it came in)."""
        pipe, device = self.base.pipe, self.base.device
        if self.cfg.train_text_encoder or not self.cfg.cache_text_embeddings:
            return encode_prompts(pipe, prompts, resolution=resolution, device=device, ids=self._ids)
        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                with torch.no_grad():
                    self._text_cache[p] = encode_prompts(pipe, [p], resolution=resolution, device=device)
        parts = [self._text_cache[p] for p in prompts]
        added = None
        if parts[0].added_cond_kwargs is not None:
            # every part comes from the same pipe: all have added_cond_kwargs when the first has
            added = {k: torch.cat([cast("dict[str, torch.Tensor]", c.added_cond_kwargs)[k] for c in parts])
                     for k in parts[0].added_cond_kwargs}
        return Conditioning(torch.cat([c.encoder_hidden_states for c in parts]), added)

    def extra_loss(self) -> torch.Tensor | None:
        """ClassDiffusion's ``λ · L_SPL`` over this step's instance prompts (``None`` when off); the loop
        adds it to ``L_inst + w_prior · L_class``, so both regularisers act together."""
        pairs, self._spl_pairs = self._spl_pairs, None
        if self.cfg.classdiffusion_weight <= 0 or pairs is None:
            return None
        loss = semantic_preservation_loss(self.base.pipe, pairs[0], pairs[1], self.base.device)
        return self.cfg.classdiffusion_weight * loss

    def after_step(self) -> None:
        pass

    def preview_prompt(self, prompt: str) -> str:
        return prompt.format(self.text)

    def _release(self) -> None:
        if self._te_checkpointing:
            for te in self.encoders:
                te.gradient_checkpointing_disable()
            self._te_checkpointing = False
        unfreeze(self._flags)
        self._flags = []


class DreamBoothLoRATrainer(_DreamBoothTrainer):
    """PEFT LoRA adapters on the UNet (and optionally the text encoders); only they train."""

    def __init__(self, base: Any, cfg: DreamBoothConfig, token: str):
        from peft import LoraConfig

        super().__init__(base, cfg, token)
        self.alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        prefixes = TE_PREFIXES[len(self.encoders)]
        # (kohya prefix, model, targets) per adapted component
        self.components: list[tuple[str, nn.Module, list[str]]] = [(UNET_PREFIX, self.denoiser, cfg.target_modules)]
        if getattr(base, "is_flow", False):  # SD 3 / FLUX: the transformer's names and targets (flow_keys)
            targets = default_targets(base.family) if cfg.target_modules == UNET_TARGETS else cfg.target_modules
            self.components = [(FLOW_PREFIX, self.denoiser, targets)]
            prefixes = flow_te_prefixes(len(self.encoders))
        if cfg.train_text_encoder:
            self.components += [(p, te, cfg.text_encoder_targets) for p, te in zip(prefixes, self.encoders)]
        try:
            for _, model, targets in self.components:
                # peft annotates lora_alpha as int, but uses it as a float scale (alpha / r)
                config = LoraConfig(r=cfg.rank, lora_alpha=self.alpha,  # type: ignore[arg-type]
                                    init_lora_weights="gaussian", target_modules=targets)
                # add_adapter: the PEFT mixin method of diffusers' / transformers' models
                cast(Any, model).add_adapter(config, adapter_name=ADAPTER)
        except ValueError as err:
            self.teardown()
            raise TrainingError(f"Could not add the LoRA: {str(err).splitlines()[0]} "
                                "(check --target-modules / --text-encoder-targets).") from None
        self.params = self._init_params(cfg.seed)

    def _init_params(self, seed: int) -> dict[str, nn.Parameter]:
        """Every LoRA parameter by a stable name (``<kohya prefix>.<PEFT name>``), in float32, drawn from a
        generator seeded with ``seed`` (PEFT's "gaussian" init: A ~ N(0, 1/r²), B = 0) so that a run is
        reproducible on any device."""
        g = torch.Generator().manual_seed(seed)
        params = {}
        for prefix, model, _ in self.components:
            for name, p in sorted(model.named_parameters()):
                if f".{ADAPTER}." not in name:
                    continue
                with torch.no_grad():
                    p.data = p.data.float()
                    value = torch.randn(p.shape, generator=g) / self.cfg.rank if ".lora_A." in name else torch.zeros(p.shape)
                    p.copy_(value.to(p.device))
                p.requires_grad_(True)
                params[f"{prefix}.{name}"] = p
        return params

    def trainable(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups(self.params, [prefix for prefix, _, _ in self.components])

    def announce(self, log: Any) -> None:
        """The effective rates, then one warning line when A1111 would leave out some of the adapted
        modules (SDXL: :func:`studio.methods.lora.keys.a1111_dropped`)."""
        super().announce(log)
        dropped = a1111_dropped(self.lora_layers(), family=self.base.family,
                                up_block_types=self.denoiser.config.get("up_block_types") or ())
        if dropped:
            log(f"warning: A1111 will not load the LoRA of {', '.join(dropped)} (its SDXL key conversion has no "
                "layer for them; ComfyUI and diffusers apply them): leave them out of --target-modules / "
                "--text-encoder-targets for a file that acts the same in A1111.")

    def lora_layers(self) -> dict[str, Any]:
        """The PEFT LoRA layers of this training, by kohya module name."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        out: dict[str, Any] = {}
        for prefix, model, _ in self.components:
            for name, mod in model.named_modules():
                if isinstance(mod, BaseTunerLayer) and ADAPTER in getattr(mod, "lora_A", {}):
                    out[kohya_name(prefix, name if prefix in (UNET_PREFIX, FLOW_PREFIX) else te_path(name))] = mod
        return out

    def export(self) -> Concept:
        modules = {name: LoraModule(down=mod.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                                    up=mod.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
                                    alpha=float(mod.lora_alpha[ADAPTER]))
                   for name, mod in self.lora_layers().items()}
        meta = kohya_metadata(modules, self.base.family)
        meta.update({"ss_sd_model_name": self.base.name, "ss_resolution": f"({self.resolution}, {self.resolution})",
                     "ss_max_train_steps": str(self.cfg.steps), "ss_learning_rate": str(self.lrs[0]),
                     "ss_training_comment": f"studio DreamBooth-LoRA; trigger: {self.text}"})
        return Concept(method=LoRA.name, tokens=[self.token], tensors=kohya_tensors(modules),
                       class_word=self.cfg.class_word or "", name=self.cfg.name or self.token.strip("<>"), meta=meta)

    def teardown(self) -> None:
        """Idempotent: every PEFT layer leaves the pipeline (its modules are the base's again)."""
        self.base.pipe.unload_lora_weights()
        self._release()


class DreamBoothFullTrainer(_DreamBoothTrainer):
    """Every UNet weight (and, with ``train_text_encoder``, every text-encoder weight) trains in place;
    a CPU copy of the base's weights restores the pipeline afterwards."""

    def __init__(self, base: Any, cfg: DreamBoothConfig, token: str):
        super().__init__(base, cfg, token)
        models = {"unet": base.pipe.unet}
        if cfg.train_text_encoder:
            models.update({f"text_encoder{'_' + str(i + 1) if i else ''}": te for i, te in enumerate(self.encoders)})
        self.models = models
        self.params = {f"{m}.{n}": p for m, model in models.items() for n, p in model.named_parameters()}
        low = sorted({str(p.dtype) for p in self.params.values() if p.dtype != torch.float32})
        if low:
            self._release()
            raise TrainingError(f"A full fine-tune needs float32 weights (the base is loaded in {', '.join(low)}); "
                                "load it with --dtype fp32 and train with --mixed-precision fp16 or bf16.")
        self._backup = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)

    def trainable(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups(self.params, list(self.models))

    def export(self) -> Concept:
        """A record of the training (trigger, class word); the weights are written by :meth:`save_model`."""
        return Concept(method=FULL_RECORD, tokens=[self.token], tensors={}, class_word=self.cfg.class_word or "",
                       name=self.cfg.name or self.token.strip("<>"))

    def save_model(self, path: Path, record: Concept) -> Path:
        """Write the fine-tuned pipeline as a diffusers folder (atomically: a temporary folder renamed),
        with ``studio.json`` saying how to prompt it."""
        path = Path(path).expanduser()
        from studio.atomic import temp_path

        tmp = temp_path(path)  # a killed writer's is recognised and removed (studio.atomic)
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet_loading():  # no per-shard progress bars
            self.base.pipe.save_pretrained(str(tmp), safe_serialization=True)
        return finish_folder(tmp, path, STUDIO_JSON, {
            "prompt_text": self.text, "tokens": record.tokens, "class_word": record.class_word,
            "base": record.base, "train": record.train})

    def teardown(self) -> None:
        """Idempotent: the base's weights are copied back bit for bit."""
        if self._backup:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self._backup[k].to(p.device))
            self._backup = {}
        self._release()


def make_trainer(base: Any, cfg: DreamBoothConfig, token: str) -> _DreamBoothTrainer:
    if cfg.full and getattr(base, "is_flow", False):
        raise TrainingError(f"--full fine-tuning of {base.name}'s transformer is not supported yet; train a LoRA "
                            "(leave out --full).")
    return DreamBoothFullTrainer(base, cfg, token) if cfg.full else DreamBoothLoRATrainer(base, cfg, token)


ENTRY = TrainerEntry(
    cli_name="dreambooth", method=LoRA.name,
    help="DreamBooth with prior preservation: a LoRA concept (megabytes), or --full for a whole fine-tuned model",
    config_cls=DreamBoothConfig, make_trainer=make_trainer, presets=PRESETS, default_preset=None, min_images=1,
    gives="a LoRA of the UNet and text encoder: megabytes (3.2 MB at rank 4 on SD 1.5); about 2.5× textual inversion's time; default settings measured fidelity 0.57–0.98, editability 0.88–1.00 on two bases — the most detail, the most risk of copying the photos' backgrounds (more class images help)",
)
