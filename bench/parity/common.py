"""The parity harness: a tiny model both sides can load, the studio's training draws recorded and
replayed into an official script, and a comparison table with a stated tolerance.

How a parity run works (bench/parity/README.md):

1. :func:`build_tiny_folder` saves one of the studio's tiny bases (``studio.models.tiny``) as a
   diffusers folder. Its text encoder is written with the ``text_model.``-prefixed key layout of
   the published Stable Diffusion checkpoints, which both the installed ``transformers`` and the
   older ``CLIPTextModel`` subclasses of official repositories load.
2. The studio trains on it through its own loop (``trainers.loop.run_training``) while a
   :class:`StepRecorder` records, per optimizer step, what went into the UNet (noisy latents,
   timesteps, text conditioning), what came out (the prediction), the gradients of the trained
   tensors and the tensors after the step; :func:`record_studio_draws` records the clean latents,
   the noise and the prompts the loop drew.
3. The official script runs in this process (:func:`run_script`) with :class:`DrawReplay`:
   ``torch.randn_like`` / ``torch.randint`` / ``AutoencoderKL.encode`` / the data loader hand it the
   studio's draws, so both sides see the same latents, noise, timesteps and prompts; a second
   :class:`StepRecorder` records the same quantities from inside the official loop.
4. :func:`compare` puts each pair in a :class:`Row` (max |ours − theirs|, that over max |theirs|,
   the tolerance), :func:`print_table` prints them and the verdict.

Replaying random draws is the standard way to compare two training loops whose random streams are
drawn in different orders: the math after the draws is what is compared.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import runpy
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the model and the data


def build_tiny_folder(name: str, dest: Path, seed: int = 0) -> Path:
    """Save the studio's tiny base ``name`` (``tiny``: SD 1.x-like, ε; ``tiny-v``: SD 2.x-like, v)
    to ``dest`` as a diffusers folder, text encoder in the ``text_model.*`` key layout."""
    from safetensors.torch import load_file, save_file

    from studio.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(name, seed=seed)
    pipe.save_pretrained(str(dest))
    te_file = dest / "text_encoder" / "model.safetensors"
    state = load_file(str(te_file))
    legacy = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    save_file(legacy, str(te_file), metadata={"format": "pt"})
    return dest


def write_images(folder: Path, n: int = 3, size: int = 32, seed: int = 0) -> Path:
    """``n`` deterministic ``size``² RGB PNGs (a coloured disc on a gradient) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        bg = rng.uniform(0, 1, 3)
        fg = rng.uniform(0, 1, 3)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        img = bg[None, None] * (0.5 + 0.5 * yy[..., None])
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[disc] = fg
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


# ----------------------------------------------------------------------------- the reference checkout


def checkout_commit(path: Path) -> str:
    """The commit of the checkout at ``path`` (``git rev-parse HEAD``), or ``"unknown"`` for a plain copy."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def ref_label(path: Path, given: str | None) -> str:
    """The checkout's commit for titles: ``git rev-parse HEAD``; for a plain copy without ``.git``, the
    ``--ref-commit`` the user gave, marked as stated (not verified)."""
    found = checkout_commit(path)
    if found != "unknown":
        return found[:12]
    return f"{given[:12]} (stated)" if given else "unknown"


def require_file(root: Path, rel: str, how: str) -> Path:
    """``root/rel``, or exit with a one-line message saying how to get the checkout."""
    path = root / rel
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the root of a checkout of {how}.")
    return path


def load_module(path: Path, name: str) -> types.ModuleType:
    """Import the file ``path`` as module ``name`` (the reference code is imported, never copied)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched(target: Any, attr: str, value: Any) -> Iterator[None]:
    """Set ``target.attr = value`` for the duration (restored, or deleted if it did not exist)."""
    missing = object()
    old = getattr(target, attr, missing) if not isinstance(target, dict) else target.get(attr, missing)
    if isinstance(target, dict):
        target[attr] = value
    else:
        setattr(target, attr, value)
    try:
        yield
    finally:
        if isinstance(target, dict):
            if old is missing:
                target.pop(attr, None)
            else:
                target[attr] = old
        elif old is missing:
            delattr(target, attr)
        else:
            setattr(target, attr, old)


@contextlib.contextmanager
def isolated_imports(paths: list[Path]) -> Iterator[None]:
    """Put ``paths`` first on ``sys.path``; afterwards drop every module imported meanwhile (an official
    repository's top-level ``utils`` or ``models`` must not leak into the next run)."""
    before = set(sys.modules)
    old_path = list(sys.path)
    sys.path[:0] = [str(p) for p in paths]
    try:
        yield
    finally:
        sys.path[:] = old_path
        for name in set(sys.modules) - before:
            if not name.startswith(("torch", "transformers", "diffusers", "accelerate", "huggingface_hub",
                                    "safetensors", "numpy", "PIL", "tqdm", "packaging", "peft")):
                del sys.modules[name]


def run_script(path: Path, argv: list[str]) -> None:
    """Run ``path`` as ``__main__`` in this process with ``sys.argv = [path, *argv]``."""
    with patched(sys, "argv", [str(path), *argv]):
        runpy.run_path(str(path), run_name="__main__")


@contextlib.contextmanager
def legacy_library_shims() -> Iterator[None]:
    """Names that older official scripts import and that today's libraries removed, put back for the run.

    * ``huggingface_hub.HfFolder`` / ``Repository`` (only used to push to the Hub, never called here);
    * ``transformers.models.clip.modeling_clip._expand_mask`` (the padding mask ``(B, S)`` → additive
      ``(B, 1, T, S)``, its old meaning) and ``CLIP_TEXT_INPUTS_DOCSTRING`` (a docstring).
    """
    import huggingface_hub
    import transformers.models.clip.modeling_clip as clip

    def _expand_mask(mask: torch.Tensor, dtype: torch.dtype, tgt_len: int | None = None) -> torch.Tensor:
        bsz, src_len = mask.size()
        tgt = tgt_len or src_len
        inverted = 1.0 - mask[:, None, None, :].expand(bsz, 1, tgt, src_len).to(dtype)
        return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)

    class _Unused:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("pushing to the Hub is not part of a parity run")

    with contextlib.ExitStack() as stack:
        for target, attr, value in ((huggingface_hub, "HfFolder", _Unused), (huggingface_hub, "Repository", _Unused),
                                    (clip, "_expand_mask", _expand_mask), (clip, "CLIP_TEXT_INPUTS_DOCSTRING", "")):
            if not hasattr(target, attr):
                stack.enter_context(patched(target, attr, value))
        yield


def torchvision_stub() -> tuple[types.ModuleType, types.ModuleType]:
    """``torchvision`` / ``torchvision.transforms`` stand-ins: official datasets build transforms that the
    replayed batches never call (each returns the identity)."""
    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")

    def unused(*args: Any, **kwargs: Any) -> Any:
        return lambda img: img

    for name in ("Compose", "Resize", "CenterCrop", "RandomCrop", "ToTensor", "Normalize", "RandomHorizontalFlip",
                 "RandomApply", "RandomRotation"):
        setattr(tr, name, unused)
    InterpolationMode = enum.Enum(  # noqa: N806 - the library's name
        "InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS NEAREST_EXACT")
    tr.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    tv.transforms = tr  # type: ignore[attr-defined]
    return tv, tr


@contextlib.contextmanager
def torchvision_standins() -> Iterator[None]:
    """:func:`torchvision_stub` in ``sys.modules`` for the run, only when ``torchvision`` is neither imported
    nor installed. ``transformers`` is imported first: it asks importlib about ``torchvision``."""
    import transformers  # noqa: F401

    with contextlib.ExitStack() as stack:
        if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
            tv, tr = torchvision_stub()
            stack.enter_context(patched(sys.modules, "torchvision", tv))
            stack.enter_context(patched(sys.modules, "torchvision.transforms", tr))
        yield


@contextlib.contextmanager
def diffusers_example_shims() -> Iterator[None]:
    """What a diffusers training example needs for a parity run: :func:`torchvision_standins` (its dataset's
    transforms; the replayed batches replace its images), ``check_min_version`` as a no-op (examples on
    the main branch ask for the next diffusers release) and :func:`legacy_library_shims`."""
    import diffusers.utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(torchvision_standins())
        stack.enter_context(patched(diffusers.utils, "check_min_version", lambda *a, **k: None))
        stack.enter_context(legacy_library_shims())
        yield


# ----------------------------------------------------------------------------- recording and replaying


@dataclass
class StepRecorder:
    """Per optimizer step: the UNet's inputs and output, the gradients of the trained tensor and the
    tensor after the step, and the loss handed to ``backward``.

    ``select(optimizer)`` returns the trained tensor (e.g. the placeholder rows of an embedding
    matrix); it is read before ``optimizer.step()`` (its ``.grad``) and after (its value)."""

    select: Callable[[torch.optim.Optimizer], torch.Tensor]
    unet: list[dict[str, torch.Tensor]] = field(default_factory=list)  # hidden (B,77,D), pred, timesteps, noisy
    grads: list[torch.Tensor] = field(default_factory=list)
    before: list[torch.Tensor] = field(default_factory=list)
    after: list[torch.Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def install(self, *, backward_owner: Any = None) -> Iterator[StepRecorder]:
        """Patch ``UNet2DConditionModel.forward`` and ``torch.optim.AdamW.step`` (and, given an
        Accelerator class, its ``backward``, to read the loss) while the block runs."""
        from diffusers import UNet2DConditionModel

        rec = self
        unet_forward = UNet2DConditionModel.forward
        adam_step = torch.optim.AdamW.step

        def forward(unet: Any, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                    *args: Any, **kwargs: Any) -> Any:
            out = unet_forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs)
            pred = out.sample if hasattr(out, "sample") else out[0]
            rec.unet.append({"noisy": sample.detach().clone(), "timesteps": torch.as_tensor(timestep).detach().clone(),
                             "hidden": encoder_hidden_states.detach().clone(), "pred": pred.detach().clone()})
            return out

        def step(opt: Any, *args: Any, **kwargs: Any) -> Any:
            sel = rec.select(opt)
            g = getattr(sel, "_parity_grad", None)
            rec.grads.append(g if g is not None else torch.zeros(0))
            rec.before.append(sel.detach().clone())
            out = adam_step(opt, *args, **kwargs)
            rec.after.append(rec.select(opt).detach().clone())
            return out

        with contextlib.ExitStack() as stack:
            stack.enter_context(patched(UNet2DConditionModel, "forward", forward))
            stack.enter_context(patched(torch.optim.AdamW, "step", step))
            if backward_owner is not None:
                backward = backward_owner.backward

                def record_backward(acc: Any, loss: torch.Tensor, **kwargs: Any) -> Any:
                    rec.losses.append(float(loss.detach()))
                    return backward(acc, loss, **kwargs)

                stack.enter_context(patched(backward_owner, "backward", record_backward))
            yield self


def rows_of(param: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``param[ids]`` with its gradient rows attached as ``._parity_grad`` (for :class:`StepRecorder`)."""
    sel = param.detach()[ids].clone()
    sel._parity_grad = None if param.grad is None else param.grad.detach()[ids].clone()  # type: ignore[attr-defined]
    return sel


def whole(param: torch.Tensor) -> torch.Tensor:
    """``param`` itself with its gradient attached as ``._parity_grad``."""
    sel = param.detach().clone()
    sel._parity_grad = None if param.grad is None else param.grad.detach().clone()  # type: ignore[attr-defined]
    return sel


@dataclass
class StudioDraws:
    """What the studio's loop drew per micro-batch: clean latents ``(B, C, h, w)``, noise, timesteps ``(B,)``, prompts."""

    latents: list[torch.Tensor] = field(default_factory=list)
    noise: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[torch.Tensor] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)


@contextlib.contextmanager
def record_studio_draws(trainer: Any) -> Iterator[StudioDraws]:
    """Record the studio loop's draws: ``trainers.loop._Fit.per_sample`` gets the clean latents, the noise
    and the timesteps of each micro-batch; ``trainer.prompts`` the prompts."""
    import trainers.loop as loop

    draws = StudioDraws()
    per_sample = loop._Fit.per_sample
    prompts = trainer.prompts

    def record(fit: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: Any,
               mask: Any) -> torch.Tensor:
        draws.latents.append(latents.detach().clone())
        draws.noise.append(noise.detach().clone())
        draws.timesteps.append(timesteps.detach().clone())
        return per_sample(fit, latents, noise, timesteps, cond, mask)

    def record_prompts(templates: list[str], examples: list[Any]) -> list[str]:
        out = prompts(templates, examples)
        draws.prompts.append(list(out))
        return out

    with patched(loop._Fit, "per_sample", record), patched(trainer, "prompts", record_prompts):
        yield draws


def record_ti_training(base: Any, cfg: Any, trainer: Any) -> dict[str, Any]:
    """Train a textual-inversion ``trainer`` through the studio's loop, recording its draws and every step.

    Returns ``init`` (the first text encoder's vectors before training, ``(n, D)``), ``text`` (the concept's prompt text),
    ``rec`` (:class:`StepRecorder` of the trained ``(n, D)`` tensor), ``draws`` (:class:`StudioDraws`),
    ``losses``, ``final`` (the saved ``emb_params``, ``(n, D)``) and ``scaling`` (the VAE's factor)."""
    from trainers.loop import load_training_images, run_training

    init = trainer.init[0].clone()
    text = trainer.text()
    examples = load_training_images(cfg, base)
    rec = StepRecorder(select=lambda opt: whole(opt.param_groups[0]["params"][0]))
    with rec.install(), record_studio_draws(trainer) as draws:
        result = run_training(base, trainer, cfg, method="textual_inversion", examples=examples, save=False)
    return {"rec": rec, "draws": draws, "init": init, "text": text, "losses": result.losses,
            "final": result.concept.tensors["emb_params"], "scaling": float(base.pipe.vae.config.scaling_factor)}


class _Latent:
    def __init__(self, value: torch.Tensor):
        self.latent_dist = types.SimpleNamespace(sample=lambda generator=None: value, mode=lambda: value,
                                                 mean=value)


class ReplayLoader:
    """A stand-in for the official script's ``DataLoader``: yields the recorded batches in order."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)


@dataclass
class DrawReplay:
    """Hand the studio's draws to an official loop: ``AutoencoderKL.encode`` returns the recorded clean
    latents (divided by the VAE's scaling factor, which the script multiplies back), ``torch.randn_like``
    of a latent-shaped tensor the recorded noise, ``torch.randint`` of the batch's size the recorded
    timesteps, and ``torch.utils.data.DataLoader`` a :class:`ReplayLoader` over ``batches``."""

    latents: list[torch.Tensor]
    noise: list[torch.Tensor]
    timesteps: list[torch.Tensor]
    batches: list[dict[str, torch.Tensor]]
    scaling_factor: float
    used: dict[str, int] = field(default_factory=lambda: {"latents": 0, "noise": 0, "timesteps": 0})

    @contextlib.contextmanager
    def install(self) -> Iterator[DrawReplay]:
        from diffusers import AutoencoderKL

        replay = self
        randn_like, randint = torch.randn_like, torch.randint
        lat, noi, ts = list(self.latents), list(self.noise), list(self.timesteps)

        def encode(vae: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not lat:
                raise RuntimeError("the official loop encoded more batches than the studio drew")
            replay.used["latents"] += 1
            return _Latent(lat.pop(0).to(x.device) / replay.scaling_factor)

        def fake_randn_like(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if noi and tuple(x.shape) == tuple(noi[0].shape):
                replay.used["noise"] += 1
                return noi.pop(0).to(x.device, x.dtype)
            return randn_like(x, *args, **kwargs)

        def fake_randint(*args: Any, **kwargs: Any) -> torch.Tensor:
            size = kwargs.get("size", next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None))
            if ts and size is not None and tuple(size) == tuple(ts[0].shape):
                replay.used["timesteps"] += 1
                return ts.pop(0).to(kwargs.get("device") or "cpu", torch.long)
            return randint(*args, **kwargs)

        with contextlib.ExitStack() as stack:
            stack.enter_context(patched(AutoencoderKL, "encode", encode))
            stack.enter_context(patched(torch, "randn_like", fake_randn_like))
            stack.enter_context(patched(torch, "randint", fake_randint))
            # a class, so that isinstance(x, torch.utils.data.DataLoader) still works (accelerate asks)
            loader_cls = type("ReplayDataLoader", (), {"__new__": lambda cls, *a, **k: ReplayLoader(replay.batches)})
            stack.enter_context(patched(torch.utils.data, "DataLoader", loader_cls))
            yield self


# ----------------------------------------------------------------------------- comparing


@dataclass
class Row:
    """One compared quantity. It passes when ``max|ours − ref| ≤ atol + rtol · max|ref|``."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    ref_scale: float
    atol: float
    rtol: float
    note: str = ""
    explained: bool = False  # a known, documented deviation: shown, left out of the verdict

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else (0.0 if self.max_abs == 0 else float("inf"))

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.atol + self.rtol * self.ref_scale


def compare(name: str, ours: Any, ref: Any, *, atol: float = 0.0, rtol: float = 1e-5, note: str = "",
            explained: bool = False) -> Row:
    """A :class:`Row` for two tensors (or floats) of the same shape; a shape mismatch fails the row.
    ``explained``: a documented deviation, printed but not counted in the verdict."""
    a = torch.as_tensor(ours).detach().double().cpu()
    b = torch.as_tensor(ref).detach().double().cpu()
    if a.shape != b.shape:
        return Row(name, tuple(a.shape), float("inf"), 0.0, atol, rtol, f"shape {tuple(a.shape)} vs {tuple(b.shape)}",
                   explained)
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return Row(name, tuple(a.shape), diff, scale, atol, rtol, note, explained)


def print_table(title: str, rows: list[Row]) -> bool:
    """Print the rows as a Markdown table and the verdict; True when every row not ``explained`` passes."""
    print(f"\n### {title}\n")
    print("| quantity | shape | max abs diff | max abs ref | rel diff | tolerance (atol + rtol·ref) | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tol = f"{r.atol:.0e} + {r.rtol:.0e}·ref"
        shape = "×".join(map(str, r.shape)) or "scalar"
        print(f"| {r.name}{' (' + r.note + ')' if r.note else ''} | {shape} | {r.max_abs:.3e} | {r.ref_scale:.3e} | "
              f"{r.rel:.3e} | {tol} | {'explained (README)' if r.explained else 'yes' if r.ok else 'NO'} |")
    checked = [r for r in rows if not r.explained]
    ok = all(r.ok for r in checked)
    print(f"\nverdict: {'PARITY' if ok else 'MISMATCH'} ({sum(r.ok for r in checked)}/{len(checked)} rows within "
          f"tolerance{f'; {len(rows) - len(checked)} explained deviation(s)' if len(checked) < len(rows) else ''})")
    return ok
