"""ProSpect training (docs/methods.md, "ProSpect"): one token vector per denoising stage; UNet, VAE
and text encoder(s) are frozen and never copied.

The trainable tensors are per text encoder a ``(G, D_e)`` table (``G`` = ``--stages``, 10 by
default), row ``g`` the vector of stage ``g`` (stage 0 = the noisiest timesteps, see
:mod:`studio.methods.prospect`). Each step the trainer tokenizes the prompts, hands the ids to the
pipeline's per-timestep hook (NeTI's :class:`~studio.methods.neti.hook.NetiHook`, which serves
ProSpect entries too) and returns the pipeline-style context; when the loop calls the UNet with the
batch's timesteps, the hook puts the vector of each sample's stage at the trigger and encodes the
batch in one text-encoder pass with gradients. Objective: the plain ε (or v) MSE of the shared loop —
the paper's only loss; each sample's gradient reaches only the row of its timestep's stage.

Initialisation (``init``): ``auto`` (default) measures both starts below by the probe's denoising
loss of the training photos (``trainers.probe``, the same fixed noises textual inversion and
Perfusion score their starts with) and keeps the lower; both scores go into the concept's
``studio.train`` (``init_scores``). ``class`` — every stage starts at the class word's input
embedding (the mean over its tokens), as the paper starts its mapper from the initializer word.
That start is also the strength-0 point of the method (``e_class + s·(p − e_class)``), so an untrained
concept is exactly the class word at every strength and per-stage strengths interpolate from it.
``cross`` starts every stage from Cross Initialization's vector (the encoder's output for the class
word, fed back as input; :func:`trainers.textual_inversion.initial_vectors`) — on the demo world it
learned less in the same steps (README, "ProSpect"), and the measurement picks ``class`` there.

Learning rate: as textual inversion, ``lr_scale ×`` the RMS of the initializer word's input
embedding on this base, unless ``--lr`` is given (the optimizer's value as is). The paper's 1e-4 is
the rate of its mapper network, not of free vectors, so it does not transfer. Each stage sees only
``1/G`` of the sampled timesteps, so the default trains longer than textual inversion (600 steps ×
batch 8 ≈ 480 samples per stage).
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
from studio.methods.neti.encoder import clip_hidden_states, pooled_text_embeds, text_states
from studio.methods.neti.hook import NetiHook, attach_neti_hook, neti_hook
from studio.methods.prospect import (
    DEFAULT_STAGES,
    METHOD,
    ProSpectEntry,
    class_origins,
    concept_from_tables,
    tensor_keys,
)
from studio.methods.runtime import text_encoders, token_table
from trainers.conditioning import Conditioning, square_time_ids, tokenize
from trainers.data import Example
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig
from trainers.templates import fill_templates
from trainers.textual_inversion import embedding_scale


@dataclass
class ProSpectTrainConfig(CommonTrainConfig):
    # These defaults are the "default" preset (TrainerEntry.resolve with no preset trains like this).
    steps: int = option(600, "optimizer steps (each stage sees about 1/stages of the samples)", group="training")
    lr: float | None = option(None, "learning rate given to the optimizer as is (never scaled by batch size); "
                              "default: --lr-scale × the RMS of the class word's input embedding on this base",
                              group="training")
    lr_scale: float = option(0.35, "learning rate in units of the vectors' natural scale on this base (the RMS of "
                             "the class word's input embedding); used when --lr is not given", group="training")
    batch_size: int = option(8, "images per step per process", group="training")
    stages: int = option(DEFAULT_STAGES, "denoising stages, one token vector each (stage 0 = the noisiest "
                         "timesteps: layout; the last = the least noisy: detail, material)", group="concept")
    init: str = option("auto", "initialisation of every stage: auto (class and cross scored by the denoising loss "
                       "of the photos, the lower kept), class (the class word's input embedding, the strength-0 "
                       "point) or cross (Cross Initialization's encoder output)",
                       choices=["auto", "class", "cross"], group="concept")

    def derives_lr(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.stages <= 1000:
            raise TrainingError(f"stages must be between 1 and 1000, got {self.stages}.")
        if not (self.class_word or "").strip():
            raise TrainingError("ProSpect needs --class-word (what the subject is, e.g. dog): every stage starts "
                                "from it, and strength 0 reads it.")
        if not (self.lr_scale >= 0 and math.isfinite(self.lr_scale)):
            raise TrainingError(f"lr_scale must be ≥ 0, got {self.lr_scale}.")


PRESETS = {
    # The studio's defaults: 10 stages (the paper), class-word start, 600 steps (the paper's count) at
    # batch 8 and textual inversion's rate in embedding units.
    "default": dict(stages=10, init="auto", steps=600, lr_scale=0.35, batch_size=8),
    # A quick CPU run.
    "cpu": dict(stages=10, init="auto", steps=150, lr_scale=0.35, batch_size=4),
    # For --base demo (the learnable world: 32 px, a 64-wide text encoder), measured there: the
    # learning test trains with it (tests/learning/test_prospect_learns.py).
    "demo-world": dict(stages=10, init="class", steps=200, lr=2e-2, batch_size=8),
}


class ProSpectTrainer:
    """Trains per-stage vectors for ``token`` on ``base`` (see the module doc)."""

    def __init__(self, base: Any, cfg: ProSpectTrainConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        pipe = base.pipe
        self.table = token_table(pipe)
        if self.table.entries or neti_hook(pipe) is not None:
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        word = cfg.class_word or ""
        self.scales = embedding_scale(pipe, word)
        self.lrs = [cfg.lr if cfg.lr is not None else cfg.lr_scale * sc for sc in self.scales]
        self.steps_total = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        if cfg.stages > self.steps_total:
            raise TrainingError(f"stages ({cfg.stages}) cannot exceed the base's {self.steps_total} training timesteps.")
        self.chosen = "class" if cfg.init == "auto" else cfg.init  # until choose_init measures both
        self.init_scores: dict[str, float] = {}
        start = self._initial_vectors(self.chosen)
        self.params = [nn.Parameter(v[None].repeat(cfg.stages, 1).to(te.device, torch.float32))
                       for v, (_, te) in zip(start, text_encoders(pipe))]  # (G, D_e) each
        self._frozen = freeze_pipeline(pipe)
        self.key = f"train:{token}"
        self._refresh_token_row()
        self.hook = self._init_hook()

    # -- setup -------------------------------------------------------------------------------------
    def _initial_vectors(self, kind: str) -> list[torch.Tensor]:
        """Per encoder, the ``(D_e,)`` start of every stage for ``kind`` ("class" / "cross"; see the module doc)."""
        pipe, cfg = self.base.pipe, self.cfg
        if kind == "cross":
            from trainers.textual_inversion import TextualInversionConfig, initial_vectors

            ti = TextualInversionConfig(images=cfg.images, class_word=cfg.class_word, init="cross", num_vectors=1)
            return [v[0].float() for v in initial_vectors(pipe, ti, "cross")]
        widths = [int(te.config.hidden_size) for _, te in text_encoders(pipe)]
        return class_origins(pipe, cfg.class_word or "", widths)

    def choose_init(self, probe: Any, log: Any) -> None:
        """Measured initialisation (``init auto``): score ``class`` and ``cross`` by the probe's denoising
        loss of the photos (the concept's prompts), keep the lower; the scores go into :meth:`record`."""
        if self.cfg.init != "auto":
            return
        from trainers.probe import choose_start

        candidates = {kind: self._initial_vectors(kind) for kind in ("class", "cross")}
        self.chosen, losses = choose_start(probe, self, candidates, self._load, log)
        self.init_scores.update({k: round(v, 6) for k, v in losses.items()})

    def _load(self, vectors: list[torch.Tensor]) -> None:
        """Every stage of each encoder's table set to that encoder's ``(D_e,)`` start; the token row follows."""
        with torch.no_grad():
            for p, v in zip(self.params, vectors):
                p.copy_(v.to(p.device, p.dtype)[None].expand_as(p))
        self._refresh_token_row()

    def _refresh_token_row(self) -> None:
        """The trigger's fixed input row: the mean of the stage vectors (SDXL's pooled embedding reads it)."""
        with torch.no_grad():
            static = [p.detach().mean(0).cpu()[None] for p in self.params]  # (1, D_e) per encoder
        try:
            self.table.set(self.key, [self.token], static)
        except ValueError as err:
            raise TrainingError(f"Cannot add the token {self.token}: {err}; pass another --token.") from None

    def _init_hook(self) -> NetiHook:
        hook = attach_neti_hook(self.base.pipe)
        hook.add(ProSpectEntry(self.token, list(self.params), self.steps_total))
        return hook

    # -- MethodTrainer ------------------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.Tensor]:
        return dict(zip(tensor_keys(len(self.params)), self.params))

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per text encoder, each at its own effective rate (see the module doc)."""
        return [{"params": [p], "lr": lr} for p, lr in zip(self.params, self.lrs)]

    def announce(self, log: Any) -> None:
        rates = ", ".join(f"{lr:.3g}" for lr in self.lrs)
        how = "--lr" if self.cfg.lr is not None else \
            f"{self.cfg.lr_scale:g} × embedding RMS " + ", ".join(f"{sc:.4f}" for sc in self.scales)
        log(f"learning rate {rates} ({how}); {self.cfg.stages} stages of {self.steps_total / self.cfg.stages:g} "
            "timesteps")

    def record(self) -> dict[str, Any]:
        return {"init_chosen": self.chosen, "init_scores": dict(self.init_scores),
                "lr_effective": [round(lr, 8) for lr in self.lrs], "embedding_rms": [round(s, 6) for s in self.scales]}

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        return fill_templates(templates, [ex.caption for ex in examples], self.token, self.token)

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        """Bind the prompts' ids to the hook (it replaces every row of the next UNet call by the
        contexts of each sample's stage) and return the pipeline-style context with the trigger's
        fixed row — (B, T, ΣD); for SDXL also the pooled ``text_embeds`` (through the mean stage
        vector, with gradients) and ``time_ids``."""
        pipe, device = self.base.pipe, self.base.device
        pairs = text_encoders(pipe)
        ids = [tokenize(tok, prompts, device) for tok, _ in pairs]
        self.hook.bind(ids)
        if len(pairs) == 1:  # every row is replaced by the hook: this context needs no gradient
            tok, te = pairs[0]
            with torch.no_grad():
                return Conditioning(text_states(te, te.get_input_embeddings()(ids[0]), penultimate=False)[0])
        hidden, pooled = [], None
        for (tok, te), ids_e, p in zip(pairs, ids, self.params):
            emb = te.get_input_embeddings()(ids_e)
            where = (ids_e == tok.convert_tokens_to_ids(self.token))[..., None]
            states = clip_hidden_states(te, torch.where(where, p.mean(0).to(emb.dtype), emb))
            hidden.append(states[-2])
            pooled = pooled_text_embeds(te, ids_e, states[-1])  # the last encoder's
        time_ids = square_time_ids(resolution, len(prompts), device=device, dtype=hidden[0].dtype)
        assert pooled is not None  # two encoders here
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        self.hook.clear_cache()  # contexts cached by previews/evaluations belong to the old vectors

    def preview_prompt(self, prompt: str) -> str:
        self._refresh_token_row()
        self.hook.clear_cache()
        return prompt.format(self.token)

    def export(self) -> Concept:
        cfg = self.cfg
        return concept_from_tables([p.detach() for p in self.params], token=self.token,
                                   class_word=cfg.class_word or "", name=cfg.name or self.token.strip("<>"),
                                   num_train_timesteps=self.steps_total)

    def teardown(self) -> None:
        """Idempotent: hook entry, token and ``requires_grad`` flags are put back."""
        hook = neti_hook(self.base.pipe)
        if hook is not None and self.token in hook.entries:
            hook.drop(self.token)
        self.table.drop(self.key)
        unfreeze(self._frozen)
        self._frozen = []


ENTRY = TrainerEntry(
    cli_name="prospect", method=METHOD,
    help="ProSpect: one token vector per denoising stage (layout … material), applied stage by stage (kilobytes)",
    config_cls=ProSpectTrainConfig, make_trainer=ProSpectTrainer, presets=PRESETS, default_preset="default",
    min_images=1,
    gives="ten token vectors, one per denoising stage: 30 KB on SD 1.5; about textual inversion's time per step; "
          "per-stage strengths take layout from one concept and material from another",
)
