"""Parity of the studio's NeTI (mapper, per-layer text conditioning, training step) with the official code.

Reference: github.com/NeuralTextualInversion/NeTI (Alaluf et al. 2023) — ``models/neti_mapper.py``,
``models/positional_encoding.py``, ``models/net_clip_text_embedding.py``,
``models/neti_clip_text_encoder.py``, ``models/xti_attention_processor.py`` and
``training/coach.py`` (``Coach.get_text_conditioning``), imported from the checkout given with
``--ref``, never copied. Checked at commit 28edf306f9584b3b4f6dd6f37e603e70f445462b.

The official code targets diffusers 0.14 / transformers 4.2x and CUDA. Run-time shims, for the run
only (:func:`reference_shims`): ``.cuda()`` is a no-op (a ``Parameter``'s ``.cuda()`` returns a plain
tensor, as on a GPU, so their Fourier frequencies stay unregistered); ``CLIPTextTransformer`` —
which today's ``transformers`` folded into ``CLIPTextModel`` — is a bare ``nn.Module`` holding the
config and the causal mask builder, since their subclass builds its own embeddings, encoder and
final norm and has its own forward; their encoder call's ``causal_attention_mask`` is folded into
the additive mask today's ``CLIPEncoder`` takes (as in crossinit.py); ``diffusers.models.
cross_attention.CrossAttention`` is today's ``Attention`` and ``attn.cross_attention_norm`` reads
``attn.norm_cross is not None``. Their ``Coach`` needs pyrallis configs, loggers and validation, so
the script runs the body of ``Coach.train`` (a dozen lines: add noise, ``get_text_conditioning``,
UNet, MSE, AdamW) around their modules and their ``get_text_conditioning``; the hard-coded 16 layers
(``UNET_LAYERS``) are the tiny UNet's layers.

Compared:

1. the first layer's initial weight (their ``init_layer`` on the studio's frequencies vs the studio's
   anchor encodings);
2. the mapper's output ``M(t, ℓ)`` for every layer at several timesteps, full and truncated (their
   ``truncation_idx`` vs the studio's ``truncation``), with the same weights;
3. the per-layer text conditioning (keys: without bypass; values: with the bypass) for given
   prompts and timesteps — their ``get_text_conditioning`` through their text encoder vs the
   studio's ``NetiHook.layer_contexts``;
4. training, ``--steps`` steps on the studio's draws (latents, noise, timesteps, prompts): the UNet
   prediction, the loss, the gradients of every mapper tensor and the tensors after each step, and
   the per-layer conditioning with the trained mapper.

Nested dropout is off while training on both sides (its draws come from Python's ``random`` and the
global generator in theirs, from a seeded generator in the studio's); its math at inference is row 2.

Run (a few minutes on 2 shared CPU cores)::

    git clone https://github.com/NeuralTextualInversion/NeTI /tmp/NeTI
    python -m bench.parity.neti --ref /tmp/NeTI
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.parity.common import (
    StepRecorder,
    build_tiny_folder,
    compare,
    isolated_imports,
    legacy_library_shims,
    patched,
    print_table,
    record_studio_draws,
    ref_label,
    require_file,
    write_images,
)
from bench.parity.crossinit import _CompatEncoder

REPO = "github.com/NeuralTextualInversion/NeTI"
TOKEN = "<parity>"
# studio mapper tensor → the official NeTIMapper's (their input layer is also net.0, which shifts the rest by one;
# named_parameters lists it once, as input_layer)
NAMES = {"input_layer.weight": "input_layer.weight", "input_layer.bias": "input_layer.bias",
         "net.0.weight": "net.1.weight", "net.0.bias": "net.1.bias", "net.1.weight": "net.2.weight",
         "net.1.bias": "net.2.bias", "net.3.weight": "net.4.weight", "net.3.bias": "net.4.bias",
         "net.4.weight": "net.5.weight", "net.4.bias": "net.5.bias",
         "output_layer.weight": "output_layer.0.weight", "output_layer.bias": "output_layer.0.bias"}


@contextlib.contextmanager
def reference_shims() -> Any:
    """The run-time shims of the module docstring; everything is restored afterwards."""
    import diffusers.models
    import transformers.models.clip.modeling_clip as clip
    from diffusers.models.attention_processor import Attention

    def tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self * 1 if isinstance(self, nn.Parameter) else self  # a GPU copy of a Parameter is not one

    class CLIPTextTransformer(nn.Module):
        """What their subclass needs of the old class: the config and the causal mask."""

        def __init__(self, config: Any):
            super().__init__()
            self.config = config

        def _build_causal_attention_mask(self, bsz: int, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
            mask = torch.full((bsz, seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype).triu_(1)
            return mask.unsqueeze(1)  # (B, 1, S, S) additive

    cross = types.ModuleType("diffusers.models.cross_attention")
    cross.CrossAttention = Attention  # type: ignore[attr-defined]
    with contextlib.ExitStack() as stack:
        stack.enter_context(legacy_library_shims())
        stack.enter_context(patched(torch.Tensor, "cuda", tensor_cuda))
        stack.enter_context(patched(nn.Module, "cuda", lambda self, *a, **k: self))
        if not hasattr(clip, "CLIPTextTransformer"):
            stack.enter_context(patched(clip, "CLIPTextTransformer", CLIPTextTransformer))
        stack.enter_context(patched(sys.modules, "diffusers.models.cross_attention", cross))
        stack.enter_context(patched(diffusers.models, "cross_attention", cross))
        if not hasattr(Attention, "cross_attention_norm"):
            stack.enter_context(patched(Attention, "cross_attention_norm",
                                        property(lambda self: self.norm_cross is not None)))
        yield


def studio_side(folder: Path, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The studio's trainer: its mapper before training, then a run of its loop with draws and steps recorded."""
    from studio.models import load_base
    from trainers.loop import load_training_images, run_training
    from trainers.neti import NetiTrainConfig, NetiTrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = NetiTrainConfig(images=str(images), token=TOKEN, class_word="dog", steps=args.steps, lr=args.lr,
                          batch_size=args.batch, grad_accum=1, flip=False, seed=args.seed, weight_decay=1e-2,
                          nested_dropout=0.0, probe=False, budget="fixed", log_every=0)
    trainer = NetiTrainer(base, cfg, TOKEN)
    mapper = trainer.mapper
    init = {k: v.detach().clone() for k, v in mapper.state_dict().items()}
    names = [k for k, _ in mapper.named_parameters()]

    def select(opt: Any) -> torch.Tensor:
        params = dict(mapper.named_parameters())
        vec = torch.cat([params[k].detach().reshape(-1) for k in names]).clone()
        vec._parity_grad = torch.cat([params[k].grad.detach().reshape(-1) for k in names]).clone()  # type: ignore[attr-defined, union-attr]
        return vec

    # per-layer contexts with the initial mapper, for fixed prompts and timesteps (row 3)
    probe_prompts = [f"a photo of a {TOKEN}", f"a painting of {TOKEN} on a beach"]
    tok = base.pipe.tokenizer
    probe_ids = tok(probe_prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    probe_t = torch.tensor([37, 815])
    mapper.eval()
    with torch.no_grad():
        ctx0 = trainer.hook.layer_contexts(0, probe_ids, probe_t)
    mapper.train()
    examples = load_training_images(cfg, base)
    rec = StepRecorder(select=select)
    with rec.install(), record_studio_draws(trainer) as draws:
        result = run_training(base, trainer, cfg, method="neti", examples=examples, save=False)
    # the trained mapper, saved as a concept and applied for inference: per-layer contexts again
    from studio.methods.neti import mapper_from_concept
    from studio.methods.neti.hook import neti_hook
    from studio.methods.registry import get_method

    final = mapper_from_concept(result.concept).eval()
    applied = get_method("neti").apply(base, result.concept, strength=1.0)
    try:
        hook = neti_hook(base.pipe)
        assert hook is not None  # apply attached it
        ids_now = tok(probe_prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
        with torch.no_grad():
            ctx1 = hook.layer_contexts(0, ids_now, probe_t)
    finally:
        applied.remove()
    return {"init": init, "names": names, "rec": rec, "draws": draws, "losses": result.losses,
            "cfg": mapper.cfg, "mapper": mapper, "ctx0": ctx0, "ctx1": ctx1,
            "final": final, "probe": (probe_prompts, probe_t), "scheduler": base.pipe.scheduler}


def official_side(ref: Path, folder: Path, studio: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Their modules and ``get_text_conditioning`` with the studio's starting weights and draws."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTokenizer

    mcfg = studio["cfg"]
    n_layers = mcfg.n_layers
    rows: list[Any] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([ref]))
        stack.enter_context(reference_shims())
        import models.neti_clip_text_encoder as te_module

        stack.enter_context(patched(te_module, "CLIPEncoder", _CompatEncoder))
        # Coach's module imports its checkpointing, logging, validation and dataset helpers (pyrallis,
        # loguru, torchvision, wandb …); none of them is used by get_text_conditioning: empty stand-ins
        for name, attr in (("checkpoint_handler", "CheckpointHandler"), ("training.logger", "CoachLogger"),
                           ("training.validate", "ValidationHandler"), ("training.dataset", "TextualInversionDataset")):
            stub = types.ModuleType(name)
            setattr(stub, attr, None)
            stack.enter_context(patched(sys.modules, name, stub))
        import training.coach as coach
        from models.neti_mapper import NeTIMapper
        from models.xti_attention_processor import XTIAttenProc
        from utils.types import PESigmas

        layers = [f"L{i}" for i in range(n_layers)]  # their UNET_LAYERS names SD 1.5's 16; the tiny UNet has fewer
        stack.enter_context(patched(coach, "UNET_LAYERS", layers))
        tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
        tok.add_tokens(TOKEN)
        pid = tok.convert_tokens_to_ids(TOKEN)
        config = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder")
        te = te_module.NeTICLIPTextModel(config)
        state = load_file(str(folder / "text_encoder" / "model.safetensors"))  # text_model.* keys: their module
        missing, unexpected = te.load_state_dict(state, strict=False)
        # missing: the flattened copies today's CLIPTextModel builds beside their text_model (unused by their
        # forward) and their position_ids buffer (today's files do not store it; it is arange(77) either way)
        lost = [k for k in missing if k.startswith("text_model.") and not k.endswith("position_ids")]
        if unexpected or lost:
            raise SystemExit(f"their text encoder did not load: missing {lost[:3]}, unexpected {unexpected[:3]}")
        # Coach._add_concept_token_to_tokenizer: resize, the placeholder row = the super-category's, its norm
        te.text_model.embeddings.token_embedding = _resized(te.text_model.embeddings.token_embedding, len(tok))
        emb = te.text_model.embeddings.token_embedding.weight.data
        super_id = tok.encode("dog", add_special_tokens=False)[0]
        emb[pid] = emb[super_id].clone()
        target_norm = emb[super_id].norm().item()
        mapper = NeTIMapper(output_dim=config.hidden_size, unet_layers=layers, use_nested_dropout=True,
                            nested_dropout_prob=0.5, norm_scale=target_norm, use_positional_encoding=True,
                            num_pe_time_anchors=mcfg.time_anchors, pe_sigmas=PESigmas(mcfg.sigma_t, mcfg.sigma_l),
                            output_bypass=True)
        init = studio["init"]
        mapper.encoder.w = init["w"].clone()
        rows.append(compare("class-word norm (their target_norm vs the studio's class_norms)",
                            torch.tensor(mcfg.class_norms[0]), torch.tensor(target_norm), atol=0, rtol=1e-6))
        rows.append(compare("first layer's initial weight (their init_layer vs the studio's anchors)",
                            init["input_layer.weight"], mapper.encoder.init_layer(mcfg.time_anchors, n_layers),
                            atol=1e-6, rtol=1e-5))
        with torch.no_grad():
            theirs_params = dict(mapper.named_parameters())
            for k, v in init.items():
                if k != "w":
                    theirs_params[NAMES[k]].copy_(v)
        # 2. the mapper's output on a grid of (t, ℓ), full and truncated, eval mode
        t = torch.tensor([0.0, 37.0, 500.0, 999.0]).repeat_interleave(n_layers)
        ell = torch.arange(n_layers, dtype=torch.float32).repeat(4)
        studio_mapper = studio["final"]
        for trunc in (None, 8, 1):
            mapper.eval()
            with torch.no_grad():
                for k, v in studio_mapper.state_dict().items():
                    if k in NAMES:
                        theirs_params[NAMES[k]].copy_(v)
                theirs = mapper(t, ell, truncation_idx=trunc)
                ours = studio_mapper(t, ell, truncation=trunc)
            rows.append(compare(f"trained mapper M(t, ℓ), {len(t)} (t, ℓ) pairs, truncation {trunc}", ours, theirs,
                                atol=1e-6, rtol=1e-5))
        # back to the initial weights for training
        with torch.no_grad():
            for k, v in init.items():
                if k != "w":
                    theirs_params[NAMES[k]].copy_(v)
        te.text_model.embeddings.set_mapper(mapper)
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        # Coach._freeze_all_modules / _set_attn_processor
        unet.requires_grad_(False)
        te.requires_grad_(False)
        mapper.requires_grad_(True)
        unet.set_attn_processor(XTIAttenProc())
        owner = types.SimpleNamespace(placeholder_token_id=pid, text_encoder=te, weight_dtype=torch.float32)

        def conditioning(ids: torch.Tensor, ts: torch.Tensor) -> dict[str, Any]:
            return coach.Coach.get_text_conditioning(owner, input_ids=ids, timesteps=ts, device=torch.device("cpu"))

        probe_prompts, probe_t = studio["probe"]
        probe_ids = tok(probe_prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        mapper.eval()
        with torch.no_grad():
            ctx0 = conditioning(probe_ids, probe_t)
        rows += _ctx_rows("initial mapper", studio["ctx0"], ctx0, n_layers)
        # 4. training: the body of Coach.train on the studio's draws
        mapper.train()
        mapper.use_nested_dropout = False
        opt = torch.optim.AdamW(mapper.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        draws = studio["draws"]
        order = [NAMES[k] for k in studio["names"]]
        out: dict[str, list[Any]] = {"pred": [], "loss": [], "grad": [], "after": []}
        for lat, noise, ts, prompts in zip(draws.latents, draws.noise, draws.timesteps, draws.prompts):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            noisy = scheduler.add_noise(lat, noise, ts)
            hs = conditioning(ids, ts)
            pred = unet(noisy, ts, hs).sample
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(lat, noise, ts)
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            loss.backward()
            params = dict(mapper.named_parameters())
            out["pred"].append(pred.detach().clone())
            out["loss"].append(float(loss.detach()))
            out["grad"].append(torch.cat([params[k].grad.detach().reshape(-1) for k in order]).clone())
            opt.step()
            opt.zero_grad()
            out["after"].append(torch.cat([params[k].detach().reshape(-1) for k in order]).clone())
        mapper.eval()
        with torch.no_grad():
            ctx1 = conditioning(probe_ids, probe_t)
    return {"rows": rows, "ctx1": ctx1, **out}


def _resized(embedding: nn.Embedding, n: int) -> nn.Embedding:
    """``embedding`` with rows up to ``n`` (the new rows are overwritten by the caller, as in theirs)."""
    new = nn.Embedding(n, embedding.weight.shape[1])
    with torch.no_grad():
        new.weight[: embedding.weight.shape[0]] = embedding.weight
        new.weight[embedding.weight.shape[0]:] = 0
    return new


def _ctx_rows(label: str, ours: tuple[torch.Tensor, torch.Tensor], theirs: dict[str, Any], n: int) -> list[Any]:
    """Studio ``(keys, values)`` (L, Q, T, D) vs their ``CONTEXT_TENSOR_ℓ`` / ``CONTEXT_TENSOR_BYPASS_ℓ`` (Q, T, D)."""
    keys = torch.stack([theirs[f"CONTEXT_TENSOR_{i}"] for i in range(n)])
    values = torch.stack([theirs[f"CONTEXT_TENSOR_BYPASS_{i}"] for i in range(n)])
    return [compare(f"{label}: per-layer text conditioning for keys (no bypass), {n} layers", ours[0], keys,
                    atol=1e-6, rtol=1e-5),
            compare(f"{label}: per-layer text conditioning for values (with bypass)", ours[1], values,
                    atol=1e-6, rtol=1e-5)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help=f"root of a checkout of {REPO}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=8e-3, help="the official 1e-3 × batch 2 × accumulation 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    for rel in ("models/neti_mapper.py", "models/neti_clip_text_encoder.py", "training/coach.py"):
        require_file(args.ref, rel, REPO)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder("tiny", tmp / "base")
        images = write_images(tmp / "images", n=3, size=32)
        ours = studio_side(folder, images, args)
        theirs = official_side(args.ref.resolve(), folder, ours, args)
    n = ours["cfg"].n_layers
    rows = list(theirs["rows"])
    o = ours["rec"]
    for k in range(args.steps):
        s = f"step {k + 1}: "
        rows += [
            compare(s + "UNet prediction (per-layer conditioning)", o.unet[k]["pred"], theirs["pred"][k], atol=1e-6,
                    rtol=1e-5),
            compare(s + "loss", ours["losses"][k], theirs["loss"][k], atol=0, rtol=1e-5),
            compare(s + "gradient of the mapper (all tensors)", o.grads[k], theirs["grad"][k], atol=1e-9, rtol=1e-4),
            compare(s + "mapper after the step, all entries", o.after[k], theirs["after"][k], atol=1e-7, rtol=1e-5,
                    explained=True, note="Adam: entries with |g| ≲ ε amplify rounding"),
        ]
        # Adam's step is lr·m/(√v + ε) per entry: where 0 < |g| ≲ ε (1e-8) it is ≈ lr·g/ε, so float-rounding
        # differences of such gradients are amplified ~lr/ε; the entries whose gradient never fell in (0, 100·ε)
        # are checked (the same rule as diffusers_lora.py).
        g_abs = torch.stack([theirs["grad"][j].abs() for j in range(k + 1)])
        big = ~((g_abs > 0) & (g_abs < 1e-6)).any(0)
        rows.append(compare(s + f"mapper after the step, {int(big.sum())}/{big.numel()} entries whose |g| was never "
                            "in (0, 100ε)", o.after[k][big], theirs["after"][k][big], atol=1e-7, rtol=1e-5))
    init = torch.cat([ours["init"][k].reshape(-1) for k in ours["names"]])
    rows.append(compare(f"update after {args.steps} steps (mapper − init)", o.after[-1] - init,
                        theirs["after"][-1] - init, atol=1e-8, rtol=1e-3))
    rows += _ctx_rows("trained mapper (saved concept)", ours["ctx1"], theirs["ctx1"], n)
    title = (f"NeTI — studio vs {REPO}@{ref_label(args.ref, args.ref_commit)} — base tiny ({n} cross-attention "
             f"layers), {args.steps} steps, batch {args.batch}, lr {args.lr:g}, nested dropout off in training "
             f"({time.monotonic() - t0:.0f} s)")
    return 0 if print_table(title, rows) else 1


if __name__ == "__main__":
    sys.exit(main())
