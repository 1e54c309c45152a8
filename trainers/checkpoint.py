"""Training checkpoints: everything needed for a bit-identical resume, in safetensors.

``<checkpoint_dir>/step-000100/state.safetensors`` holds the trainable tensors (``param.*``), the
optimizer state (``optim.*``; its hyper-parameters as JSON metadata) and the training random
generator's state (``rng``); metadata also records the step and a hash of the training config so a
resume with a different config is refused. Folders are written under a temporary name and renamed,
so a crash never leaves a half-written checkpoint; the newest ``keep`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from studio.errors import TrainingError

STATE = "state.safetensors"


def data_digest(examples: list[Any]) -> str:
    """Hash of the prepared training data (pixels, masks, captions) — not of where the folder is,
    so a job folder or library that moved still resumes, and edited images are refused."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.pixels.numpy().tobytes())
        if ex.mask is not None:
            h.update(ex.mask.numpy().tobytes())
        h.update((ex.caption or "").encode())
    return h.hexdigest()[:16]


def config_hash(cfg: dict[str, Any]) -> str:
    """Hash of the settings that change the result (not where files go or how often to log; the
    images are covered by :func:`data_digest`)."""
    ignore = {"images", "out", "name", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "preview_every",
              "preview_prompt", "log_every", "steps", "eval_every", "eval_model", "eval_prompts", "eval_images", "eval_steps",
              "keep_best"}
    stable = {k: v for k, v in sorted(cfg.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: torch.Generator, meta: dict[str, Any], keep: int = 3) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"param.{k}": v.detach().to("cpu").contiguous() for k, v in params.items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().to("cpu").contiguous()
    tensors["rng"] = rng.get_state()
    md = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]), "meta": json.dumps(meta, default=str)}
    try:
        save_file(tensors, str(tmp / STATE), metadata=md)
        with open(tmp / STATE, "rb") as f:
            os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"Could not write the checkpoint {target} ({err.strerror}); "
                            "free disk space and resume from the previous checkpoint.") from err
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / STATE).is_file())


def resolve_resume(spec: str, folder: Path) -> Path | None:
    """``latest`` → the newest checkpoint in ``folder`` (None if there is none); else a path."""
    if spec == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(spec).expanduser()
    if path.is_dir() and (path / STATE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise TrainingError(f"--resume {spec}: no checkpoint there (expected a step-NNNNNN folder with {STATE}, "
                        "a checkpoint folder, or 'latest').")


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: torch.Generator) -> tuple[int, dict[str, Any]]:
    """Restore ``params`` in place, the optimizer and the generator; return (step, meta)."""
    from safetensors import safe_open

    with safe_open(str(path / STATE), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:
        raise TrainingError(f"Checkpoint {path} does not match this training (missing {missing}).")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"].to(p.device, p.dtype))
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
    rng.set_state(tensors["rng"])
    return int(md["step"]), json.loads(md.get("meta", "{}"))
