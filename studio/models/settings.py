"""How to load a base: one dataclass the CLI flags, the UI, the job queue and Python share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from studio.configs import option
from studio.errors import StudioError
from studio.models.loading import BaseModel, load_base
from studio.models.profile import BaseProfile, profile_for_spec
from studio.request_paths import NAMED_BASES

GROUP = "base model"


@dataclass
class BaseSettings:
    """Which base to load and how (see :func:`studio.models.load_base`)."""

    base: str = option("demo", "hub id, diffusers folder, .safetensors checkpoint, demo, tiny, tiny-v, tiny-sdxl, "
                       "tiny-sd3 or tiny-flux",
                       group=GROUP, path="model", names=NAMED_BASES)
    device: str | None = option(None, "cuda, cuda:N, mps or cpu (default: best available)", group=GROUP)
    dtype: str | None = option(None, "weights dtype (default: fp16 on GPU, fp32 on CPU)",
                               choices=["fp32", "fp16", "bf16"], group=GROUP)
    attention: str = option("sdpa", "attention kernel", choices=["sdpa", "xformers"], group=GROUP)
    prediction_type: str | None = option(None, "override for single-file SD 2 checkpoints that do not say",
                                         choices=["epsilon", "v_prediction"], group=GROUP)
    offload: bool = option(False, "CUDA: offload idle components to the CPU", group=GROUP)
    t5: bool = option(True, "SD 3/3.5: load the T5 text encoder (--no-t5 saves about 9 GB; the CLIPs alone then "
                      "read the prompt); FLUX always needs it", group=GROUP)

    def load(self, device: str | None = None) -> BaseModel:
        """Load the base (``device`` overrides :attr:`device`, e.g. a worker's own GPU)."""
        return load_base(self.base, device=device or self.device, dtype=self.dtype, attention=self.attention,
                         prediction_type=self.prediction_type, offload=self.offload, t5=self.t5)

    def profile(self) -> BaseProfile:
        """The base's :class:`BaseProfile`, without loading it."""
        return profile_for_spec(self.base)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseSettings:
        """From a stored dict (a job record); unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise StudioError(f"Unknown base setting {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
