"""Parity of the studio's zero-shot / IP-Adapter image attention with tencent-ailab's IP-Adapter code.

Reference: github.com/tencent-ailab/IP-Adapter, ``ip_adapter/ip_adapter.py`` (``IPAdapter``,
``IPAdapterPlus``, ``IPAdapterFull``: ``set_ip_adapter``, ``init_proj``, ``load_ip_adapter``,
``set_scale``), ``ip_adapter/attention_processor.py`` (``IPAttnProcessor2_0``) and
``ip_adapter/resampler.py`` — imported from the checkout given with ``--ref``, never copied.
Checked at commit 62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2.

Inference only (no training). For each adapter kind — ``base`` (a linear projection of CLIP
``image_embeds`` to 4 tokens), ``plus`` (their Perceiver ``Resampler`` over penultimate hidden
states, 16 tokens) and ``full`` (their MLP over the 257 hidden states) — the script:

1. builds the official projection model with the official ``init_proj`` and the official
   ``IPAttnProcessor`` per cross-attention layer with ``set_ip_adapter`` on a tiny SD 1.x-like UNet,
   fills them with random weights, and saves them as an official checkpoint
   (``{"image_proj": …, "ip_adapter": ModuleList(unet.attn_processors.values()).state_dict()}``), the
   layout of the published files;
2. **official**: their ``load_ip_adapter`` reads the file into their modules, their ``set_scale``
   sets λ; image tokens = their projection of the embeddings (and of the negative embeddings for the
   unconditional rows), appended to the text states as their ``generate`` does; one UNet call on a
   classifier-free-guidance batch ``[uncond ; cond]``;
3. **studio**: the same file through the studio's reader (``read_adapter_state``,
   ``build_adapter``: diffusers' projection conversion, the studio's layer numbering) and
   ``studio.methods.zeroshot.install`` (the hook a zero-shot concept applies), the same UNet call
   under ``cfg_layout(guided=True)``.

Compared: the image tokens (cond and uncond) and the UNet output, at two scales, plus the plain UNet
output (λ = 0 / no adapter) as a control of how much the adapter changes the output.

The official classes build their modules in float16 (``.to(device, dtype=torch.float16)``); the
weights and embeddings are therefore drawn as float16-representable values, so loading them in
float16 loses nothing, and the modules are cast to float32 before running (on CPU, float16 matmuls
would only add rounding). ``get_image_embeds`` casts its input to float16 for the same reason, so the
projection model is called directly on the embeddings — that call is the whole of its math for
precomputed embeddings.

Run (well under a minute on a CPU)::

    git clone https://github.com/tencent-ailab/IP-Adapter /tmp/IP-Adapter
    python -m bench.parity.ip_adapter --ref /tmp/IP-Adapter
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

from bench.parity.common import compare, isolated_imports, print_table, ref_label, require_file

REPO = "github.com/tencent-ailab/IP-Adapter"
KINDS = {"base": ("IPAdapter", 4), "plus": ("IPAdapterPlus", 16), "full": ("IPAdapterFull", 257)}
EFFECTS: list[str] = []  # how much the adapter moves the output: context for the differences, not a check
EMBED_DIM = 48  # width of the (made-up) CLIP image features: projection_dim / hidden_size


def f16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest float16 value, kept in float32."""
    return t.half().float()


@contextlib.contextmanager
def reference_shims() -> Any:
    """For the run only: ``diffusers.pipelines.controlnet.MultiControlNetModel``, which their module imports
    (only to set ControlNet processors, unused here) and which today's diffusers keeps in
    ``diffusers.models``; and, when ``einops`` is not installed, stand-ins for the two names their
    ``resampler.py`` imports from it — used only by the mean-pooled latents (``num_latents_mean_pooled``
    > 0), which ``IPAdapterPlus`` does not use; the stand-ins raise if called."""
    import importlib.util

    import diffusers.pipelines.controlnet as cn
    from diffusers.models import MultiControlNetModel

    from bench.parity.common import patched

    def unused(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("einops is not installed: pip install einops")

    with contextlib.ExitStack() as stack:
        if not hasattr(cn, "MultiControlNetModel"):
            stack.enter_context(patched(cn, "MultiControlNetModel", MultiControlNetModel))
        if importlib.util.find_spec("einops") is None:
            einops = types.ModuleType("einops")
            einops.rearrange = unused  # type: ignore[attr-defined]
            layers = types.ModuleType("einops.layers")
            layers_torch = types.ModuleType("einops.layers.torch")
            layers_torch.Rearrange = unused  # type: ignore[attr-defined]
            for name, mod in (("einops", einops), ("einops.layers", layers), ("einops.layers.torch", layers_torch)):
                stack.enter_context(patched(sys.modules, name, mod))
        yield


def official_adapter(ref: Path, pipe: Any, kind: str, ckpt: Path | None, seed: int) -> Any:
    """An official ``IPAdapter``/``IPAdapterPlus``/``IPAdapterFull`` on ``pipe`` without its CLIP image encoder
    (the embeddings are given): ``set_ip_adapter`` + ``init_proj``, then either random weights saved to a new
    checkpoint (``ckpt`` None) or ``load_ip_adapter(ckpt)``. Modules cast to float32 afterwards."""
    import ip_adapter.ip_adapter as official

    cls_name, num_tokens = KINDS[kind]
    cls = getattr(official, cls_name)
    ipa = cls.__new__(cls)  # __init__ would load a CLIP image encoder from a path; the rest is theirs
    ipa.device, ipa.num_tokens, ipa.pipe = "cpu", num_tokens, pipe
    ipa.image_encoder = types.SimpleNamespace(config=types.SimpleNamespace(projection_dim=EMBED_DIM,
                                                                            hidden_size=EMBED_DIM))
    ipa.set_ip_adapter()
    ipa.image_proj_model = ipa.init_proj()
    if ckpt is None:
        g = torch.Generator().manual_seed(seed)
        mods = [ipa.image_proj_model, torch.nn.ModuleList(pipe.unet.attn_processors.values())]
        with torch.no_grad():
            for mod in mods:
                for name, p in mod.named_parameters():
                    scale = 0.5 if p.ndim == 1 else p.shape[-1] ** -0.5
                    base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                    p.copy_(f16(base + scale * torch.randn(p.shape, generator=g)))
    else:
        ipa.ip_ckpt = str(ckpt)
        ipa.load_ip_adapter()
    ipa.image_proj_model.float()
    for proc in pipe.unet.attn_processors.values():
        if isinstance(proc, torch.nn.Module):
            proc.float()
    return ipa


def save_official(ipa: Any, path: Path) -> Path:
    """The official checkpoint layout: ``{"image_proj": …, "ip_adapter": …}`` (what their training script saves)."""
    state = {"image_proj": {k: v.detach().half() for k, v in ipa.image_proj_model.state_dict().items()},
             "ip_adapter": {k: v.detach().half() for k, v in
                            torch.nn.ModuleList(ipa.pipe.unet.attn_processors.values()).state_dict().items()}}
    torch.save(state, path)
    return path


def embeddings(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) ``image_embeds`` for ``base``, (n, 257, D) hidden states otherwise; and the negative (1, …): zeros
    for ``base`` (as theirs: ``zeros_like``), another random reading for the others (theirs: the encoder's
    reading of a black image)."""
    g = torch.Generator().manual_seed(seed + 1)
    shape = (n, EMBED_DIM) if kind == "base" else (n, 257, EMBED_DIM)
    emb = f16(torch.randn(shape, generator=g))
    neg = torch.zeros(1, *shape[1:]) if kind == "base" else f16(torch.randn(1, *shape[1:], generator=g))
    return emb, neg


@torch.no_grad()
def run_kind(ref: Path, folder: Path, tmp: Path, kind: str, scales: list[float], seed: int) -> list[Any]:
    from diffusers import StableDiffusionPipeline

    from studio.methods.attention import remove_hook
    from studio.methods.attention.processor import cfg_layout
    from studio.methods.zeroshot import install
    from studio.methods.zeroshot.adapter import build_adapter, move, read_adapter_state
    from studio.models import load_base

    # the official side: random weights → an official checkpoint → their loader into fresh modules
    maker = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    ckpt = save_official(official_adapter(ref, maker, kind, None, seed), tmp / f"ip_adapter_{kind}.bin")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    ipa = official_adapter(ref, pipe, kind, ckpt, seed)

    g = torch.Generator().manual_seed(seed + 2)
    emb, neg = embeddings(kind, 1, seed)
    prompt = ["a photo of a dog"] * 2
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]  # (2, 77, D): [uncond ; cond] rows get the same text, the image differs
    cfg_in = pipe.unet.config.in_channels
    size = pipe.unet.config.sample_size
    noisy = torch.randn(2, cfg_in, size, size, generator=g)
    t = torch.tensor([500, 500])
    their_tok = ipa.image_proj_model(emb)  # (1, num_tokens, D)
    their_neg = ipa.image_proj_model(neg)

    base = load_base(str(folder), device="cpu", dtype="float32")
    adapter = move(build_adapter(base.pipe.unet, read_adapter_state(ckpt), what=f"official {kind} adapter"), "cpu",
                   torch.float32)
    our_tok = adapter.projection(emb)
    our_neg = adapter.projection(neg)
    rows = [compare(f"{kind}: image tokens (cond)", our_tok, their_tok, atol=1e-6, rtol=1e-5),
            compare(f"{kind}: image tokens (uncond)", our_neg, their_neg, atol=1e-6, rtol=1e-5)]
    plain = base.pipe.unet(noisy, t, text).sample
    for scale in scales:
        ipa.set_scale(scale)
        hidden = torch.cat([text, torch.cat([their_neg, their_tok])], dim=1)  # their generate(): text ++ image tokens
        theirs = pipe.unet(noisy, t, hidden).sample
        hook = install(base, adapter, emb, neg, key="parity", scale=scale)
        try:
            with cfg_layout(base.pipe.unet, guided=True):
                ours = base.pipe.unet(noisy, t, text).sample
        finally:
            hook.detach()
            remove_hook(base.pipe.unet, "parity")
        rows.append(compare(f"{kind}, λ = {scale:g}: UNet output [uncond ; cond] with image tokens", ours, theirs,
                            atol=1e-6, rtol=1e-5))
        EFFECTS.append(f"{kind}, λ = {scale:g}: the adapter changes the UNet output by up to "
                       f"{float((theirs - plain).abs().max()):.3e} (max |with − without|, official side)")
    after = base.pipe.unet(noisy, t, text).sample
    rows.append(compare(f"{kind}: plain UNet after removing the concept = before", after, plain, atol=0, rtol=0))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help=f"root of a checkout of {REPO}")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    require_file(args.ref, "ip_adapter/ip_adapter.py", REPO)
    require_file(args.ref, "ip_adapter/attention_processor.py", REPO)
    t0 = time.monotonic()
    from bench.parity.common import build_tiny_folder

    rows: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        folder = build_tiny_folder("tiny", tmp / "base")
        stack.enter_context(isolated_imports([args.ref.resolve()]))
        stack.enter_context(reference_shims())
        for kind in args.kinds:
            rows += run_kind(args.ref.resolve(), folder, tmp, kind, args.scales, args.seed)
    commit = ref_label(args.ref, args.ref_commit)
    title = (f"IP-Adapter (zero-shot concepts) — studio vs {REPO}@{commit} — base tiny, kinds "
             f"{', '.join(args.kinds)}, CFG batch of 2 ({time.monotonic() - t0:.0f} s)")
    ok = print_table(title, rows)
    print("\n" + "\n".join(EFFECTS))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
