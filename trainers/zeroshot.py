"""Fine-tune an IP-Adapter on a user's images (docs/methods.md §6): its image projection and the
decoupled ``to_k_ip``/``to_v_ip`` of every cross-attention layer; everything else stays frozen.

Training an adapter from nothing takes a large image–text dataset (the paper: 10 M pairs); what
a studio offers is adapting a published one to a domain — a style, a product line, faces of one
studio — or, where no adapter exists (the demo world), starting one (``--adapter new``: a base-
kind projection, ``to_k_ip``/``to_v_ip`` initialised from each layer's text ``to_k``/``to_v``, the
paper's initialisation).

Each step (shared loop, :mod:`trainers.loop`): the image's CLIP embedding (computed once per
image with the frozen encoder) conditions the UNet through the adapter, the prompt is the
image's caption (``name.txt``) or — images alone — the class word in a template, or the empty
prompt. As in the paper, the image, the text or both are dropped with small probabilities
(``image_drop``/``text_drop``/``both_drop``, 0.05 each) so classifier-free guidance works for each.

Output: a folder that diffusers' ``load_ip_adapter(OUT, subfolder="", weight_name=
"ip_adapter.safetensors")`` reads as is — ``ip_adapter.safetensors`` in the published layout
(``image_proj.*`` + ``ip_adapter.*``), ``image_encoder/`` (a copy of the CLIP encoder, unless
``--no-save-image-encoder``) and ``studio_adapter.json`` (settings, base, encoder source).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.methods.attention import add_hook, remove_hook
from studio.methods.zeroshot import check_trainable
from studio.methods.zeroshot.adapter import PRESETS as ADAPTER_PRESETS
from studio.methods.zeroshot.adapter import (
    WEIGHT_NAME,
    LoadedAdapter,
    build_adapter,
    new_adapter,
    published_state,
    read_adapter_state,
    resolve_adapter,
    save_adapter_file,
)
from studio.methods.zeroshot.encoder import check_encoder, load_image_encoder
from studio.methods.zeroshot.hook import IPAdapterHook
from trainers.conditioning import encode_prompts
from trainers.data import Example
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig
from trainers.output import finish_folder

STUDIO_JSON = "studio_adapter.json"
RECORD_METHOD = "ip_adapter"  # the trainer's record (never saved as a concept: the result is a folder)
HOOK_KEY = "train:ip-adapter"


@dataclass
class AdapterTrainConfig(CommonTrainConfig):
    out: str | None = option(None, "output folder (new or empty): ip_adapter.safetensors + image_encoder/", group="output")
    adapter: str = option("", "adapter to fine-tune: preset (sd15, sd15-plus, sdxl …), file, folder or hub path; 'new' "
                      "starts a base-kind adapter from scratch", group="adapter", path="model",
                      names=("new", *ADAPTER_PRESETS))
    image_encoder: str | None = option(None, "CLIP image-encoder folder (default: beside the adapter; needed with "
                                   "--adapter new)", group="adapter", path="model")
    num_tokens: int = option(4, "image tokens of a new adapter", group="adapter")
    train_projection: bool = option(True, "train the image projection", group="adapter")
    train_kv: bool = option(True, "train every layer's to_k_ip / to_v_ip", group="adapter")
    image_drop: float = option(0.05, "probability a sample trains without its image (the unconditional image branch)",
                           group="adapter")
    text_drop: float = option(0.05, "probability a sample trains without its caption", group="adapter")
    both_drop: float = option(0.05, "probability a sample trains without either", group="adapter")
    save_image_encoder: bool = option(True, "copy the image encoder into OUT/image_encoder (a self-contained folder)",
                                  group="output")
    flip: bool = option(False, "also train on mirrored images (off: the reference image and the target would differ)",
                    group="data")
    steps: int = option(1000, "optimizer steps", group="training")
    lr: float = option(1e-4, "learning rate (the paper: 1e-4, AdamW)", group="training")
    batch_size: int = option(4, "images per step per process", group="training")
    weight_decay: float = option(0.01, "AdamW weight decay (the paper: 0.01)", group="training")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.adapter:
            raise TrainingError("Say which adapter to fine-tune: --adapter PRESET|FILE|FOLDER, or --adapter new "
                                "--image-encoder DIR to start one.")
        if self.adapter == "new" and not self.image_encoder:
            raise TrainingError("--adapter new needs --image-encoder DIR (a CLIPVisionModelWithProjection folder).")
        drops = (self.image_drop, self.text_drop, self.both_drop)
        if any(not 0 <= p <= 1 for p in drops) or sum(drops) > 1:
            raise TrainingError(f"image_drop, text_drop and both_drop must be in [0, 1] and sum to ≤ 1, got {drops}.")
        if not (self.train_projection or self.train_kv):
            raise TrainingError("Nothing to train: keep --train-projection or --train-kv on.")
        if not 1 <= self.num_tokens <= 64:
            raise TrainingError(f"num_tokens must be between 1 and 64, got {self.num_tokens}.")

    def writes_folder(self) -> bool:
        return True


PRESETS = {
    # A domain fine-tune of a published adapter (the paper's optimizer settings, fewer steps).
    "finetune": dict(steps=1000, lr=1e-4, batch_size=4, weight_decay=0.01),
    # Quick look: a few hundred steps.
    "fast": dict(steps=200, lr=1e-4, batch_size=4, weight_decay=0.01),
}


class AdapterTrainer:
    """Trains a :class:`~studio.methods.ip_adapter.LoadedAdapter` through an
    :class:`~studio.methods.ip_adapter.IPAdapterHook` whose ``batch_embeds`` are the batch's images."""

    # The probe compares a concept's prompt with its class prompt; an adapter has no concept prompt
    # (its subject comes from the reference image), so no gain is measured for it.
    measurable = False

    def __init__(self, base: Any, cfg: AdapterTrainConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        check_trainable(base)  # SD 3 / FLUX.1: one sentence
        pipe, unet = base.pipe, base.pipe.unet
        # 1. the adapter and its image encoder.
        if cfg.adapter == "new":
            self.ref = None
            self.encoder = load_image_encoder(cfg.image_encoder, device=base.device, what="the new adapter")
            embed_dim = int(self.encoder.model.config.projection_dim)
            self.adapter: LoadedAdapter = new_adapter(unet, embed_dim, num_tokens=cfg.num_tokens, seed=cfg.seed)
            self.encoder_source = cfg.image_encoder
        else:
            self.ref = resolve_adapter(cfg.adapter, cfg.image_encoder)
            self.adapter = build_adapter(unet, read_adapter_state(self.ref.file), ref=self.ref,
                                         what=f"Adapter {cfg.adapter}")
            self.encoder = load_image_encoder(self.ref.image_encoder, device=base.device, what=f"adapter {cfg.adapter}")
            self.encoder_source = self.ref.image_encoder
        check_encoder(self.encoder, self.adapter.info, f"Adapter {cfg.adapter}")
        for m in (self.adapter.projection, self.adapter.to_k_ip, self.adapter.to_v_ip):
            m.to(base.device, torch.float32)
        # 2. freeze the pipeline; train what the config asks for.
        self._frozen = freeze_pipeline(pipe)
        self.params: dict[str, nn.Parameter] = {}
        if cfg.train_projection:
            self.adapter.projection.train()
            self.params.update({f"image_proj.{k}": p for k, p in self.adapter.projection.named_parameters()})
        if cfg.train_kv:
            for i, (k, v) in enumerate(zip(self.adapter.to_k_ip, self.adapter.to_v_ip)):
                self.params[f"ip.{i}.to_k_ip"] = cast(nn.Parameter, k.weight)
                self.params[f"ip.{i}.to_v_ip"] = cast(nn.Parameter, v.weight)
        for p in self.params.values():
            p.requires_grad_(True)
        # 3. the image attention, fed per batch.
        self.hook = IPAdapterHook(self.adapter, None, None)
        add_hook(unet, HOOK_KEY, self.hook)
        self.hook.attach(unet)
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rng = torch.Generator().manual_seed(cfg.seed + 7919)
        self._batch: torch.Tensor | None = None

    # -- the image side ---------------------------------------------------------------------------
    def _embed(self, ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding, negative)`` of one training image, (1, …) each, computed once."""
        key = str(ex.path)
        if key not in self._embeds:
            from studio.methods.zeroshot import open_images

            pos, neg = self.encoder.encode(open_images([ex.path]), hidden_states=self.adapter.info.hidden_states)
            self._embeds[key] = (pos, neg)
            if self.hook.embeds is None:  # previews show the first image
                dev = self.base.device
                self.hook.embeds, self.hook.negative = pos[None].to(dev), neg[None].to(dev)
        return self._embeds[key]

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        """Captions (or the class word in a template, or ""), with image/text dropout; remembers the
        batch's image embeddings (B, 1, …) for :meth:`conditioning`."""
        out, embeds = [], []
        cfg = self.cfg
        for tpl, ex in zip(templates, examples):
            text = ex.caption or (tpl.format(cfg.class_word) if cfg.class_word else "")
            pos, neg = self._embed(ex)
            u = float(torch.rand((), generator=self._rng))
            drop_image = u < cfg.image_drop or cfg.image_drop + cfg.text_drop <= u < cfg.image_drop + cfg.text_drop + cfg.both_drop
            drop_text = cfg.image_drop <= u < cfg.image_drop + cfg.text_drop + cfg.both_drop
            out.append("" if drop_text else text)
            embeds.append(neg if drop_image else pos)
        self._batch = torch.stack(embeds)  # (B, 1, …)
        return out

    def conditioning(self, prompts: list[str], resolution: int):
        with torch.no_grad():
            cond = encode_prompts(self.base.pipe, prompts, resolution=resolution, device=self.base.device)
        if self._batch is not None and self._batch.shape[0] == len(prompts):
            self.hook.batch_embeds = self._batch.to(self.base.device)
        return cond

    # -- the loop's protocol ----------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.params.values()), "lr": self.cfg.lr}]

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def preview_prompt(self, prompt: str) -> str:
        self.hook.batch_embeds = None  # previews use the first image's embedding
        return prompt.format(self.cfg.class_word or "")

    def export(self) -> Concept:
        """A record of the run; the weights are written by :meth:`save_model`."""
        return Concept(method=RECORD_METHOD, tokens=[self.token], tensors={}, class_word=self.cfg.class_word or "",
                       name=self.cfg.name or "adapter")

    def save_model(self, path: Path, record: Concept) -> Path:
        """Write the adapter folder atomically (a temporary folder renamed into place)."""
        path = Path(path).expanduser()
        from studio.atomic import temp_path

        tmp = temp_path(path)  # a killed writer's is recognised and removed (studio.atomic)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        unet = self.base.pipe.unet
        info = self.adapter.info
        meta = {"studio.adapter": json.dumps({"kind": info.kind, "base": record.base.get("name", "")})}
        save_adapter_file(tmp / WEIGHT_NAME, published_state(unet, self.adapter), metadata=meta)
        encoder = self.encoder_source
        if encoder and Path(encoder).expanduser().is_dir():
            encoder = str(Path(encoder).expanduser().resolve())
        if self.cfg.save_image_encoder:
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self.encoder.model.save_pretrained(str(tmp / "image_encoder"))
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            encoder = "image_encoder"
        return finish_folder(tmp, path, STUDIO_JSON, {
            "weight_name": WEIGHT_NAME, "kind": info.kind, "num_tokens": info.num_tokens,
            "image_encoder": encoder, "started_from": self.cfg.adapter,
            "base": record.base, "train": record.train})

    def teardown(self) -> None:
        """Idempotent: the hook leaves, the pipeline's weights are trainable again as before."""
        if self.hook is not None:
            self.hook.detach()
            remove_hook(self.base.pipe.unet, HOOK_KEY)
            self.hook = None  # type: ignore[assignment]
        unfreeze(self._frozen)
        self._frozen = []
        self.adapter.to_eval()


ENTRY = TrainerEntry(
    cli_name="adapter", method=RECORD_METHOD,
    help="fine-tune an IP-Adapter (projection + decoupled K/V) on your images; writes an adapter folder (--out DIR)",
    config_cls=AdapterTrainConfig, make_trainer=AdapterTrainer, presets=PRESETS, default_preset="finetune",
    min_images=1,
    gives="an IP-Adapter for this base (a folder, not a concept): afterwards any subject becomes a zero-shot concept from a few reference photos, with no training (Zero-shot tab)",
)
