"""Parity of the studio's ProSpect (per-stage vector selection and the training loss) with the official code,
at function level.

Reference: github.com/zyxElsa/ProSpect — ``ldm/models/diffusion/ddpm.py`` (``LatentDiffusion.p_losses``,
``DDPM.q_sample``, ``DDPM.get_loss``) and ``ldm/modules/diffusionmodules/util.py``
(``make_beta_schedule``, ``extract_into_tensor``), imported from the checkout given with ``--ref``,
never copied. Checked at commit 31314f18b63abd3b7629722de51c52f2f129d241.

**Why function level.** The official code is a CompVis/LDM PyTorch-Lightning code base: its UNet
(``openaimodel.UNetModel``) is not diffusers', its ``FrozenCLIPEmbedder`` loads CLIP-L by Hub name,
and its ``EmbeddingManager`` — a transformer block mapping the initializer word's embedding to the 10
stage vectors — reshapes everything to 768 columns (SD 1.x's width), so neither a whole training
step nor its embedding path runs on a tiny base. What ProSpect adds to textual inversion is compared:

1. **the stage schedule**: for every training timestep ``t`` in 0…999, the stage whose conditioning
   their ``p_losses`` hands the UNet (``cond[int(t·stages/1000)]``; a recording stand-in for
   ``apply_model``) against the studio's ``stage_of``. The two index the stages in opposite orders —
   theirs ``s`` counts from the least noisy timesteps (``s = 0``: t ∈ [0, 100)), the studio's ``g`` from
   the noisiest (``g = 0``: t ∈ [900, 1000), the order of denoising) — so the check is ``g = G − 1 − s``.
2. **the noise schedule** their config builds (``make_beta_schedule("linear", 1000, 0.00085, 0.012)``)
   against the tiny base's scheduler (SD's ``scaled_linear``): the same ``ᾱ_t``.
3. **the loss and its gradient**, one sample per call (their ``int(t·…)`` takes a one-element ``t``:
   the official code trains at batch 1): their ``p_losses`` — ``q_sample`` with their buffers, the
   selected stage's conditioning, ``get_loss`` (l2), ``logvar`` 0, ``l_simple_weight`` 1,
   ``original_elbo_weight`` 0, ``embedding_reg_weight`` 0 (their config) — with ``apply_model`` = the
   tiny diffusers UNet and ``cond`` = the list of the 10 per-stage encodings of the prompt (stage ``s``
   holds the studio's vector ``G − 1 − s`` at the placeholder, encoded by the tiny text encoder),
   against the studio's training path (``ProSpectTrainer.conditioning`` + the UNet call in which the
   per-timestep hook picks the stage, MSE). Compared per timestep: the loss, and its gradient with
   respect to the whole ``(10, D)`` table — which checks that only the selected stage's row receives
   one.

The studio trains the 10 vectors directly; theirs trains the mapper that produces them (the studio's
docs/methods.md, "ProSpect"); with the same vectors the math after them is what is compared.

Run-time shims (for the run only): ``pytorch_lightning``, ``einops``, ``torchvision``, ``taming`` and
other modules their ``ddpm.py`` imports for training, logging and sampling are permissive stand-ins
(a class for a capitalised name, an identity decorator otherwise); none of them is called by the
compared functions.

Run (about a minute on 2 shared CPU cores)::

    git clone https://github.com/zyxElsa/ProSpect /tmp/ProSpect
    python -m bench.parity.prospect --ref /tmp/ProSpect
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.parity.common import (
    Row,
    build_tiny_folder,
    compare,
    isolated_imports,
    print_table,
    ref_label,
    require_file,
    write_images,
)

REPO = "github.com/zyxElsa/ProSpect"
FILE = "ldm/models/diffusion/ddpm.py"
TOKEN = "<parity>"
STUBBED = ("pytorch_lightning", "einops", "torchvision", "taming", "omegaconf", "kornia", "clip")


class _Stub(types.ModuleType):
    """A module whose every attribute is a stand-in: a class for capitalised names, else an identity
    decorator / no-op function."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            value: Any = type(name, (torch.nn.Module,), {"__init__": lambda self, *a, **k: torch.nn.Module.__init__(self)})
        else:
            def value(*args: Any, **kwargs: Any) -> Any:
                return args[0] if len(args) == 1 and callable(args[0]) else None
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for the packages ``names`` (and their submodules): those of :data:`STUBBED` that are
    not installed here."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        module = _Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: Any) -> None:
        return None


@contextlib.contextmanager
def reference_modules(ref: Path) -> Iterator[types.SimpleNamespace]:
    """Their ``ddpm`` and diffusion ``util`` modules, importable here (module docstring); the stand-ins
    leave ``sys.modules`` afterwards."""
    import importlib.util

    missing = {name for name in STUBBED if importlib.util.find_spec(name) is None}
    finder = _StubFinder(missing)
    with isolated_imports([ref]):
        sys.meta_path.insert(0, finder)
        try:
            import ldm.models.diffusion.ddpm as ddpm
            import ldm.modules.diffusionmodules.util as dutil

            yield types.SimpleNamespace(ddpm=ddpm, util=dutil)
        finally:
            sys.meta_path.remove(finder)
            for name in list(sys.modules):
                if name.split(".")[0] in missing:
                    del sys.modules[name]


def studio_side(folder: Path, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The studio's trainer with drawn stage vectors; per timestep its training loss and gradient."""
    from studio.methods.prospect import stage_of
    from studio.models import load_base
    from trainers.prospect import ProSpectTrainConfig, ProSpectTrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = ProSpectTrainConfig(images=str(images), token=TOKEN, class_word="dog", steps=1, lr=1e-3, batch_size=1,
                              flip=False, seed=args.seed, probe=False, budget="fixed", log_every=0)
    trainer = ProSpectTrainer(base, cfg, TOKEN)
    pipe = base.pipe
    table = trainer.params[0]  # (G, D)
    gen = torch.Generator().manual_seed(args.seed + 3)
    with torch.no_grad():  # ten distinct vectors around the class word, as after training
        table.add_(0.5 * table.norm(dim=-1, keepdim=True) * torch.randn(table.shape, generator=gen)
                   / table.shape[-1] ** 0.5)
    prompt = args.prompt.format(TOKEN)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    noise = torch.randn(1, 4, 16, 16, generator=gen)
    sched = pipe.scheduler
    out: dict[str, Any] = {"losses": [], "grads": [], "table": table.detach().clone(), "latents": latents,
                           "noise": noise, "stages": stage_of(torch.arange(1000), table.shape[0], 1000),
                           "alphas_cumprod": sched.alphas_cumprod.clone()}
    try:
        for t in args.timesteps:
            ts = torch.tensor([t])
            table.grad = None
            cond = trainer.conditioning([prompt], 32)
            noisy = sched.add_noise(latents, noise, ts)
            pred = pipe.unet(noisy, ts, cond.encoder_hidden_states).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            assert table.grad is not None
            out["losses"].append(float(loss.detach()))
            out["grads"].append(table.grad.detach().clone())
        # the per-stage encodings of the prompt, for their cond list: the stage's vector at the placeholder
        from studio.methods.neti.encoder import text_states
        from studio.methods.runtime import text_encoders

        tok, te = text_encoders(pipe)[0]
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        where = (ids == tok.convert_tokens_to_ids(TOKEN))[..., None]
        out["encode"] = lambda vec: text_states(te, torch.where(where, vec, te.get_input_embeddings()(ids)),
                                                penultimate=False)[0]
        out["table_param"] = table
        out["unet_folder"] = folder
    except BaseException:
        trainer.teardown()
        raise
    out["teardown"] = trainer.teardown
    return out


def official_side(ref: Path, studio: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Their ``p_losses`` on the studio's vectors, UNet and draws (module docstring)."""
    from diffusers import UNet2DConditionModel

    rows: list[Row] = []
    with reference_modules(ref) as mod:
        ddpm, dutil = mod.ddpm, mod.util
        table = studio["table_param"]
        n_stages = int(table.shape[0])
        betas = torch.as_tensor(dutil.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012),
                                dtype=torch.float32)
        acp = torch.cumprod(1.0 - betas, dim=0)
        rows.append(compare("ᾱ_t, their make_beta_schedule('linear', 0.00085, 0.012) vs the tiny base's scheduler",
                            studio["alphas_cumprod"], acp, atol=1e-6, rtol=1e-5))
        fake = types.SimpleNamespace(
            prospect_stages=n_stages, parameterization="eps", loss_type="l2", training=True,
            logvar=torch.zeros(1000), l_simple_weight=1.0, original_elbo_weight=0.0, embedding_reg_weight=0.0,
            lvlb_weights=torch.zeros(1000), learn_logvar=False, device=torch.device("cpu"),
            sqrt_alphas_cumprod=acp.sqrt(), sqrt_one_minus_alphas_cumprod=(1.0 - acp).sqrt())
        fake.q_sample = types.MethodType(ddpm.DDPM.q_sample, fake)
        fake.get_loss = types.MethodType(ddpm.DDPM.get_loss, fake)
        # 1. the schedule: which entry of cond their p_losses hands the model, for every t
        picked: list[int] = []
        conds = [torch.full((1, 1, 1), float(s)) for s in range(n_stages)]

        def record(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            picked.append(int(c.flatten()[0]))
            return torch.zeros_like(x)

        fake.apply_model = record
        x = torch.zeros(1, 1, 1, 1)
        with torch.no_grad():
            for t in range(1000):
                ddpm.LatentDiffusion.p_losses(fake, x, conds, torch.tensor([t]), noise=torch.zeros_like(x))
        theirs_s = torch.tensor(picked)
        rows.append(compare(f"stage of every t in 0…999 (studio g vs their G − 1 − s; G = {n_stages})",
                            studio["stages"].double(), (n_stages - 1 - theirs_s).double(), atol=0, rtol=0))
        # 3. loss and gradient with the real (tiny) UNet
        unet = UNet2DConditionModel.from_pretrained(str(studio["unet_folder"]), subfolder="unet")
        unet.requires_grad_(False)
        fake.apply_model = lambda x, t, c: unet(x, t, c).sample
        losses, grads = [], []
        for t in args.timesteps:
            table.grad = None
            cond = [studio["encode"](table[n_stages - 1 - s]) for s in range(n_stages)]
            loss, _ = ddpm.LatentDiffusion.p_losses(fake, studio["latents"], cond, torch.tensor([t]),
                                                    noise=studio["noise"])
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(table.grad.detach().clone())
    ours_l, ours_g = torch.tensor(studio["losses"]), torch.stack(studio["grads"])
    rows += [
        compare(f"loss at t = {list(args.timesteps)} (studio training path vs their p_losses)", ours_l,
                torch.tensor(losses), atol=1e-7, rtol=1e-5),
        compare(f"gradient wrt the whole ({n_stages}, D) stage table, per t", ours_g, torch.stack(grads), atol=1e-9,
                rtol=1e-4),
    ]
    rows.append(compare("rows with a nonzero gradient, per t (studio vs theirs: exactly the selected stage)",
                        (ours_g.abs().sum(-1) > 0).double(), (torch.stack(grads).abs().sum(-1) > 0).double(),
                        atol=0, rtol=0))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="root of a checkout of github.com/zyxElsa/ProSpect")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[0, 99, 100, 345, 500, 650, 899, 900, 999])
    ap.add_argument("--prompt", default="a photo of a {} on the beach", help="{} = the placeholder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    require_file(args.ref, FILE, REPO)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder("tiny", tmp / "base")
        images = write_images(tmp / "images", n=1, size=32)
        studio = studio_side(folder, images, args)
        try:
            rows = official_side(args.ref.resolve(), studio, args)
        finally:
            studio["teardown"]()
    commit = ref_label(args.ref, args.ref_commit)
    ok = print_table(f"ProSpect (function level) — studio vs zyxElsa/ProSpect@{commit} {FILE} p_losses — base tiny, "
                     f"10 stages, batch 1 ({time.monotonic() - t0:.0f} s)", rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
