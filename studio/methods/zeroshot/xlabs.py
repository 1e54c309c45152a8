"""The XLabs FLUX IP-Adapter file layout (docs/methods.md §6, "FLUX.1") — the names alone, read into and
written from the studio's ``{"image_proj": …, "ip_adapter": …}`` form.

XLabs' names (what diffusers' ``FluxIPAdapterMixin.load_ip_adapter`` reads from a ``.safetensors``)::

    ip_adapter_proj_model.proj.{weight,bias}    Linear(D_e → T·D_t)      the image projection
    ip_adapter_proj_model.norm.{weight,bias}    LayerNorm(D_t)
    double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}
                                                Linear(D_t → inner)      W'_k, W'_v of double-stream block i

become ``image_proj.{proj,norm}.*`` and ``ip_adapter.{i}.to_{k,v}_ip.{weight,bias}`` (diffusers' own
renaming). The biases tell a FLUX adapter from a UNet one, whose ``to_k_ip`` never have one.
"""

from __future__ import annotations

import re

import torch

from studio.errors import StudioError

PROJ_PREFIX = "ip_adapter_proj_model."
BLOCK_PREFIX = "double_blocks."
_BLOCK_KEY = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")


def is_xlabs_key(key: str) -> bool:
    """A tensor name of the XLabs FLUX IP-Adapter layout."""
    return key.startswith(PROJ_PREFIX) or (key.startswith(BLOCK_PREFIX) and ".ip_adapter_double_stream_" in key)


def from_xlabs(flat: dict[str, torch.Tensor], what: str = "the adapter") -> dict[str, dict[str, torch.Tensor]]:
    """XLabs names → ``{"image_proj": {"proj.weight", …}, "ip_adapter": {"{i}.to_{k,v}_ip.{weight,bias}", …}}``
    (the names diffusers' FLUX loader gives them). Tensors of neither part are ignored, as there; a
    misspelt ``ip_adapter_double_stream_*`` name is an error."""
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        if key.startswith(PROJ_PREFIX):
            state["image_proj"][key[len(PROJ_PREFIX):]] = value
        elif is_xlabs_key(key):  # other double_blocks.* tensors are ignored, as diffusers ignores them
            m = _BLOCK_KEY.fullmatch(key)
            if m is None:
                raise StudioError(f"{what} holds {key!r}, which is no FLUX IP-Adapter weight (double_blocks.N.processor."
                                  "ip_adapter_double_stream_{k,v}_proj.{weight,bias}).")
            state["ip_adapter"][f"{int(m[1])}.to_{m[2]}_ip.{m[3]}"] = value
    return state


def to_xlabs(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_xlabs`: the flat XLabs names."""
    flat = {PROJ_PREFIX + k: v for k, v in state["image_proj"].items()}
    for key, value in state["ip_adapter"].items():
        i, which, part = key.split(".")
        kv = {"to_k_ip": "k", "to_v_ip": "v"}[which]
        flat[f"{BLOCK_PREFIX}{i}.processor.ip_adapter_double_stream_{kv}_proj.{part}"] = value
    return flat


def is_flux_state(state: dict[str, dict[str, torch.Tensor]]) -> bool:
    """True for a FLUX IP-Adapter: its ``to_k_ip`` carry biases (a UNet adapter's never do)."""
    return any(k.endswith(".to_k_ip.bias") for k in state.get("ip_adapter", {}))
