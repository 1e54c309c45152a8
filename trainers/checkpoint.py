"""Training checkpoints: everything needed for a bit-identical resume, in safetensors.

``<checkpoint_dir>/step-000100/state.safetensors`` holds the trainable tensors (``param.*``), the
optimizer state (``optim.*``; its hyper-parameters as JSON metadata) and the training random
generator's state (``rng``); metadata also records the step and a hash of the training config so a
resume with a different config is refused. Folders are written under a temporary name and renamed,
so a crash never leaves a half-written checkpoint; the newest ``keep`` are kept.

**Integrity.** Metadata ``checksum`` is ``sha256:<hex>`` of every tensor (name, dtype, shape, bytes,
in name order) and every other metadata entry, so one flipped byte anywhere in the file is caught.
Reading goes through the studio's validating safetensors reader (:mod:`studio.safetensors_io`:
header, offsets, dtypes before allocation) and refuses non-finite values; a checkpoint with NaN/inf
is never written either. ``resume latest`` takes the newest checkpoint that passes all of this and
says which newer ones it skipped and why; :func:`last_good_checkpoint` is what a stopped run names.
Checkpoints without a checksum (written before it existed) are refused: they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from studio import safetensors_io as sio
from studio.errors import TrainingError

STATE = "state.safetensors"
CHECKSUM = "checksum"
# Any dtype an optimizer keeps (8-bit Adam: uint8 states; generator state: uint8), no fp8 / complex;
# the byte cap only guards against a header that claims more than a real fine-tune's checkpoint
# (SDXL UNet + AdamW in fp32: ~31 GB) — offsets must lie within the file anyway.
LIMITS = sio.Limits(dtypes=frozenset({"F16", "BF16", "F32", "F64", "U8", "I8", "I16", "I32", "I64"}),
                    max_bytes=256 * sio.GIB)
_STEP_DIR = re.compile(r"step-([0-9]+)")


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


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``sha256:<hex>`` of the tensors (name, dtype, shape and bytes, in name order) and of every
    metadata entry but the checksum itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            # ignore: numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (mypy checks 3.11)
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    h.update(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: torch.Generator, meta: dict[str, Any], keep: int = 3) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    tensors = {f"param.{k}": v.detach().to("cpu").contiguous() for k, v in params.items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().to("cpu").contiguous()
    tensors["rng"] = rng.get_state()
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # never leave a checkpoint a resume would refuse (or that a stopped run would name as good)
        raise TrainingError(f"Not writing checkpoint {target}: {', '.join(bad[:3])} hold NaN or infinite values.")
    md = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]), "meta": json.dumps(meta, default=str)}
    md[CHECKSUM] = checksum(tensors, md)
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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


def _step_of(path: Path) -> int:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders (``step-NNNNNN`` holding a state file), oldest first (by step number)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if _step_of(p) >= 0 and (p / STATE).is_file()),
                  key=lambda p: (_step_of(p), p.name))


@dataclass
class Checkpoint:
    """A checkpoint read and verified by :func:`read_checkpoint` (nothing applied yet)."""

    path: Path
    step: int
    params: dict[str, torch.Tensor]  # without the "param." prefix
    optim_state: dict[int, dict[str, torch.Tensor]]
    param_groups: list[dict[str, Any]]
    rng: torch.Tensor
    meta: dict[str, Any]


def read_checkpoint(path: Path) -> Checkpoint:
    """Read ``path/state.safetensors`` through the validating reader, verify its checksum, finite
    values and structure. Raises :class:`TrainingError` (one line: the file and what is wrong)."""
    file = Path(path) / STATE
    where = sio.label(file)
    header = sio.read_header(file, error=TrainingError, limits=LIMITS)
    md = header.metadata
    missing = [k for k in ("step", "param_groups", CHECKSUM) if k not in md]
    if "rng" not in header.entries:
        missing.append("the rng tensor")
    if missing:
        hint = " (written before checkpoints carried a checksum?)" if missing == [CHECKSUM] else ""
        raise TrainingError(f"Checkpoint {where} is incomplete: it lacks {', '.join(missing)}{hint}; resume from "
                            "another checkpoint or start over without --resume.")
    tensors = sio.read_tensors(header, file, error=TrainingError)  # refuses NaN / inf
    if checksum(tensors, md) != md[CHECKSUM]:
        raise TrainingError(f"Checkpoint {where} is corrupt: its checksum does not match its contents.")
    # The checksum matched, so what follows checks what save_checkpoint wrote, not random bytes.
    if not re.fullmatch(r"[0-9]{1,12}", md["step"]) or (_step_of(Path(path)) >= 0 and
                                                       int(md["step"]) != _step_of(Path(path))):
        raise TrainingError(f"Checkpoint {where}: metadata step {sio.q(md['step'])} does not match its folder.")
    groups = sio.loads_json(md["param_groups"], where=f"Checkpoint {where}: metadata param_groups", error=TrainingError)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise TrainingError(f"Checkpoint {where}: metadata param_groups is not a list of optimizer groups.")
    meta = sio.loads_json(md.get("meta") or "{}", where=f"Checkpoint {where}: metadata meta", error=TrainingError)
    if not isinstance(meta, dict):
        raise TrainingError(f"Checkpoint {where}: metadata meta is not a JSON object.")
    rng = tensors.pop("rng")
    if rng.dtype != torch.uint8 or rng.ndim != 1:
        raise TrainingError(f"Checkpoint {where}: the rng state is {rng.dtype} {tuple(rng.shape)}, not a uint8 vector.")
    params: dict[str, torch.Tensor] = {}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"optim\.([0-9]{1,9})\.(.+)", k, re.DOTALL)
        if k.startswith("param."):
            params[k[len("param."):]] = v
        elif m:
            optim.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            raise TrainingError(f"Checkpoint {where} holds an unexpected tensor {sio.q(k)}.")
    return Checkpoint(Path(path), int(md["step"]), params, optim, groups, rng, meta)


def apply_checkpoint(ckpt: Checkpoint, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     rng: torch.Generator) -> tuple[int, dict[str, Any]]:
    """Restore ``params`` in place, the optimizer and the generator from a verified checkpoint;
    return (step, meta). Nothing is changed unless everything fits."""
    where = sio.label(ckpt.path)
    missing = [k for k in params if k not in ckpt.params]
    if missing:
        raise TrainingError(f"Checkpoint {where} does not match this training (missing {missing}).")
    wrong = [k for k, p in params.items() if tuple(ckpt.params[k].shape) != tuple(p.shape)]
    if wrong:
        raise TrainingError(f"Checkpoint {where} does not match this training (shapes of {wrong} differ).")
    saved_opt = optimizer.state_dict()
    saved_rng = rng.get_state()
    try:
        optimizer.load_state_dict({"state": ckpt.optim_state, "param_groups": ckpt.param_groups})
        rng.set_state(ckpt.rng)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        optimizer.load_state_dict(saved_opt)
        rng.set_state(saved_rng)
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise TrainingError(f"Checkpoint {where} does not fit this training's optimizer or generator "
                            f"({sio.one_line(detail)}).") from None
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ckpt.params[k].to(p.device, p.dtype))
    return ckpt.step, ckpt.meta


# One verified checkpoint handed from resolve_resume to the load_checkpoint that follows it, so a
# resume reads the file once (keyed by the file's identity: any change means a fresh read).
_VERIFIED: dict[tuple[str, int, int, int], Checkpoint] = {}


def _identity(path: Path) -> tuple[str, int, int, int] | None:
    try:
        st = (Path(path) / STATE).stat()
    except OSError:
        return None
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _verify(path: Path) -> Checkpoint:
    ckpt = read_checkpoint(path)
    key = _identity(path)
    _VERIFIED.clear()
    if key is not None:
        _VERIFIED[key] = ckpt
    return ckpt


def last_good_checkpoint(folder: Path | None, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint in ``folder`` that reads back intact and finite (None if none);
    ``log`` receives one line per newer checkpoint skipped, saying why."""
    if folder is None:
        return None
    for path in reversed(list_checkpoints(folder)):
        try:
            read_checkpoint(path)
        except TrainingError as err:
            if log:
                log(f"skipping checkpoint {path.name}: {err}")
            continue
        return path
    return None


def resolve_resume(spec: str, folder: Path | None, log: Callable[[str], None] | None = None) -> Path | None:
    """``latest`` → the newest *good* checkpoint in ``folder`` (None if there is none at all);
    newer ones that fail verification are skipped and reported through ``log`` ("falling back …").
    If every checkpoint there is bad, :class:`TrainingError` lists why. Else ``spec`` is a path."""
    if spec == "latest":
        found = list_checkpoints(folder) if folder is not None else []
        problems = []
        for path in reversed(found):
            try:
                _verify(path)
            except TrainingError as err:
                problems.append(f"{path.name}: {err}")
                continue
            if problems and log:
                log(f"checkpoint(s) refused — {' | '.join(problems)}; falling back to the previous good one, {path}")
            return path
        if found:
            assert folder is not None  # found lists its checkpoints
            raise TrainingError(f"No usable checkpoint in {sio.label(folder)} ({' | '.join(problems)}); remove that "
                                "folder to start over, or resume from another copy.")
        return None
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
    """Verify the checkpoint at ``path`` (:func:`read_checkpoint`), then restore ``params`` in place,
    the optimizer and the generator; return (step, meta). A corrupt, incomplete or non-finite
    checkpoint raises :class:`TrainingError` and changes nothing."""
    key = _identity(path)
    ckpt = _VERIFIED.pop(key, None) if key is not None else None
    _VERIFIED.clear()
    if ckpt is None:
        ckpt = read_checkpoint(path)
    return apply_checkpoint(ckpt, params, optimizer, rng)
