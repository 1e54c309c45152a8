"""Perfusion training (Tewel et al. 2023; docs/methods.md §4): the concept's input embedding and the
per-layer value targets ``o*_V`` learn, everything else is frozen.

Per step (the shared loop does data, noise, masked loss, accumulation and checkpoints):

1. the prompts ("a photo of <tok>" …) are encoded with the trigger's trainable input embedding
   spliced in (:class:`~studio.methods.runtime.SplicedEmbedding`);
2. every cross-attention K/V is edited by the same :class:`~studio.methods.perfusion.PerfusionHook`
   as at inference, with the training gate β = 0.75, τ = 0.1 and key locking
   ``o*_K = W_K i*_super`` (no gradient);
3. ``L = ‖ε − ε̂‖²`` — masked by the subject mask when the images have one (alpha or
   ``name.mask.png``; the loop weights the squared error by the mask), unmasked otherwise;
4. two parameter groups: the embedding and ``o*_V`` (the paper's 0.006 and 0.03 on SD 1.5). Without
   ``--lr`` / ``--lr-v`` the rates are in the base's units (:mod:`trainers.rates`): the embedding's
   ``lr_scale × s`` (``s`` = RMS of the class word's input-embedding entries; 0.43 × 0.014 = 0.006 on
   SD 1.5) and, per layer, ``lr_v_scale × RMS(o*_V at init)`` (0.05: the paper's 0.03 at a value
   RMS of 0.6 — an estimate for SD 1.5, whose weights we could not measure here);
5. after the optimizer step, ``i* ← 0.99 · i* + 0.01 · mean(encoder output at the concept token of
   the step's prompts)`` (EMA, initialised from the superclass prompts' encoding ``i*_super``).

Initialisation (measured, as textual inversion's: ``--init auto``): the embedding starts from the
candidate that denoises the photos best on the probe's fixed noises — the class word's input
embedding (mean over its tokens; the paper's) or its encoder output (Cross Initialization's); all
scores go into the concept's metadata. Then
``i* = i*_super`` = the mean context state at the class word in the training templates filled with
the class word, and ``o*_V = W_V i*_super`` per layer. ``i*`` is handed to the loop as a (gradient-free)
state tensor so checkpoints resume bit-identically. Under multi-process training every process
keeps its own EMA over its slice of the batch (they differ by sampling noise only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.methods.attention import unet_layers
from studio.methods.perfusion import (
    BETA,
    BETA_GLOBAL,
    EMBEDDINGS,
    I_STAR,
    TAU,
    TRAIN_BETA,
    TRAIN_TAU,
    V_TARGET,
    Perfusion,
    PerfusionTarget,
    concept_meta,
    concept_tensors,
    ensure_hook,
    get_hook,
    linear_part,
    release_hook,
)
from studio.methods.perfusion.covariance import CovarianceSettings, inverse_covariance, word_encoding
from studio.methods.runtime import SplicedEmbedding, text_encoders, token_table
from studio.methods.textual_inversion import class_embedding
from trainers.conditioning import Conditioning, encode_prompts, tokenize
from trainers.data import Example
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig
from trainers.rates import embedding_rms
from trainers.templates import fill_templates


@dataclass
class PerfusionConfig(CommonTrainConfig):
    steps: int = option(400, "optimizer steps", group="training")
    lr: float | None = option(None, "learning rate of the token's input embedding, given to the optimizer as is "
                              "(default: --lr-scale × the class word's embedding RMS)", group="training")
    lr_scale: float = option(0.43, "embedding learning rate in units of the class word's embedding RMS on this base "
                             "(0.43 = the paper's 0.006 on SD 1.5); used without --lr", group="training")
    batch_size: int = option(16, "images per step per process", group="training")
    lr_v: float | None = option(None, "learning rate of the value targets o*_V, as is (default: --lr-v-scale × each "
                                "layer's initial o*_V RMS)", group="training")
    lr_v_scale: float = option(0.05, "value-target learning rate in units of each layer's o*_V RMS at init; used "
                               "without --lr-v", group="training")
    beta: float = option(TRAIN_BETA, "training gate threshold β in σ((sim/energy − β)/τ)", group="perfusion")
    tau: float = option(TRAIN_TAU, "training gate temperature τ", group="perfusion")
    ema: float = option(0.99, "EMA decay of i* (the concept's encoding)", group="perfusion")
    infer_beta: float = option(BETA, "β stored as the concept's inference default (local locking; paper 0.6–0.75)",
                           group="perfusion")
    infer_tau: float = option(TAU, "τ stored as the concept's inference default", group="perfusion")
    infer_beta_global: float = option(BETA_GLOBAL, "β stored for global locking (paper 0.4–0.6)", group="perfusion")
    init: str = option("auto", "embedding initialisation: auto (the candidate that denoises the photos best), plain "
                       "(the class word's input embedding, the paper's) or cross (its encoder output)",
                       choices=["auto", "plain", "cross"], group="perfusion")
    corpus: str | None = option(None, "caption corpus for C⁻¹ (one caption per line; default: the generated corpus)",
                            group="perfusion", path="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.class_word:
            raise TrainingError("Perfusion needs --class-word (the superclass its keys lock to, e.g. teddy).")
        if not (0 < self.tau and 0 < self.infer_tau):
            raise TrainingError(f"τ must be positive, got tau={self.tau}, infer_tau={self.infer_tau}.")
        if not 0 <= self.ema < 1:
            raise TrainingError(f"ema must be in [0, 1), got {self.ema}.")
        rates = (self.lr_v, self.lr_scale, self.lr_v_scale)
        if any(r is not None and not (r >= 0 and math.isfinite(r)) for r in rates):
            raise TrainingError(f"lr_v, lr_scale and lr_v_scale must be ≥ 0, got {rates}.")

    def derives_lr(self) -> bool:
        return True


PRESETS = {
    # The paper: batch 16, 400 steps, lr 0.006 (embedding) / 0.03 (value targets) on SD 1.5 — here in the
    # base's units (module docstring).
    "paper": dict(batch_size=16, steps=400, lr_scale=0.43, lr_v_scale=0.05),
    # CPU-friendly: a quarter of the batch, 150 steps (same rates).
    "cpu": dict(batch_size=4, steps=150, lr_scale=0.43, lr_v_scale=0.05),
    # For --base demo (the learnable world: 32 px, a 64-wide text encoder), measured there: the
    # learning tests train with it (README, learning table).
    # lr_v 0.03 over-wrote the backgrounds there (editability 0.78); give masks (NAME.mask.png).
    "demo-world": dict(batch_size=16, steps=100, lr=0.006, lr_v=0.01),
}


class PerfusionTrainer:
    """Trains the trigger's embedding(s) and ``o*_V``; keeps ``i*`` as an EMA (module doc)."""

    def __init__(self, base: Any, cfg: PerfusionConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        pipe = base.pipe
        self.table = token_table(pipe)
        if self.table.entries or get_hook(pipe.unet) is not None:
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        class_word = cfg.class_word or ""
        # 1. C⁻¹ of the base (computed once per base, then read from the cache).
        self.c_inv = inverse_covariance(base, CovarianceSettings(corpus=cfg.corpus)).c_inv
        # 2. i*_super: the class word's context state in the training templates; i* starts there.
        from trainers.templates import TEMPLATES

        prompts = [tpl.format(class_word) for tpl in TEMPLATES.get(cfg.templates, TEMPLATES["object"])]
        device = base.device
        self.i_super = word_encoding(pipe, class_word, prompts).to(device)
        self.i_star = self.i_super.clone()  # a state tensor (no gradient), updated by the EMA
        self.key = f"train-perfusion:{token}"
        self._frozen = freeze_pipeline(pipe)
        try:
            self._install(class_word)
        except BaseException:
            self.teardown()
            raise
        self._seen: list[torch.Tensor] = []  # encoder outputs at the token since the last step (for the EMA)

    def _install(self, class_word: str) -> None:
        """3. the trigger token with trainable embedding rows; 4. trainable ``o*_V``; the hook."""
        pipe = self.base.pipe
        self.init_scores: dict[str, float] = {}
        self.chosen = "cross" if self.cfg.init == "cross" else "plain"
        init = self._candidate(self.chosen)
        try:
            self.table.set(self.key, [self.token], init)
        except ValueError as err:
            raise TrainingError(f"Cannot add the trigger {self.token}: {err}; pick another --token.") from None
        self.embeddings: list[nn.Parameter] = []
        for (_, te), v in zip(text_encoders(pipe), init):
            spliced = te.get_input_embeddings()
            p = nn.Parameter(v.clone().to(te.device, torch.float32))
            te.set_input_embeddings(SplicedEmbedding(spliced.original, p))
            self.embeddings.append(p)
        # o*_V = W_V i*_super per layer, trainable; the hook edits K and V like at inference.
        unet = pipe.unet
        self.v_targets: list[nn.Parameter] = []
        with torch.no_grad():
            for layer in unet_layers(unet):
                attn = unet.get_submodule(layer.name)
                w = linear_part(attn.to_v, self.i_super[None].to(attn.to_v.weight.dtype))[0]
                self.v_targets.append(nn.Parameter(w.float().clone()))
        cfg = self.cfg
        self.embedding_rms = [embedding_rms(e, t(class_word, add_special_tokens=False).input_ids)
                              for t, e in zip(self.table.pristine_tokenizers, self.table.original_embeddings)]
        self.v_rms = [float(v.detach().pow(2).mean().sqrt()) for v in self.v_targets]
        self.lr_embedding = [cfg.lr if cfg.lr is not None else cfg.lr_scale * s for s in self.embedding_rms]
        self.lr_values = [cfg.lr_v if cfg.lr_v is not None else cfg.lr_v_scale * s for s in self.v_rms]
        self.target = PerfusionTarget(i_star=self.i_star, i_super=self.i_super, v_targets=list(self.v_targets),
                                      beta=self.cfg.beta, tau=self.cfg.tau, c_inv=self.c_inv)
        self.hook = ensure_hook(unet)
        self.hook.add(self.key, self.target)

    def _candidate(self, kind: str) -> list[torch.Tensor]:
        """Per encoder, the ``(1, D_e)`` starting embedding of kind ``plain`` or ``cross`` (module docstring)."""
        class_word = self.cfg.class_word or ""
        if kind == "plain":
            return [class_embedding(tok, emb, class_word)[None]
                    for tok, emb in zip(self.table.pristine_tokenizers, self.table.original_embeddings)]
        from trainers.textual_inversion import TextualInversionConfig, initial_vectors

        return initial_vectors(self.base.pipe, TextualInversionConfig(class_word=class_word, num_vectors=1), "cross")

    def choose_init(self, probe: Any, log: Any) -> None:
        """Measured initialisation: score ``plain`` and ``cross`` by the probe's denoising loss, keep the lower."""
        if self.cfg.init != "auto":
            return
        from trainers.probe import choose_start

        candidates = {kind: self._candidate(kind) for kind in ("plain", "cross")}
        self.chosen, losses = choose_start(probe, self, candidates, self._load, log)
        self.init_scores.update({k: round(v, 6) for k, v in losses.items()})

    def _load(self, vectors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.embeddings, vectors):
                p.copy_(v.to(p.device, p.dtype))

    def trainable(self) -> dict[str, torch.Tensor]:
        """The parameters by their concept names, plus ``i*`` (a state tensor without gradient,
        listed so that checkpoints hold it)."""
        out: dict[str, torch.Tensor] = dict(zip(EMBEDDINGS, self.embeddings))
        out.update({V_TARGET.format(i): p for i, p in enumerate(self.v_targets)})
        out[I_STAR] = self.i_star
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per encoder's embedding and per layer's ``o*_V``, each at its effective rate."""
        return [{"params": [p], "lr": lr} for p, lr in zip(self.embeddings, self.lr_embedding)] + \
               [{"params": [p], "lr": lr} for p, lr in zip(self.v_targets, self.lr_values)]

    def announce(self, log: Any) -> None:
        """Report the effective rates (before step 1)."""
        emb = ", ".join(f"{lr:.3g}" for lr in self.lr_embedding)
        vals = f"{min(self.lr_values):.3g}–{max(self.lr_values):.3g}" if self.lr_values else "—"
        log(f"learning rate: embedding {emb}, value targets {vals} over {len(self.lr_values)} layers")

    def record(self) -> dict[str, Any]:
        """What the concept's ``studio.train`` keeps beyond the config: the effective rates and scales."""
        return {"init_chosen": self.chosen, "init_scores": dict(self.init_scores),
                "lr_effective": [round(lr, 8) for lr in self.lr_embedding],
                "lr_v_effective": [round(lr, 8) for lr in self.lr_values],
                "embedding_rms": [round(s, 6) for s in self.embedding_rms], "v_rms": [round(s, 6) for s in self.v_rms]}

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        return fill_templates(templates, [ex.caption for ex in examples], self.token, self.token)

    measuring = False  # set by the probe while it measures (no EMA bookkeeping then)

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        """Encode ``prompts`` (B) → ``(B, 77, D)``; remember the states at the trigger for the EMA."""
        self.target.set_i_star(self.i_star)  # i* may have been restored from a checkpoint
        self.hook.invalidate()
        pipe = self.base.pipe
        cond = encode_prompts(pipe, prompts, resolution=resolution, device=self.base.device)
        if self.measuring:  # the probe's forward passes (trainers/probe.py) leave the EMA alone
            return cond
        tok = pipe.tokenizer
        ids = tokenize(tok, prompts, cond.encoder_hidden_states.device)
        where = ids == tok.convert_tokens_to_ids(self.token)  # (B, 77)
        if not bool(where.any()):
            raise TrainingError(f"No training prompt contains the trigger {self.token}; check the captions.")
        self._seen.append(cond.encoder_hidden_states[where].detach().float())  # (n, D)
        return cond

    def extra_loss(self) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def after_step(self) -> None:
        """``i* ← ema · i* + (1 − ema) · mean_n e_n`` over the trigger's encodings of the step."""
        if self._seen:
            batch = torch.cat(self._seen).mean(0).to(self.i_star.device)
            self.i_star.mul_(self.cfg.ema).add_(batch, alpha=1.0 - self.cfg.ema)
        self._seen = []
        self.target.set_i_star(self.i_star)
        self.hook.invalidate()

    def preview_prompt(self, prompt: str) -> str:
        return prompt.format(self.token)

    def export(self) -> Concept:
        tensors = concept_tensors(v_targets=self.v_targets, i_star=self.i_star, i_super=self.i_super,
                                  embeddings=[p[0] for p in self.embeddings])
        meta = concept_meta(self.cfg.infer_beta, self.cfg.infer_tau, self.cfg.infer_beta_global)
        return Concept(method=Perfusion.name, tokens=[self.token], tensors=tensors, class_word=self.cfg.class_word or "",
                       name=self.cfg.name or self.token.strip("<>"), meta=meta)

    def teardown(self) -> None:
        """Idempotent: the hook and the token leave, the modules get their gradients flags back."""
        release_hook(self.base.pipe.unet, self.key)
        self.table.drop(self.key)
        unfreeze(self._frozen)
        self._frozen = []


ENTRY = TrainerEntry(
    cli_name="perfusion", method=Perfusion.name,
    help="Perfusion: key-locked gated rank-one edits (~60 KB concepts that combine)",
    config_cls=PerfusionConfig, make_trainer=PerfusionTrainer, presets=PRESETS, default_preset="paper",
    min_images=1,
    gives="key-locked rank-one edits: ~60 KB on SD 1.5; about 2.5× textual inversion's time; default settings measured fidelity 0.47–1.00, editability 0.98–1.00 on two bases — several Perfusion concepts combine in one prompt",
)
