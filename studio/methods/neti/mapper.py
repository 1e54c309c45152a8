"""The NeTI mapper ``M(t, ℓ) → (token, bypass)`` (Alaluf et al. 2023, §4; docs/methods.md §5).

Pipeline of one query ``(t, ℓ)`` (raw denoising timestep ``t`` in ``[0, T)``, cross-attention
layer index ``ℓ`` in execution order):

1. random Fourier features ``pe = normalize([sin(w·[t, ℓ]); cos(w·[t, ℓ])])``, ``w ∈ R^{F×2}`` with
   ``w[:, 0] ~ N(0, σ_t²)``, ``w[:, 1] ~ N(0, σ_ℓ²)`` — ``w`` is a **buffer** saved with the weights
   (the reference code forgets it and pickles the encoder instead);
2. ``Linear(2F → A·L)`` whose rows start as the encodings of the ``A·L`` anchors
   ``{0, T/A, …} × {0 … L−1}`` (so its output starts as the similarity to each anchor);
3. ``Linear → LayerNorm → LeakyReLU`` twice to an ``H``-d hidden ``h`` (H = 128);
4. **nested dropout** while training: with probability ``p`` per batch, each row keeps only
   ``h[:k]`` for a random ``k`` — so the leading dimensions carry the coarse concept and
   ``truncation = k`` at inference trades fidelity for editability;
5. ``Linear(H → 2·ΣD_e)``; each encoder's chunk ``[token_e; bypass_e]`` (``2·D_e``) is L2-normalised
   and scaled to the norm of the class word's input embedding in that encoder.

For SD 1.x/2.x there is one encoder (``D = 768`` or ``1024``) and this is the paper's mapper
(output 1536 at 768-d). For SDXL there are two (CLIP-L 768, bigG 1280): one mapper with one
``(token, bypass)`` pair per encoder, output ``2·(768 + 1280) = 4096``, over SDXL's 70 layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import ConceptFormatError

FORMAT = 1  # version of the mapper config / tensor layout


@dataclass(frozen=True)
class MapperConfig:
    """Everything that shapes a mapper; saved as JSON in the concept's ``neti.config`` metadata."""

    widths: tuple[int, ...]  # text-encoder widths D_e, one per encoder (the output is 2·ΣD_e)
    layers: tuple[str, ...]  # the UNet's cross-attention layers in execution order (ℓ = index)
    class_norms: tuple[float, ...]  # ‖E(class word)‖ per encoder: each output chunk's norm
    hidden: int = 128  # H: the width nested dropout / truncation act on
    n_fourier: int = 1024  # F random frequencies (2F = 2048 features)
    sigma_t: float = 0.03  # std of the time frequencies (t is raw, 0…999)
    sigma_l: float = 2.0  # std of the layer frequencies (ℓ is an integer index)
    time_anchors: int = 10  # A anchors in time; with L layers the first layer has A·L rows
    num_train_timesteps: int = 1000  # T: anchors at 0, T/A, 2T/A …
    nested_dropout: float = 0.5  # p: probability per batch of truncating h at a random k
    bypass: bool = True  # default for the textual bypass at inference (a user may switch it off)
    bypass_scale: float = 0.2  # h' = h + scale · (b/‖b‖) · ‖h‖
    format: int = FORMAT

    def __post_init__(self) -> None:
        problems = []
        if not self.widths or any(int(w) < 1 for w in self.widths):
            problems.append(f"widths {self.widths}")
        if len(self.class_norms) != len(self.widths) or not all(
                math.isfinite(n) and n > 0 for n in self.class_norms):
            problems.append(f"class_norms {self.class_norms} for widths {self.widths}")
        if not self.layers:
            problems.append("no layers")
        if self.hidden < 1 or self.n_fourier < 1 or self.time_anchors < 1 or self.num_train_timesteps < self.time_anchors:
            problems.append(f"hidden {self.hidden}, n_fourier {self.n_fourier}, time_anchors {self.time_anchors}, "
                            f"num_train_timesteps {self.num_train_timesteps}")
        if not 0 <= self.nested_dropout <= 1:
            problems.append(f"nested_dropout {self.nested_dropout}")
        if not (math.isfinite(self.bypass_scale) and self.bypass_scale >= 0):
            problems.append(f"bypass_scale {self.bypass_scale}")
        if self.format > FORMAT:
            problems.append(f"format {self.format} (this studio reads up to {FORMAT})")
        if problems:
            raise ConceptFormatError(f"Invalid NeTI mapper config: {'; '.join(problems)}.")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def out_dim(self) -> int:
        return 2 * sum(self.widths)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> MapperConfig:
        """Parse ``neti.config``; unknown keys (from a newer studio) are dropped with a warning."""
        from studio.safetensors_io import loads_json

        data = loads_json(raw, where="The NeTI concept's neti.config metadata")  # depth-limited, no lone surrogates
        if not isinstance(data, dict):
            raise ConceptFormatError("The NeTI concept's neti.config metadata is not a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"neti.config: ignoring unknown keys {unknown}", stacklevel=2)
        missing = [k for k in ("widths", "layers", "class_norms") if k not in data]
        if missing:
            raise ConceptFormatError(f"The NeTI concept's neti.config lacks {missing}.")
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}

        def is_int(x: Any) -> bool:
            return type(x) is int

        def is_num(x: Any) -> bool:
            return type(x) in (int, float) and math.isfinite(x)

        kinds = {"widths": lambda v: isinstance(v, list) and all(map(is_int, v)),
                 "layers": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                 "class_norms": lambda v: isinstance(v, list) and all(map(is_num, v)),
                 "bypass": lambda v: type(v) is bool,
                 **dict.fromkeys(("hidden", "n_fourier", "time_anchors", "num_train_timesteps", "format"), is_int),
                 **dict.fromkeys(("sigma_t", "sigma_l", "nested_dropout", "bypass_scale"), is_num)}
        wrong = sorted(k for k, ok in kinds.items() if k in values and not ok(values[k]))
        if wrong:
            raise ConceptFormatError(f"The NeTI concept's neti.config is malformed: {', '.join(wrong)} "
                                     "have the wrong type.")
        try:
            values["widths"] = tuple(values["widths"])
            values["layers"] = tuple(values["layers"])
            values["class_norms"] = tuple(float(n) for n in values["class_norms"])
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ConceptFormatError(f"The NeTI concept's neti.config is malformed: {err}.") from None

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every entry of :meth:`NetiMapper.state_dict` (for validating files)."""
        h, a, f, o = self.hidden, self.time_anchors * self.n_layers, 2 * self.n_fourier, self.out_dim
        return {
            "w": (self.n_fourier, 2),
            "input_layer.weight": (a, f), "input_layer.bias": (a,),
            "net.0.weight": (h, a), "net.0.bias": (h,), "net.1.weight": (h,), "net.1.bias": (h,),
            "net.3.weight": (h, h), "net.3.bias": (h,), "net.4.weight": (h,), "net.4.bias": (h,),
            "output_layer.weight": (o, h), "output_layer.bias": (o,),
        }


class NetiMapper(nn.Module):
    """``M(t, ℓ)``: ``forward(t: (N,), layer: (N,)) -> (N, 2·ΣD_e)`` float32 (see the module doc).

    Weights are drawn from ``generator`` (the global RNG is left untouched); the mapper always
    computes in float32, also under autocast (``sin(w·t)`` with ``t`` up to 999 needs it).
    """

    w: torch.Tensor  # (F, 2) buffer: the Fourier frequencies

    def __init__(self, cfg: MapperConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        h, n_anchor = cfg.hidden, cfg.time_anchors * cfg.n_layers
        scale = torch.tensor([cfg.sigma_t, cfg.sigma_l])
        self.register_buffer("w", torch.randn(cfg.n_fourier, 2, generator=g) * scale)  # (F, 2)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not advance the global RNG
            self.input_layer = nn.Linear(2 * cfg.n_fourier, n_anchor)
            self.net = nn.Sequential(nn.Linear(n_anchor, h), nn.LayerNorm(h), nn.LeakyReLU(),
                                     nn.Linear(h, h), nn.LayerNorm(h), nn.LeakyReLU())
            self.output_layer = nn.Linear(h, cfg.out_dim)
        for lin in (self.input_layer, cast(nn.Linear, self.net[0]), cast(nn.Linear, self.net[3]), self.output_layer):
            _reset_linear(lin, g)
        with torch.no_grad():
            self.input_layer.weight.copy_(self.anchor_encodings())

    # -- 1. positional encoding ----------------------------------------------------------------
    def encode(self, t: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """``pe(t, ℓ)`` (N, 2F), unit L2 norm, float32. ``t``, ``layer``: (N,) (any numeric dtype)."""
        x = torch.stack([t.float(), layer.float()], dim=-1).to(self.w.device)  # (N, 2)
        proj = x @ self.w.float().T  # (N, F)
        return F.normalize(torch.cat([proj.sin(), proj.cos()], dim=-1), dim=-1)

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``A·L`` anchors ``(t, ℓ)``, time-major: t ∈ {0, T/A, …}, ℓ ∈ {0 … L−1}; each (A·L,)."""
        cfg = self.cfg
        step = cfg.num_train_timesteps // cfg.time_anchors
        ts = torch.arange(cfg.time_anchors, dtype=torch.float32) * step
        ls = torch.arange(cfg.n_layers, dtype=torch.float32)
        return ts.repeat_interleave(cfg.n_layers), ls.repeat(cfg.time_anchors)

    def anchor_encodings(self) -> torch.Tensor:
        """(A·L, 2F): the initial weight of the first layer."""
        t, layer = self.anchors()
        return self.encode(t, layer)

    # -- 2.–5. the network -----------------------------------------------------------------------
    def hidden(self, t: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """The ``H``-d representation ``h`` (N, H) before nested dropout."""
        return self.net(self.input_layer(self.encode(t, layer)))

    def forward(self, t: torch.Tensor, layer: torch.Tensor, *, truncation: int | None = None,
                dropout: torch.Generator | None = None) -> torch.Tensor:
        """(N, 2·ΣD_e), float32: per encoder ``[token_e; bypass_e]`` scaled to ``class_norms[e]``.

        ``truncation``: keep ``h[:truncation]`` (inference). ``dropout``: a CPU generator — with
        probability ``p`` for this batch, each row keeps ``h[:k]`` for ``k ~ U{0 … H−1}`` (training;
        never applied without a generator, so evaluation inside a training run is deterministic).
        """
        with torch.autocast(device_type=self.w.device.type, enabled=False):
            h = self.hidden(t, layer)  # (N, H)
            keep = torch.arange(h.shape[-1], device=h.device)
            if dropout is not None and self.cfg.nested_dropout > 0:
                if float(torch.rand((), generator=dropout)) < self.cfg.nested_dropout:
                    k = torch.randint(0, h.shape[-1], (h.shape[0],), generator=dropout).to(h.device)
                    h = h * (keep[None, :] < k[:, None]).to(h.dtype)
            if truncation is not None:
                h = h * (keep < truncation).to(h.dtype)
            out = self.output_layer(h)  # (N, 2·ΣD)
            chunks = out.split([2 * w for w in self.cfg.widths], dim=-1)
            return torch.cat([F.normalize(c, dim=-1) * n for c, n in zip(chunks, self.cfg.class_norms)], dim=-1)

    def split(self, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per encoder ``(token (N, D_e), bypass (N, D_e))`` views of a :meth:`forward` output."""
        parts, start = [], 0
        for w in self.cfg.widths:
            parts.append((out[..., start:start + w], out[..., start + w:start + 2 * w]))
            start += 2 * w
        return parts

    def static_tokens(self, truncation: int | None = None) -> list[torch.Tensor]:
        """Per encoder, the mean token over the anchors, (D_e,) — the placeholder's one fixed input
        row where a single vector is needed (SDXL's pooled embedding, negative prompts)."""
        t, layer = self.anchors()
        out = self(t.to(self.w.device), layer.to(self.w.device), truncation=truncation)
        return [tok.mean(0) for tok, _ in self.split(out)]


def truncation_for(strength: float, hidden: int) -> int | None:
    """The truncation index for a user strength (``None`` = all ``hidden`` dims).

    Geometric: ``k = round(H^s)`` for ``0 < s < 1`` (``s = 0.5`` → 11 of 128, ``0.25`` → 3), ``H``
    for ``s ≥ 1``; strength 0 is handled by the method (the concept is off). Nested dropout makes
    the leading dimensions the most informative, so equal strength steps halve/double the kept
    dimensions like the paper's truncation sweeps (2, 4, 8 … 128). Monotonic in ``s``.
    """
    if strength >= 1:
        return None
    return max(1, min(hidden, round(hidden ** max(strength, 0.0))))


def _reset_linear(lin: nn.Linear, g: torch.Generator) -> None:
    """``nn.Linear``'s default initialisation, drawn from ``g``."""
    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
    bound = 1 / math.sqrt(lin.in_features) if lin.in_features > 0 else 0
    nn.init.uniform_(lin.bias, -bound, bound, generator=g)
