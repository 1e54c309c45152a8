"""A fixed, held-out measurement of how well the concept's prompt denoises the training images.

The probe draws its own samples once — which image (and mirror), which timestep, which latent
sample and which noise — from a generator of its own, so measuring never changes the training
run's random stream (resumes stay bit-identical). Every measurement reuses the same samples, so
two measurements differ only by what training changed.

Two numbers come out of it, with no extra model (docs/methods.md, "Measured defaults"):

* the **denoising loss** ``L(p) = mean_i ‖ε̂(x_t^i, t_i, c(p_i)) − target_i‖²`` (masked like the
  training loss; ``target`` = ε or v as the base predicts) for prompts ``p``; on SD 3 / FLUX bases the
  flow-matching loss of training instead (:class:`trainers.flow.FlowFit`:
  ``w(σ_i) · ‖v̂(x_σ^i, σ_i, c(p_i)) − (ε_i − x₀^i)‖²``), at the fixed noise levels ``σ_i`` that the
  training density gives the probe's stratified draws (:meth:`~trainers.flow.FlowFit.sigmas`);
* the **gain** of the concept prompt over the class prompt,
  ``g = 1 − L(concept prompts) / L(class prompts)`` — how much better the concept's prompt
  explains the photos than the bare class word does. 0 when the concept adds nothing; it grows as
  the concept is learned. It is what the measured initialization compares (lower ``L``), what the
  ``auto`` step budget watches, and what the end-of-training verdict reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainers.conditioning import with_time_ids

VERDICTS = ("learned", "weak", "not learned")
# Gain thresholds of the verdict, measured in the learnable world (README, "Defaults that learn"):
# trained concepts there reach g ≥ 0.10, their learning-rate-0 controls stay within ±0.01.
LEARNED_GAIN = 0.05
WEAK_GAIN = 0.015


@dataclass
class ProbeSamples:
    """The fixed samples: ``n`` rows of image index, flip, timestep, latent noise and diffusion noise."""

    idx: torch.Tensor  # (n,) long
    flips: torch.Tensor  # (n,) long
    timesteps: torch.Tensor  # (n,) long
    eps_lat: list[torch.Tensor]  # per row (C, h_i, w_i): the latent size of the row's image
    noise: list[torch.Tensor]  # per row (C, h_i, w_i)
    templates: list[str]  # (n,) the prompt template of each row, "{}" = the concept / class word
    groups: list[list[int]]  # the rows measured together: batches of rows of one latent size


class DenoisingProbe:
    """Measure :math:`L(p)` and the gain on fixed samples of the training images (see the module docstring).

    ``cache`` is the loop's :class:`~trainers.latents.LatentCache` (per example (2, C, h, w) means,
    stds, masks); ``class_text`` what stands for the subject without the concept (the class word, ""
    for none). With aspect-ratio buckets the rows are measured in batches of one bucket each, with
    each example's micro-conditioning (SDXL). ``flow``: the :class:`~trainers.flow.FlowFit` of an SD 3 /
    FLUX base (the same draws; each row's timestep becomes its fixed σ); None for a UNet."""

    def __init__(self, pipe: Any, cache: Any, scheduler: Any, examples: list[Any], templates: list[str], *,
                 class_text: str, resolution: int, seed: int, n: int = 16, batch: int = 8, flow: Any = None):
        g = torch.Generator().manual_seed(0x5EED + int(seed))
        n_ex = len(cache)
        n_t = int(scheduler.config.num_train_timesteps)
        # timesteps spread evenly over the schedule (a stratified draw: less variance than uniform)
        strata = (torch.arange(n) + torch.rand(n, generator=g)) / n
        idx, flips = torch.arange(n) % n_ex, torch.randint(2, (n,), generator=g)
        timesteps = (strata * n_t).long().clamp(0, n_t - 1)
        shapes = [cache.shape(int(i)) for i in idx]
        if cache.uniform:  # one size: one draw each (what the probe has always drawn)
            eps_lat = list(torch.randn((n, *shapes[0]), generator=g))
            noise = list(torch.randn((n, *shapes[0]), generator=g))
            groups = [list(range(start, min(start + batch, n))) for start in range(0, n, batch)]
        else:  # buckets: a draw per row at its size; rows of one size measured together
            eps_lat = [torch.randn(s, generator=g) for s in shapes]
            noise = [torch.randn(s, generator=g) for s in shapes]
            by_shape: dict[tuple[int, int, int], list[int]] = {}
            for row, s in enumerate(shapes):
                by_shape.setdefault(s, []).append(row)
            groups = [rows[k:k + batch] for rows in by_shape.values() for k in range(0, len(rows), batch)]
        self.samples = ProbeSamples(
            idx=idx, flips=flips, timesteps=timesteps, eps_lat=eps_lat, noise=noise,
            templates=[templates[int(i)] for i in torch.randint(len(templates), (n,), generator=g)], groups=groups)
        # SDXL micro-conditioning per example when the examples carry their crop (buckets)
        self.micro = any(getattr(ex, "original_size", None) is not None for ex in examples)
        self.pipe, self.cache, self.scheduler, self.examples = pipe, cache, scheduler, examples
        self.class_text, self.resolution, self.batch = class_text, resolution, batch
        self.flow = flow
        # SD 3 / FLUX: the fixed noise level of each row (n,), what FlowFit.per_sample derives from its draw
        self.sigmas = flow.sigmas(timesteps) if flow is not None else None

    @torch.no_grad()
    def loss(self, trainer: Any, *, concept: bool = True) -> float:
        """Mean denoising loss over the samples with the concept's prompts (or the class prompts).

        While it measures, ``trainer.measuring`` is True: a trainer that keeps statistics of what it
        encodes (Perfusion's EMA of the concept's encoding) leaves them alone."""
        previous = getattr(trainer, "measuring", False)
        trainer.measuring = True
        try:
            return self._loss(trainer, concept)
        finally:
            trainer.measuring = previous

    def _loss(self, trainer: Any, concept: bool) -> float:
        s, pipe = self.samples, self.pipe
        device = (pipe.unet if self.flow is None else pipe.transformer).device
        total, count = 0.0, 0
        for rows in s.groups:
            sl = torch.tensor(rows)
            idx, flips, t = s.idx[sl], s.flips[sl], s.timesteps[sl]
            eps, noise = torch.stack([s.eps_lat[r] for r in rows]), torch.stack([s.noise[r] for r in rows])
            latents = self.cache.sample(idx, flips, eps)
            latents, noise, t = latents.to(device), noise.to(device), t.to(device)
            templates = [s.templates[r] for r in rows]
            if concept:
                prompts = trainer.prompts(templates, [self.examples[int(i)] for i in idx])
            elif hasattr(trainer, "class_prompts"):  # the method's own class prompt (DreamBooth's prior prompt)
                prompts = trainer.class_prompts(templates)
            else:
                prompts = [" ".join(tpl.format(self.class_text).split()) for tpl in templates]
            cond = trainer.conditioning(prompts, self.resolution)
            if self.micro:
                cond = with_time_ids(cond, [self.examples[int(i)].time_ids(bool(f)) for i, f in zip(idx, flips)])
            if self.flow is not None:  # SD 3 / FLUX: the training objective at the rows' fixed σ
                m = self.cache.mask(idx, flips).to(device) if self.cache.has_masks else None
                per = self.flow.per_sample(latents, noise, t, cond, m)
                total += float(per.sum())
                count += len(per)
                continue
            noisy = self.scheduler.add_noise(latents, noise, t)
            target = noise if self.scheduler.config.prediction_type == "epsilon" else \
                self.scheduler.get_velocity(latents, noise, t)
            pred = pipe.unet(noisy.to(pipe.unet.dtype), t, cond.encoder_hidden_states,
                             added_cond_kwargs=cond.added_cond_kwargs).sample
            err = (pred.float() - target.float()) ** 2
            if self.cache.has_masks:
                m = self.cache.mask(idx, flips).to(device)
                per = (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1e-6)
            else:
                per = err.mean(dim=(1, 2, 3))
            total += float(per.sum())
            count += len(per)
        return total / max(count, 1)

    def gain(self, trainer: Any) -> float:
        """``1 − L(concept) / L(class)`` on the probe's samples."""
        concept, plain = self.loss(trainer), self.loss(trainer, concept=False)
        return 1.0 - concept / max(plain, 1e-12)


def choose_start(probe: DenoisingProbe, trainer: Any, candidates: dict[str, Any], load: Any,
                 log: Any) -> tuple[str, dict[str, float]]:
    """Measured initialisation: load each candidate start (``load(vectors)``), score it by the probe's
    denoising loss of the photos, and load the lowest. Returns ``(chosen, {kind: loss})`` with the
    unrounded losses; the trainers keep them rounded to 6 places in their records."""
    losses: dict[str, float] = {}
    for kind, vectors in candidates.items():
        load(vectors)
        losses[kind] = probe.loss(trainer)
    chosen = min(losses, key=lambda k: round(losses[k], 6))
    load(candidates[chosen])
    log(f"init: {chosen} (denoising loss of the photos: {', '.join(f'{k} {v:.4f}' for k, v in losses.items())})")
    return chosen, losses


def verdict(gain: float) -> str:
    """"learned" / "weak" / "not learned" from the final gain (thresholds above)."""
    if gain >= LEARNED_GAIN:
        return "learned"
    if gain >= WEAK_GAIN:
        return "weak"
    return "not learned"


def verdict_of(metrics: Any) -> str:
    """The verdict word stored in a concept's ``metrics`` (``""`` when it has none or it is malformed)."""
    v = metrics.get("verdict") if isinstance(metrics, dict) else None
    return v["verdict"] if isinstance(v, dict) and v.get("verdict") in VERDICTS else ""


def verdict_text(metrics: Any) -> str:
    """The one-line verdict of a concept's ``metrics`` (``""`` when it has none)."""
    if not verdict_of(metrics):
        return ""
    v = metrics["verdict"]
    gain, start = v.get("gain"), v.get("gain_start")
    if not isinstance(gain, (int, float)) or not isinstance(start, (int, float)):
        return f"verdict: {v['verdict']}"
    text = f"verdict: {v['verdict']} (denoising gain over the class prompt {gain:+.3f}, {start:+.3f} at the start)"
    budget = v.get("budget")
    if isinstance(budget, dict) and budget.get("curve"):
        curve = ", ".join(f"{int(step)}: {g:+.2f}" for step, g in budget["curve"])
        text += (f"; auto budget: {budget.get('steps_run')} steps, kept step {budget.get('kept_step')} "
                 f"(gain by step: {curve})")
    return text


class AutoBudget:
    """The ``auto`` step budget: measure the gain every ``every`` steps, remember the best step's
    trained tensors, and stop once the concept is learned (best gain ≥ ``LEARNED_GAIN``) and
    ``patience`` measurements in a row improve on the best by less than ``min_delta`` (``--steps``
    stays the hard cap). A run that has not learned yet never stops early: DreamBooth's gain stays
    flat for its first hundred-odd steps and then rises — a plateau rule alone stopped it there
    (world-b seed 0: stopped at step 150, gain +0.006, fidelity 0.00). The curve of (step, gain) is kept.

    The step kept is the **latest** one whose gain is within ``min_delta`` of the best: the gain is a
    proxy measured on 16 noises, so steps within its resolution are a tie, and along a tie the
    concept keeps learning what the gain no longer shows (Perfusion on world-b, seed 1: gain
    +0.153 at step 160 and +0.156 at 240, fidelity 0.47 at 160 but 0.64 after 400 steps).

    The best tensors live in buffers allocated once (``trainable``'s shapes) — unless they would hold
    more than ``keep_limit`` elements (a whole-model fine-tune), when the run still stops on a plateau
    but keeps its last step. :meth:`state` and :meth:`tensors` go into checkpoints, so a resumed run
    stops and keeps exactly what the uninterrupted one would."""

    PREFIX = "budget.best."

    def __init__(self, probe: DenoisingProbe, trainable: dict[str, torch.Tensor], *, every: int, patience: int = 3,
                 min_delta: float = 0.005, keep_limit: int = 64_000_000):
        self.probe, self.every, self.patience, self.min_delta = probe, max(1, every), patience, min_delta
        self.curve: list[tuple[int, float]] = []
        self.best_gain, self.best_step, self.stale, self.has_best = float("-inf"), 0, 0, False
        self.keep_step = 0  # the latest measured step within min_delta of the best: what the run keeps
        keep = sum(v.numel() for v in trainable.values()) <= keep_limit
        self._best = {k: v.detach().clone() for k, v in trainable.items()} if keep else None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, step: int, trainer: Any, trainable: dict[str, torch.Tensor], log: Any = None) -> bool:
        """Measure at ``step`` (reported through ``log`` when given); True when training should stop."""
        gain = self.probe.gain(trainer)
        self.curve.append((step, round(gain, 4)))
        if log is not None:
            log(f"step {step}: denoising gain {gain:+.3f} (best so far {max(gain, self.best_gain):+.3f})")
        improved = gain > self.best_gain + self.min_delta or not self.has_best
        if improved:
            self.best_gain, self.best_step, self.stale, self.has_best = gain, step, 0, True
        else:
            self.stale += 1
        if improved or gain >= self.best_gain - self.min_delta:  # a new best, or a tie with it: keep the later
            self.keep_step = step
            if self._best is not None:
                with torch.no_grad():
                    for k, v in trainable.items():
                        self._best[k].copy_(v)
        return self.stale >= self.patience and self.best_gain >= LEARNED_GAIN

    def _restores(self) -> bool:
        """True when the kept step is not the last measured one (its buffers then hold other tensors)."""
        return self._best is not None and self.has_best and self.keep_step != self.curve[-1][0]

    def restore_best(self, trainable: dict[str, torch.Tensor]) -> None:
        """Put the kept step's tensors back (nothing when the last measurement was kept, or when the
        tensors were too large to keep)."""
        best = self._best
        if best is None or not self._restores():
            return
        with torch.no_grad():
            for k, v in trainable.items():
                v.copy_(best[k])

    def kept_best(self) -> bool:
        return self._best is not None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the watch besides :meth:`tensors` (JSON)."""
        return {"curve": [list(p) for p in self.curve], "best_gain": self.best_gain, "best_step": self.best_step,
                "stale": self.stale, "has_best": self.has_best, "keep_step": self.keep_step}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.curve = [(int(a), float(b)) for a, b in state["curve"]]
            self.best_gain, self.best_step = float(state["best_gain"]), int(state["best_step"])
            self.stale, self.has_best = int(state["stale"]), bool(state["has_best"])
            self.keep_step = int(state.get("keep_step", self.best_step))  # checkpoints before the tie rule

    def tensors(self) -> dict[str, torch.Tensor]:
        """The best-step buffers under checkpoint names (loaded back in place on resume)."""
        return {self.PREFIX + k: v for k, v in (self._best or {}).items()}

    def record(self, steps_run: int) -> dict[str, Any]:
        kept = self.keep_step if self._restores() else steps_run
        return {"steps_run": steps_run, "kept_step": kept,
                "curve": [list(p) for p in self.curve], "every": self.every}
