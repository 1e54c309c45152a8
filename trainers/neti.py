"""NeTI training (docs/methods.md §5): only the mapper ``M(t, ℓ)`` trains; UNet, VAE and text
encoder(s) are frozen and never copied.

Each step the shared loop asks for :meth:`NetiTrainer.conditioning`; the trainer tokenizes the
prompts (the trigger is an added token), hands the ids to the pipeline's
:class:`~studio.methods.neti.hook.NetiHook` and returns the pipeline-style context. When the loop
then calls the UNet with the batch's timesteps, the hook evaluates the mapper at every
``(t_b, ℓ)`` — one nested-dropout draw per batch — and encodes the ``L·B`` per-layer prompts in one
text-encoder pass with gradients; each cross-attention layer reads its own context (keys without
the bypass, values with it). With gradient checkpointing the recomputed blocks re-read those
finished contexts, so the mapper's gradients are those of a plain run.

Defaults (paper / official code): 1000 steps, lr 1e-3 × 8 = 8e-3 (given to the optimizer as is),
batch 2 × accumulation 4, σ_t = 0.03, σ_ℓ = 2, 10 time anchors, hidden 128, nested dropout 0.5,
bypass 0.2. The ``cpu`` preset is for a quick look on a CPU (fewer, smaller steps).

The nested-dropout generator's state is part of :meth:`~NetiTrainer.trainable` (a uint8 tensor
that receives no gradient) so a resumed run is bit-identical to an uninterrupted one. With
``accelerate launch`` each process draws its own dropout for its slice of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.methods.neti import METHOD, concept_from_mapper, mapper_config_for
from studio.methods.neti.encoder import clip_hidden_states, pooled_text_embeds, text_states
from studio.methods.neti.hook import NetiEntry, NetiHook, attach_neti_hook, neti_hook
from studio.methods.neti.mapper import NetiMapper
from studio.methods.runtime import text_encoders, token_table
from trainers.conditioning import Conditioning, square_time_ids, tokenize
from trainers.core import CoreOptions, CoreRegularizer
from trainers.data import Example
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig
from trainers.templates import fill_templates


@dataclass
class NetiTrainConfig(CoreOptions, CommonTrainConfig):
    # The paper's optimisation defaults replace the shared ones (presets may override them again).
    steps: int = option(1000, "optimizer steps", group="training")
    lr: float = option(8e-3, "learning rate given to the optimizer as is (the paper's 1e-3 × 8, already scaled)",
                   group="training")
    batch_size: int = option(2, "images per step per process", group="training")
    grad_accum: int = option(4, "gradient accumulation steps", group="training")
    hidden_dim: int = option(128, "mapper hidden width H (what nested dropout and the strength slider act on)",
                         group="concept")
    time_anchors: int = option(10, "time anchors of the first layer (× the UNet's cross-attention layers)", group="concept")
    sigma_t: float = option(0.03, "std of the Fourier frequencies for the timestep", group="concept")
    sigma_l: float = option(2.0, "std of the Fourier frequencies for the layer index", group="concept")
    nested_dropout: float = option(0.5, "probability per batch of truncating the hidden vector at a random index "
                               "(0 = off; needed for the fidelity/editability slider)", group="concept")
    bypass: bool = option(True, "textual bypass: a second output added to the encoder states of the values", group="concept")
    bypass_scale: float = option(0.2, "weight of the textual bypass (× the state's norm)", group="concept")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.class_word or "").strip():
            raise TrainingError("NeTI needs --class-word (what the subject is, e.g. dog): its outputs are scaled "
                                "to that word's embedding norm.")
        if self.hidden_dim < 1 or self.time_anchors < 1:
            raise TrainingError(f"hidden_dim and time_anchors must be ≥ 1, got {self.hidden_dim} and "
                                f"{self.time_anchors}.")
        if not 0 <= self.nested_dropout <= 1:
            raise TrainingError(f"nested_dropout is a probability in [0, 1], got {self.nested_dropout}.")
        if not (self.sigma_t > 0 and self.sigma_l > 0 and self.bypass_scale >= 0):
            raise TrainingError(f"sigma_t ({self.sigma_t}) and sigma_l ({self.sigma_l}) must be > 0 and "
                                f"bypass_scale ({self.bypass_scale}) ≥ 0.")


PRESETS: dict[str, dict[str, Any]] = {
    # The paper / official code: 1000 steps, batch 2 × accumulation 4, lr 1e-3 scaled by 8.
    "paper": dict(steps=1000, lr=8e-3, batch_size=2, grad_accum=4),
    # A quick CPU run: 8× fewer samples per step, a fifth of the steps.
    "cpu": dict(steps=200, lr=8e-3, batch_size=1, grad_accum=1),
    # For --base demo (the learnable world: 32 px, a 64-wide text encoder), measured there: the
    # learning tests train with it (README, learning table).
    "demo-world": dict(steps=120, lr=8e-3, batch_size=8, grad_accum=1),
    # CoRe (Wu et al. 2025; trainers/core.py) on the paper's NeTI settings: its weights, every
    # cross-attention layer, the base's context prompts (the embedding loss reads every layer's context).
    "core": dict(steps=1000, lr=8e-3, batch_size=2, grad_accum=4, core=True),
    # The demo-world preset with CoRe on.
    "demo-world-core": dict(steps=120, lr=8e-3, batch_size=8, grad_accum=1, core=True, core_prompts="world"),
}


class NetiTrainer:
    """Trains a :class:`~studio.methods.neti.mapper.NetiMapper` on ``base`` for ``token``."""

    def __init__(self, base: Any, cfg: NetiTrainConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        pipe = base.pipe
        self.table = token_table(pipe)
        if self.table.entries or neti_hook(pipe) is not None:
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        self.mapper = self._init_mapper()
        self.rng_state = torch.Generator().manual_seed(cfg.seed + 1).get_state()  # nested dropout
        self._frozen = freeze_pipeline(pipe)
        self.key = f"train:{token}"
        self._refresh_token_row()
        self.hook = self._init_hook()
        self.core: CoreRegularizer | None = None
        if cfg.core:  # trainers/core.py: the context losses (NeTI's output norm is fixed: no rescaling window)
            try:
                self.core = CoreRegularizer(base, cfg, concept_text=self.core_text(), class_text=cfg.class_word or "",
                                            encode=lambda prompts: self.conditioning(prompts, base.native_size),
                                            states=self._core_states)
            except BaseException:
                self.teardown()
                raise

    def core_text(self) -> str:
        """What CoRe's context prompts hold in place of ``{}``: the trigger, as :meth:`prompts` puts it."""
        return self.token

    def _core_states(self, prompts: list[str], cond: Conditioning | None, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """Per encoder, the concept prompts' contexts at every UNet layer for the batch's timesteps —
        (L, B, T, D_e), the keys' states (no bypass), with gradients to the mapper."""
        pairs = text_encoders(self.base.pipe)
        return [self.hook.layer_contexts(e, tokenize(tok, prompts, self.base.device), timesteps)[0]
                for e, (tok, _) in enumerate(pairs)]

    # -- setup -------------------------------------------------------------------------------------
    def _init_mapper(self) -> NetiMapper:
        cfg = self.cfg
        mcfg = mapper_config_for(self.base.pipe, cfg.class_word or "", hidden=cfg.hidden_dim,
                                 time_anchors=cfg.time_anchors, sigma_t=cfg.sigma_t, sigma_l=cfg.sigma_l,
                                 nested_dropout=cfg.nested_dropout, bypass=cfg.bypass, bypass_scale=cfg.bypass_scale)
        mapper = NetiMapper(mcfg, generator=torch.Generator().manual_seed(cfg.seed))
        return mapper.to(self.base.device).train()

    def _refresh_token_row(self) -> None:
        """The trigger's fixed input row (the mean token; see :meth:`NetiMapper.static_tokens`)."""
        with torch.no_grad():
            static = [v.cpu()[None] for v in self.mapper.static_tokens()]  # (1, D_e) per encoder
        try:
            self.table.set(self.key, [self.token], static)
        except ValueError as err:
            raise TrainingError(f"Cannot add the token {self.token}: {err}; pass another --token.") from None

    def _init_hook(self) -> NetiHook:
        hook = attach_neti_hook(self.base.pipe)
        hook.add(NetiEntry(self.token, self.mapper, truncation=None, bypass=self.cfg.bypass, rng_state=self.rng_state))
        return hook

    # -- MethodTrainer ------------------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.Tensor]:
        params: dict[str, torch.Tensor] = {f"neti.{k}": p for k, p in self.mapper.named_parameters()}
        params["neti.dropout_rng"] = self.rng_state  # no gradient: checkpointed for a bit-identical resume
        if self.core is not None:
            params |= self.core.trainable()
        return params

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.mapper.parameters()), "lr": self.cfg.lr}]

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        return fill_templates(templates, [ex.caption for ex in examples], self.token, self.token)

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        """Bind the prompts' ids to the hook (it edits every row of the next UNet call) and return
        the pipeline-style context with the trigger's fixed row — (B, T, ΣD); for SDXL also the
        pooled ``text_embeds`` (through the mapper's mean token, with gradients) and ``time_ids``."""
        pipe, device = self.base.pipe, self.base.device
        pairs = text_encoders(pipe)
        ids = [tokenize(tok, prompts, device) for tok, _ in pairs]
        self.hook.bind(ids)
        if len(pairs) == 1:  # every row is replaced layer by layer: this context needs no gradient
            tok, te = pairs[0]
            with torch.no_grad():
                return Conditioning(text_states(te, self._inputs(tok, te, ids[0], None), penultimate=False)[0])
        static = self.mapper.static_tokens()
        hidden, pooled = [], None
        for e, ((tok, te), ids_e) in enumerate(zip(pairs, ids)):
            states = clip_hidden_states(te, self._inputs(tok, te, ids_e, static[e]))
            hidden.append(states[-2])
            pooled = pooled_text_embeds(te, ids_e, states[-1])  # the last encoder's
        # the square default; with aspect-ratio buckets the loop replaces it per example
        time_ids = square_time_ids(resolution, len(prompts), device=device, dtype=hidden[0].dtype)
        assert pooled is not None  # two encoders here
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    def _inputs(self, tok: Any, te: Any, ids: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        """Input vectors (B, T, D) of ``ids``, the trigger's positions set to ``vector`` (D,) if given."""
        emb = te.get_input_embeddings()(ids)
        if vector is None:
            return emb
        where = (ids == tok.convert_tokens_to_ids(self.token))[..., None]
        return torch.where(where, vector.to(emb.dtype), emb)

    def extra_loss(self) -> torch.Tensor | None:
        return self.core.loss() if self.core is not None else None

    def after_step(self) -> None:
        if self.core is not None:
            self.core.after_step()
        self.hook.clear_cache()  # contexts cached by previews/evaluations belong to the old weights

    def record(self) -> dict[str, Any]:
        """What the concept's ``studio.train`` keeps about this run beyond its config."""
        return self.core.record() if self.core is not None else {}

    def preview_prompt(self, prompt: str) -> str:
        self._refresh_token_row()
        self.hook.clear_cache()
        return prompt.format(self.token)

    def export(self) -> Concept:
        cfg = self.cfg
        return concept_from_mapper(self.mapper, token=self.token, class_word=cfg.class_word or "",
                                   name=cfg.name or self.token.strip("<>"))

    def teardown(self) -> None:
        """Idempotent: hook, token and ``requires_grad`` flags are put back."""
        core = getattr(self, "core", None)  # None also when __init__ failed before it
        if core is not None:
            core.close()
        hook = neti_hook(self.base.pipe)
        if hook is not None and self.token in hook.entries:
            hook.drop(self.token)
        self.table.drop(self.key)
        unfreeze(self._frozen)
        self._frozen = []


ENTRY = TrainerEntry(
    cli_name="neti", method=METHOD,
    help="NeTI: a small mapper gives the token a vector per timestep and UNet layer (≈2 MB; strength = truncation)",
    config_cls=NetiTrainConfig, make_trainer=NetiTrainer, presets=PRESETS, default_preset="paper", min_images=1,
    gives="a small mapper network: 2.3 MB on SD 1.5; the slowest (about 10× textual inversion's time); default settings measured fidelity 0.86–1.00, editability 1.00 on two bases — detail with editability; strength trades one for the other",
)
