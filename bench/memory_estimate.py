"""The memory estimate (``trainers.memory``) against measured peaks, and the README's GPU table.

**Check** (default): each case trains for real, on CPU, in a fresh process of its own, and its
peak resident memory is compared with the estimate. On CPU every tensor lives in RAM, so the
estimate's "device memory" is the process's RSS: the check compares

* ``delta``: the RSS growth while training (peak − the RSS of the process once imports are done,
  the base is built and one small no-gradient pass has run) with ``estimate.training_bytes`` (the
  estimate less the frozen weights and the process baseline) — on the tiny base the interpreter
  and libraries (~0.47 GiB) dwarf everything else, so only this part says anything;
* ``total``: the peak RSS with ``estimate.total`` (weights + training + the calibrated process baseline).

The peak is Linux's ``VmHWM`` of the child, reset after the baseline (``/proc/self/clear_refs``);
``ru_maxrss`` otherwise. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands
freed tensors back to the system, as a device allocator's count would: with its default dynamic
threshold, freed blocks may stay in its heap and RSS then follows the allocator's history, not the
live tensors (``--default-malloc`` runs the children without it). Rows of the cases are interleaved over ``--repeats``.
``no_conv_ratio`` is the growth ratio without the one calibrated term of the trace (oneDNN's copy of
each convolution's weight on CPU).

**Table** (``--table``): the estimate for SD 1.5 and SDXL (meta-device models from the shipped
configs of the published architectures: no weights, no GPU needed) at 512 and 1024 px, batch 1,
for each method on CUDA with the studio's defaults (fp16 weights; the full fine-tune in fp32 with
fp16 autocast, as it requires), and for 12 / 24 GiB GPUs whether it fits and what to turn on.

    python bench/memory_estimate.py                     # tiny + SD-1.5-sized checks (~20 min on 2 shared cores)
    python bench/memory_estimate.py --bases tiny        # quicker (~3 min)
    python bench/memory_estimate.py --table             # the README table (~8 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
GIB = 2**30
# (name, trainer, base, overrides): the measured cases. The probe stays on where it is cheap (tiny).
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    # The tiny base's VAE halves the size once (96 px → a 48 × 48 latent), SD 1.5's three times.
    ("TI tiny 96px b4", "textual-inversion", "tiny", dict(resolution=96, batch_size=4)),
    ("DB-LoRA tiny 96px b2", "dreambooth", "tiny", dict(resolution=96, batch_size=2)),
    ("TI tiny 128px b4 ckpt", "textual-inversion", "tiny", dict(resolution=128, batch_size=4, probe=False,
                                                              gradient_checkpointing=True)),
    ("TI sd15 64px b1", "textual-inversion", "sd15", dict(resolution=64, batch_size=1, probe=False)),
    ("TI sd15 128px b2", "textual-inversion", "sd15", dict(resolution=128, batch_size=2, probe=False)),
    ("DB-LoRA sd15 128px b1", "dreambooth", "sd15", dict(resolution=128, batch_size=1, probe=False)),
    ("DB-LoRA sd15 256px b1", "dreambooth", "sd15", dict(resolution=256, batch_size=1, probe=False)),
    ("DB-LoRA sd15 256px b1 ckpt", "dreambooth", "sd15", dict(resolution=256, batch_size=1, probe=False,
                                                              gradient_checkpointing=True)),
    ("DB-LoRA sd15 256px b1 bf16", "dreambooth", "sd15", dict(resolution=256, batch_size=1, probe=False,
                                                              mixed_precision="bf16")),
]


# -- measuring (child) ------------------------------------------------------------------------------------
def _status(field: str) -> int | None:
    """A VmRSS / VmHWM line of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(name: str) -> Any:
    from bench.common import sd15_random
    from studio.models import load_base

    return sd15_random() if name == "sd15" else load_base(name, device="cpu")


def _warm_up(base: Any) -> None:
    """One small no-gradient pass of each module: kernels, thread pools and lazy imports exist before the baseline."""
    import torch

    pipe = base.pipe
    with torch.no_grad():
        pipe.vae.encode(torch.zeros(1, 3, 64, 64))
        ids = pipe.tokenizer(["a"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = pipe.text_encoder(ids)[0]
        if getattr(pipe, "text_encoder_2", None) is None:
            pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor([1]), states)


def child(ns: argparse.Namespace) -> None:
    """Train one case and print ``RESULT {json}`` with the baseline and the peak (bytes)."""
    import torch

    torch.set_num_threads(ns.threads)
    import accelerate  # noqa: F401 - the imports training makes, before the baseline
    import peft  # noqa: F401

    from trainers import get_trainer
    from trainers.runner import train

    imported = _status("VmRSS")
    base = _build(ns.base)
    _warm_up(base)
    entry = get_trainer(ns.method)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = json.loads(ns.cfg)
        cfg = entry.resolve(**overrides, out=f"{tmp}/concept.safetensors")
        gc.collect()
        baseline = _status("VmRSS")
        reset = _reset_peak()
        train(entry, cfg, base)
        peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"imported": imported, "baseline": baseline, "peak": peak, "hwm_reset": reset}))


def start(method: str, base: str, overrides: dict[str, Any], *, threads: int = 1,
          default_malloc: bool = False) -> subprocess.Popen[str]:
    """Start one case in a fresh process (:func:`result` reads it)."""
    env = dict(os.environ)
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child", "--method", method, "--base", base, "--cfg", json.dumps(overrides),
           "--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The baseline and peak RSS (bytes) a started case reports."""
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{' '.join(map(str, proc.args[3:7]))} failed:\n{err[-3000:]}")
    return dict(json.loads(lines[0][7:]))


def measure(method: str, base: str, overrides: dict[str, Any], *, threads: int = 1,
            default_malloc: bool = False) -> dict[str, Any]:
    """Run one case in a fresh process; its baseline and peak RSS (bytes)."""
    return result(start(method, base, overrides, threads=threads, default_malloc=default_malloc))


# -- estimating ---------------------------------------------------------------------------------------------
def estimate_case(method: str, base: str, overrides: dict[str, Any], images: int, **kw: Any) -> Any:
    """The estimate of a measured case: the same config, on CPU in float32 (the sd15 case: the layout of the
    shipped SD 1.5 configs the random pipeline is built from)."""
    from trainers import get_trainer
    from trainers.memory import estimate

    entry = get_trainer(method)
    cfg = entry.resolve(**overrides)
    return estimate(entry, base, cfg, device="cpu", weights_dtype="fp32", n_images=images, **kw)


def case_config(method: str, images: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(images=str(images), class_word="dog", steps=2, log_every=0, **overrides)
    if method == "dreambooth":
        out["class_images"] = str(images)  # nothing to generate: the class images are a folder
    return out


def check(ns: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import write_images

    cases = [c for c in CASES if c[2] in ns.bases.split(",") and ns.only in c[0]]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "imgs", n=4, size=256)
        estimates = {name: estimate_case(method, base, case_config(method, images, o), 4)
                     for name, method, base, o in cases}
        # the same without the CPU convolution term (the one calibration of the trace): what it adds
        bare = {name: estimate_case(method, base, case_config(method, images, o), 4, kernel_workspace=False)
                for name, method, base, o in cases}
        for repeat in range(ns.repeats):
            for name, method, base, overrides in cases:  # interleaved: each repeat runs every case once
                m = measure(method, base, case_config(method, images, overrides), threads=ns.threads,
                            default_malloc=ns.default_malloc)
                est = estimates[name]
                delta = m["peak"] - m["baseline"]
                row = {"case": name, "repeat": repeat + 1, "est_delta_mb": est.training_bytes / MIB,
                       "meas_delta_mb": delta / MIB, "delta_ratio": delta / est.training_bytes,
                       "no_conv_ratio": delta / bare[name].training_bytes,
                       "est_total_mb": est.total / MIB, "meas_total_mb": m["peak"] / MIB,
                       "total_ratio": m["peak"] / est.total, "imported_mb": (m["imported"] or 0) / MIB,
                       "process_mb": (m["baseline"] - est.weights) / MIB, "peak_phase": est.peak_phase}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# -- the README table ---------------------------------------------------------------------------------------
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("textual inversion", "textual-inversion", {}),
    ("DreamBooth-LoRA", "dreambooth", {}),
    ("full fine-tune", "dreambooth", {"full": True, "train_text_encoder": False}),
    ("Perfusion", "perfusion", {}),
    ("NeTI", "neti", {}),
    ("IP-Adapter fine-tune", "adapter", {}),
]
# What to turn on, cheapest first; each adds to the ones before it (the trainers it applies to, or all).
LEVERS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("gradient checkpointing", {"gradient_checkpointing": True}, ("textual-inversion", "dreambooth", "perfusion",
                                                                  "neti")),  # the adapter trainer cannot yet
    ("8-bit AdamW", {"optimizer": "adamw8bit"}, ()),
    ("--class-batch-size 1", {"class_batch_size": 1}, ("dreambooth",)),
    ("--no-probe", {"probe": False}, ()),
]


def what_fits(method: str, base: str, over: dict[str, Any], dtype: str, gpus: list[float]) -> tuple[Any, list[str]]:
    """The default estimate, and per GPU size: "fits", "with LEVER + … (GiB)" — the levers turned on in
    order, each kept only if it lowers the total — or "no (best …)"."""
    from trainers import get_trainer
    from trainers.memory import estimate

    entry = get_trainer(method)

    def run(values: dict[str, Any]) -> Any:
        return estimate(entry, base, entry.resolve(**values), device="cuda", weights_dtype=dtype, n_images=0)

    est = best = run(over)
    cells = {g: "fits" for g in gpus if est.fits(g)}
    applied: dict[str, Any] = {}
    names: list[str] = []
    for name, change, methods in LEVERS:
        if len(cells) == len(gpus):
            break
        if methods and method not in methods:
            continue
        trial = run(over | applied | change)
        if trial.total >= 0.99 * best.total:
            continue  # turning it on would not help here
        applied, best = applied | change, trial
        names.append(name)
        for g in gpus:
            if g not in cells and trial.fits(g):
                cells[g] = f"with {' + '.join(names)} ({trial.total / GIB:.1f})"
    tried = f" with {' + '.join(names)}" if names else ""
    return est, [cells.get(g, f"no (best {best.total / GIB:.1f}{tried})") for g in gpus]


def table(ns: argparse.Namespace) -> str:
    """Markdown: per base, size and method, the default estimate and, per GPU, what fits."""
    gpus = [float(g) for g in ns.gpus.split(",")]
    lines = ["| base | px | method | defaults (peak phase) | " + " | ".join(f"{g:g} GiB GPU" for g in gpus) + " |",
             "|---|---:|---|---:|" + "---|" * len(gpus)]
    for base in ("sd15", "sdxl"):
        for px in (512, 1024):
            for label, method, extra in METHODS:
                over = dict(class_word="dog", resolution=px, batch_size=1, **extra)
                if method == "adapter":
                    over["adapter"] = "sd15" if base == "sd15" else "sdxl"
                if extra.get("full"):
                    over["mixed_precision"] = "fp16"  # a full fine-tune trains fp32 weights under autocast
                est, cells = what_fits(method, base, over, "fp32" if extra.get("full") else "fp16", gpus)
                lines.append(f"| {base} | {px} | {label} | {est.total / GIB:.1f} GiB ({est.peak_phase}) | "
                             + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="print the README's GPU table instead of the check")
    ap.add_argument("--gpus", default="12,24", help="GPU sizes of the table, GiB")
    ap.add_argument("--bases", default="tiny,sd15", help="bases of the check: tiny, sd15")
    ap.add_argument("--only", default="", help="the cases whose name contains this text")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the children")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's dynamic mmap threshold on")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default="{}", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        child(ns)
        return
    if ns.table:
        print(table(ns))
        return
    from bench.common import table as text_table

    rows = check(ns)
    print(text_table(rows, ["case", "repeat", "est_delta_mb", "meas_delta_mb", "delta_ratio", "no_conv_ratio",
                            "est_total_mb",
                            "meas_total_mb", "total_ratio", "process_mb", "peak_phase"]))


if __name__ == "__main__":
    main()
