"""Custom Diffusion training (Kumari et al., CVPR 2023, arXiv 2212.04488, §3.1; docs/methods.md,
"Custom Diffusion"): the cross-attention ``W_k``/``W_v`` of every UNet layer and a new modifier token's
input embedding learn, everything else is frozen.

Per step (the shared loop does data, noise, the masked loss, prior preservation and checkpoints):

1. the prompt ``"photo of a <new1> cat"`` (``--instance-prompt``; ``{}`` = token + class noun) is encoded
   with the token's trainable embedding spliced into the encoder (one Parameter per encoder: only that
   row trains — the paper zeroes the other rows' gradients; a separate row is the same update and
   never touches the vocabulary);
2. every cross-attention layer computes ``K = (W₀_k + ΔW_k) ctx`` and ``V = (W₀_v + ΔW_v) ctx`` through the
   same hook as inference (:class:`~studio.methods.custom_diffusion.CustomDiffusionHook`), with
   ``ΔW`` trainable Parameters that start at 0 (Adam's steps on ``ΔW`` are exactly its steps on ``W``);
3. ``L = ‖ε − ε̂‖²`` on the photos (masked by their masks when present) ``+ λ_prior · ‖ε − ε̂‖²`` on class
   images of ``"photo of a cat"`` (the paper's regularisation set, λ = 1): generated once by the base and
   cached per base as DreamBooth's (shared cache), or ``--class-images DIR`` — the paper retrieves ~200
   real LAION images with CLIP, which needs a service that no longer exists; a folder of real photos of
   the class is the closest.

**Learning rate** (the paper: 1e-5 per sample, scaled by the batch: diffusers' ``--scale_lr`` multiplies
it by batch × accumulation × GPUs, so batch 2 on one GPU trains at 2e-5; the CompVis config's 2 GPUs ×
batch 4 at 8e-5). Here the per-sample rate is stated in units of ``1/fan-in`` of the trained matrices
(μP for Adam, :mod:`trainers.rates`): ``--lr-scale`` 0.00768 is 1e-5 on SD 1.5, whose K/V read the
768-d text. With ``--scale-lr`` (on, as the paper) it is multiplied by batch × accumulation × processes.
The token trains at the same rate (the paper has one optimizer group for both) unless ``--token-lr``.
On the demo world (64-d text) the paper's rule gives 2.4e-4 at batch 2, which does not learn the
concept within a few hundred steps there; its ``demo-world`` preset is measured (README).

**Not ported**: the paper's random-scale augmentation (shrink to [res/3, res] on black with a valid-area
mask and "a far away"/"very small" prompts, or zoom 1.2–1.4× with "zoomed in"/"close up") changes the
pixels, the mask and the prompt of a sample per step; the shared loop encodes every photo with the VAE
once and gives a trainer no per-step hook on the latents, so it would need a loop change (pre-encoded
scaled variants of each photo with their masks and prompt prefixes). Nor the ``--freeze_model crossattn``
variant (training ``to_q``/``to_out`` too, for faces).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.methods.attention import add_hook, remove_hook, store_of, unet_layers
from studio.methods.custom_diffusion import EMBEDDINGS, CustomDiffusion, CustomDiffusionHook, concept_tensors
from studio.methods.custom_diffusion.hook import base_weight
from studio.methods.runtime import SplicedEmbedding, text_encoders, token_table
from studio.models.profile import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainers.conditioning import Conditioning, encode_prompts
from trainers.data import Example
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig, PriorSet
from trainers.lora import class_prior
from trainers.templates import fill_templates

SD15_KV_FAN_IN = 768.0  # SD 1.5's cross-attention K/V read the 768-d CLIP-L text


@dataclass
class CustomDiffusionConfig(CommonTrainConfig):
    steps: int = option(500, "optimizer steps (the paper: 250 on 2 GPUs = 500 on one)", group="training")
    batch_size: int = option(2, "images per step per process (the paper: 2)", group="training")
    lr: float | None = option(None, "learning rate given to the optimizer as is (default: --lr-scale / the K/V "
                              "fan-in, × the batch with --scale-lr: 2e-5 on SD 1.5 at batch 2)", group="training")
    lr_scale: float = option(0.00768, "per-sample learning rate in units of 1/fan-in of the trained K/V (0.00768 = "
                             "the paper's 1e-5 on SD 1.5); used without --lr", group="training")
    scale_lr: bool = option(True, "multiply the derived rate by batch × accumulation × processes, as the paper",
                            group="training")
    token_lr: float | None = option(None, "learning rate of the modifier token's embedding (default: the K/V rate, "
                                    "as the paper)", group="training")
    init_token: str = option("ktn", "the modifier token starts from this word's input embedding (the paper's rare "
                             "'ktn'; mean over its tokens)", group="concept")
    instance_prompt: str = option("photo of a {}", "instance prompt; {} = the modifier token + class word",
                                  group="concept")
    use_templates: bool = option(False, "vary the instance prompt with --templates instead", group="concept")
    prior_preservation: bool = option(True, "train on class images too (the paper's regularisation set)", group="prior")
    prior_weight: float = option(1.0, "λ_prior: weight of the class-image loss", group="prior")
    class_prompt: str | None = option(None, "class prompt (default: 'photo of a CLASS_WORD')", group="prior")
    num_class_images: int = option(200, "class images (the paper: 200 retrieved real images; here generated by the "
                                   "base and cached per base, or --class-images)", group="prior")
    class_images: str | None = option(None, "a folder of real class images instead of generated ones", group="prior",
                                      path="folder")
    class_cache_dir: str | None = option(None, "class-image cache (default: ~/.cache/studio/class_images)",
                                         group="prior")
    class_steps: int = option(DEFAULT_STEPS, "sampling steps per generated class image", group="prior")
    class_guidance: float = option(DEFAULT_GUIDANCE, "guidance scale of generated class images", group="prior")
    class_batch_size: int = option(4, "class images generated per pipeline call", group="prior")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.class_word:
            raise TrainingError("Custom Diffusion puts a modifier before the class noun: pass --class-word (what "
                                "the subject is, e.g. dog).")
        if "{}" not in self.instance_prompt:
            raise TrainingError(f"--instance-prompt {self.instance_prompt!r} needs a {{}} where the token and class "
                                "word go, e.g. 'photo of a {}'.")
        rates = (self.lr_scale, self.token_lr)
        if any(r is not None and not (r >= 0 and math.isfinite(r)) for r in rates):
            raise TrainingError(f"lr_scale and token_lr must be ≥ 0, got {rates}.")
        if not self.init_token.strip():
            raise TrainingError("--init-token must name a word, e.g. ktn.")
        if self.prior_weight < 0 or self.num_class_images < 1 or self.class_steps < 1 or self.class_batch_size < 1:
            raise TrainingError("prior_weight must be ≥ 0 and num_class_images, class_steps, class_batch_size ≥ 1.")

    def derives_lr(self) -> bool:
        return True

    def token_candidates(self) -> list[str]:
        return [f"<new{i}>" for i in range(1, 100)]  # diffusers' and the paper's modifier names

    def class_text(self) -> str:
        return self.class_prompt or f"photo of a {self.class_word}"


PRESETS = {
    # The paper / diffusers README, single concept on one GPU: batch 2, 500 steps, 1e-5 × batch.
    "paper": dict(steps=500, batch_size=2, lr_scale=0.00768, scale_lr=True, num_class_images=200),
    # For --base demo (the learnable world: 32 px, a 64-wide text encoder), measured there (README).
    "demo-world": dict(steps=200, batch_size=4, lr=2e-3, token_lr=2e-2, scale_lr=False, num_class_images=48,
                       class_steps=20, class_guidance=4.0, prior_weight=1.0),
}


def init_embedding(tokenizer: Any, embedding: nn.Module, word: str) -> torch.Tensor:
    """``(1, D)``: the mean input embedding of ``word``'s tokens (no BOS/EOS)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise TrainingError(f"--init-token {word!r} has no tokens in this base's tokenizer; pass another word.")
    weight = next(iter(embedding.parameters()))
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=weight.device)).float().mean(0, keepdim=True).cpu()


class CustomDiffusionTrainer:
    """Trains ``ΔW_k``, ``ΔW_v`` of every cross-attention layer and the modifier token (module doc)."""

    def __init__(self, base: Any, cfg: CustomDiffusionConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        pipe, unet = base.pipe, base.pipe.unet
        self.table = token_table(pipe)
        store = store_of(unet)
        if self.table.entries or (store is not None and any(not h.passive for h in store.hooks.values())) \
                or getattr(pipe, "_studio_lora", None) or getattr(unet, "peft_config", None):
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        self.text = f"{token} {cfg.class_word}"
        self.resolution = cfg.resolution or base.native_size
        # 1. class images come from the untouched base, before anything is installed.
        self._prior = class_prior(base, cfg, self.resolution)  # DreamBooth's: the same fields, the same cache
        self._frozen = freeze_pipeline(pipe)
        self.key = f"train-custom_diffusion:{token}"
        self.hook_key: str | None = None
        try:
            self._install()
        except BaseException:
            self.teardown()
            raise

    def _install(self) -> None:
        pipe, unet, cfg = self.base.pipe, self.base.pipe.unet, self.cfg
        init = [init_embedding(tok, emb, cfg.init_token)
                for tok, emb in zip(self.table.pristine_tokenizers, self.table.original_embeddings)]
        try:
            self.table.set(self.key, [self.token], init)
        except ValueError as err:
            raise TrainingError(f"Cannot add the token {self.token}: {err}; pick another --token.") from None
        self.embeddings: list[nn.Parameter] = []
        for (_, te), v in zip(text_encoders(pipe), init):
            spliced = te.get_input_embeddings()
            p = nn.Parameter(v.clone().to(te.device, torch.float32))
            te.set_input_embeddings(SplicedEmbedding(spliced.original, p))
            self.embeddings.append(p)
        self.layers = unet_layers(unet)
        self.deltas: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        device = next(unet.parameters()).device
        for layer in self.layers:
            shape = (layer.inner_dim, layer.context_dim)
            self.deltas[layer.name] = (nn.Parameter(torch.zeros(shape, device=device)),
                                       nn.Parameter(torch.zeros(shape, device=device)))
        self.fan_in = sum(layer.context_dim for layer in self.layers) / len(self.layers)
        batch = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.lr_kv = cfg.lr if cfg.lr is not None else cfg.lr_scale / self.fan_in * (batch if cfg.scale_lr else 1)
        self.lr_token = cfg.token_lr if cfg.token_lr is not None else self.lr_kv
        self.hook_key = f"custom_diffusion:train:{self.token}"
        add_hook(unet, self.hook_key, CustomDiffusionHook(dict(self.deltas), train=True))

    def prior(self) -> PriorSet | None:
        return self._prior

    def trainable(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(zip(EMBEDDINGS, self.embeddings))
        for name, (dk, dv) in self.deltas.items():
            out[f"delta.{name}.to_k"], out[f"delta.{name}.to_v"] = dk, dv
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        kv = [p for pair in self.deltas.values() for p in pair]
        return [{"params": kv, "lr": self.lr_kv}, {"params": list(self.embeddings), "lr": self.lr_token}]

    def announce(self, log: Any) -> None:
        how = "--lr" if self.cfg.lr is not None else \
            f"{self.cfg.lr_scale:g} / K/V fan-in {self.fan_in:.0f}" + (" × batch" if self.cfg.scale_lr else "")
        log(f"learning rate: K/V {self.lr_kv:.3g} ({how}) over {len(self.layers)} cross-attention layers, "
            f"token {self.lr_token:.3g}")

    def record(self) -> dict[str, Any]:
        return {"lr_effective": [round(self.lr_kv, 10), round(self.lr_token, 10)], "fan_in": round(self.fan_in, 2),
                "layers": len(self.layers)}

    def class_prompts(self, templates: list[str]) -> list[str]:
        """What the probe compares the instance prompt with: the class prompt of prior preservation."""
        return [self.cfg.class_text()] * len(templates)

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        chosen = templates if self.cfg.use_templates else [self.cfg.instance_prompt] * len(examples)
        return fill_templates(chosen, [ex.caption for ex in examples], self.token, self.text)

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        return encode_prompts(self.base.pipe, prompts, resolution=resolution, device=self.base.device)

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def preview_prompt(self, prompt: str) -> str:
        return prompt.format(self.text)

    def export(self) -> Concept:
        """Full trained weights ``W₀ + ΔW`` per layer (the file format; :mod:`studio.methods.custom_diffusion`)."""
        unet = self.base.pipe.unet
        kv = {}
        with torch.no_grad():
            for name, (dk, dv) in self.deltas.items():
                attn = unet.get_submodule(name)
                kv[name] = (base_weight(attn.to_k).float() + dk.float(), base_weight(attn.to_v).float() + dv.float())
        return Concept(method=CustomDiffusion.name, tokens=[self.token],
                       tensors=concept_tensors(kv, [p.detach() for p in self.embeddings]),
                       class_word=self.cfg.class_word or "", name=self.cfg.name or self.token.strip("<>"))

    def teardown(self) -> None:
        """Idempotent: the hook and the token leave, the modules get their gradient flags back."""
        if self.hook_key is not None:
            remove_hook(self.base.pipe.unet, self.hook_key)
            self.hook_key = None
        self.table.drop(self.key)
        unfreeze(self._frozen)
        self._frozen = []


ENTRY = TrainerEntry(
    cli_name="custom-diffusion", method=CustomDiffusion.name,
    help="Custom Diffusion: a modifier token + the cross-attention K/V (several concepts merge in closed form)",
    config_cls=CustomDiffusionConfig, make_trainer=CustomDiffusionTrainer, presets=PRESETS, default_preset="paper",
    min_images=1,
    gives="a modifier token + full cross-attention K/V: 77 MB on SD 1.5 (1.4 GB SDXL) in float32; concepts merge in "
          "closed form (concepts merge) and export to diffusers' loader",
)
