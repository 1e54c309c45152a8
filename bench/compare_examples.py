"""The studio's trainers against diffusers' own example scripts and a bare UNet loop, on one base.

Three contenders per task, each run as its own process through the same harness (the same thread
count, the same images, the same base folder, float32 unless ``--mixed-precision``):

* **example** — diffusers' ``examples/textual_inversion/textual_inversion.py`` and
  ``examples/dreambooth/train_dreambooth_lora.py`` (UNet LoRA rank 4, no prior preservation), run
  unmodified from ``--examples-dir``;
* **studio** — ``python -m studio train textual-inversion`` / ``train dreambooth`` with the same
  task (one vector from ``toy``, no probe; LoRA rank 4 on the UNet only, no prior preservation);
* **bare** — the least a step can do: cached latents and text states, one UNet forward and
  backward, AdamW on the trained tensors (a token row through the text encoder for textual
  inversion; a PEFT LoRA on the UNet for DreamBooth). The floor the others are measured against.
  It leaves out per-step work the studio does: a fresh latent ``μ + σ·ε`` from the cached posterior
  (it uses the mean), one fixed prompt (no template drawn), no loss or weight NaN guard, no
  callbacks; it decays no weight, as the studio's default ``--weight-decay 0`` does not.

Measured per contender: **seconds per step** as the slope between two step counts
(``(T(n₂) − T(n₁)) / (n₂ − n₁)`` of the whole process's wall time, so model loading, data
preparation and saving cancel out) — and the same slope of the process's **CPU time** (user + sys,
from the kernel's accounting of the finished child), which a machine shared with other jobs
disturbs far less than wall time. On a small base, where a step takes milliseconds and start-up
seconds, the difference of two processes is noisy; so each process also times its own steps (wall
and CPU clocks read by the optimizer-step hook) and the **in-run** slope of the longer run — from
the end of step ``n₁`` to the end of its last step, start-up and saving left out — is reported
too. Also measured: **time to the first optimizer step** (from process launch; a
global optimizer-step hook records it, with the process's CPU time then — user + sys, what a shared
machine disturbs least; the studio's latent store is empty for each run unless ``--studio-latents
warm``), and **peak RSS** of the process. Runs are interleaved
(example, studio, bare, then again) and the median of ``--repeats`` is reported, with each one's
ratio to the example and to the bare loop.

The example scripts are never committed; fetch them for the installed diffusers version::

    V=$(python -c "import diffusers; print(diffusers.__version__)")
    mkdir -p /tmp/examples && cd /tmp/examples
    curl -LO https://raw.githubusercontent.com/huggingface/diffusers/v$V/examples/textual_inversion/textual_inversion.py
    curl -LO https://raw.githubusercontent.com/huggingface/diffusers/v$V/examples/dreambooth/train_dreambooth_lora.py

then::

    python bench/compare_examples.py --examples-dir /tmp/examples --size small     # the tiny base, a CPU
    python bench/compare_examples.py --examples-dir /tmp/examples --size world     # the demo world's base
    python bench/compare_examples.py --examples-dir /tmp/examples --size sd15 --device cuda --mixed-precision fp16

The scripts import ``torchvision.transforms``; where no torchvision matching the installed torch can
be imported (a CPU-only torch with a CUDA torchvision wheel), a small stand-in of the four transforms
they use (written for this harness: resize, crops, flip, to-tensor + normalise, with PIL) is put on
their path, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCRIPTS = {"ti": "textual_inversion.py", "lora": "train_dreambooth_lora.py"}
TASKS = {"ti": "textual inversion", "lora": "DreamBooth-LoRA (UNet, rank 4)"}
TOKEN, INIT = "<cat-toy>", "toy"
LR = {"ti": 5e-4, "lora": 1e-4}

# -- the child side: run a script under the step clock -------------------------------------------------
_CHILD = r"""
import json, os, resource, sys, time, atexit, runpy
out, threads, kind, target = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
args = sys.argv[5:]
import torch
torch.set_num_threads(threads)
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = []
register_optimizer_step_post_hook(lambda opt, a, k: steps.append((time.time(), time.process_time())))
def report():
    with open(out, "w") as f:
        json.dump({"steps": len(steps), "first_step": steps[0][0] if steps else None, "end": time.time(),
                   "step_wall": [w for w, _ in steps], "step_cpu": [c for _, c in steps],
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
atexit.register(report)
standin = os.environ.get("COMPARE_EXAMPLES_TRANSFORMS")
if standin:  # after transformers and diffusers decided torchvision is absent, so only the script sees it
    import importlib.util, types
    import diffusers.utils.import_utils, transformers.utils.import_utils  # noqa: F401
    spec = importlib.util.spec_from_file_location("torchvision.transforms", standin)
    transforms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transforms)
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = package, transforms
sys.argv = [target, *args]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.path.insert(0, os.path.dirname(target))
    runpy.run_path(target, run_name="__main__")
"""

_TRANSFORMS_STANDIN = r'''"""A stand-in for the few torchvision transforms diffusers' example scripts use (bench/compare_examples.py)."""
import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.mode = size, _PIL[getattr(interpolation, "value", "bilinear")]

    def __call__(self, img):
        w, h = img.size
        s = self.size / min(w, h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), self.mode)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, img):
        w, h = img.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return img.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        if isinstance(img, Image.Image):
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.flip(torch.as_tensor(img), dims=[-1])


class ToTensor:
    def __call__(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, x):
        return (x - self.mean) / self.std
'''


# -- the bare loop ------------------------------------------------------------------------------------
def bare(task: str, base_dir: str, images: str, steps: int, resolution: int, seed: int, precision: str) -> None:
    """The floor: cached latents (and text states for LoRA), one UNet forward/backward and AdamW per step."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae").to(device).requires_grad_(False)
    te = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder").to(device).requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler")
    files = sorted(p for p in Path(images).iterdir() if p.suffix == ".png")
    pix = torch.stack([torch.from_numpy(__import__("numpy").asarray(
        Image.open(f).convert("RGB").resize((resolution, resolution)), dtype="float32") / 127.5 - 1).permute(2, 0, 1)
        for f in files]).to(device)
    with torch.no_grad():
        latents = vae.encode(pix).latent_dist.mean * vae.config.scaling_factor
    ids = tok(["a photo of a toy"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids.to(device)
    emb = te.get_input_embeddings()
    if task == "ti":  # one trainable row in place of "toy", through the frozen text encoder
        pos = int((ids[0] == tok.convert_tokens_to_ids("toy</w>")).nonzero()[0])
        row = emb.weight[ids[0, pos]].detach().clone().requires_grad_(True)
        params = [row]

        def splice(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[:, pos] = row.to(output.dtype)
            return output

        emb.register_forward_hook(splice)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        with torch.no_grad():
            states = te(ids)[0]
    opt = torch.optim.AdamW(params, lr=LR[task], weight_decay=0.0)  # the studio's update (no decay by default)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    for _ in range(steps):
        i = torch.randint(len(latents), (1,))
        noise = torch.randn_like(latents[i])
        t = torch.randint(sched.config.num_train_timesteps, (1,), device=device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if task == "ti":
                states = te(ids)[0]  # the hook below puts the trained row at the word's position
            pred = unet(sched.add_noise(latents[i], noise, t), t, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# -- the parent side -------------------------------------------------------------------------------------
def _standin_needed(env: dict[str, str]) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], env=env, capture_output=True)
    return probe.returncode != 0


def _command(who: str, task: str, ns: argparse.Namespace, work: Path, steps: int) -> tuple[str, str, list[str]]:
    """(kind, target, args) of one contender's run."""
    base, images, out = str(work / "base"), str(work / "images"), str(work / f"out-{who}-{task}-{steps}")
    res = str(ns.resolution)
    if who == "example":
        common = ["--pretrained_model_name_or_path", base, "--resolution", res, "--train_batch_size", "1",
                  "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps), "--lr_scheduler", "constant",
                  "--lr_warmup_steps", "0", "--seed", str(ns.seed), "--output_dir", out, "--mixed_precision",
                  ns.mixed_precision, "--dataloader_num_workers", "0", "--report_to", "all",
                  "--checkpointing_steps", "1000000"]
        if task == "ti":
            return "path", str(Path(ns.examples_dir) / SCRIPTS[task]), common + [
                "--train_data_dir", images, "--learnable_property", "object", "--placeholder_token", TOKEN,
                "--initializer_token", INIT, "--learning_rate", str(LR[task]), "--save_steps", "1000000"]
        return "path", str(Path(ns.examples_dir) / SCRIPTS[task]), common + [
            "--instance_data_dir", images, "--instance_prompt", "a photo of sks toy", "--learning_rate", str(LR[task]),
            "--rank", "4"]
    if who == "studio":
        common = ["train", "textual-inversion" if task == "ti" else "dreambooth", "--base", base, "--device",
                  ns.device, "--images", images, "--out", out + ".safetensors", "--steps", str(steps), "--batch-size",
                  "1", "--lr", str(LR[task]), "--resolution", res, "--seed", str(ns.seed), "--no-probe",
                  "--log-every", "0", "--mixed-precision", ns.mixed_precision, "--class-word", INIT]
        if task == "ti":
            return "module", "studio", common + ["--token", TOKEN, "--init", "plain", "--init-words", INIT,
                                                 "--num-vectors", "1", "--reg-weight", "0", "--grad-accum", "1"]
        return "module", "studio", common + ["--token", "sks", "--rank", "4", "--no-train-text-encoder",
                                             "--no-prior-preservation"]
    return "path", str(Path(__file__).resolve()), ["--bare-child", task, base, images, str(steps), res, str(ns.seed),
                                                   ns.mixed_precision]


def _run(who: str, task: str, ns: argparse.Namespace, work: Path, steps: int, env: dict[str, str]) -> dict[str, Any]:
    kind, target, args = _command(who, task, ns, work, steps)
    report = work / f"report-{who}-{task}-{steps}.json"
    if who == "studio":  # the latent store (trainers.latents): empty for each run (cold), or one primed store (warm)
        store = tempfile.mkdtemp(prefix="latents-", dir=work) if ns.studio_latents == "cold" else str(work / "latents")
        env = dict(env, STUDIO_LATENT_CACHE=store)
    launched = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(report), str(ns.threads), kind, target, *args],
                          env=env, capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # this child's user + sys (runs are sequential)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"compare_examples: {who} {task} ({steps} steps) failed:\n{tail}")
    r = json.loads(report.read_text())
    if r["steps"] < steps:
        raise SystemExit(f"compare_examples: {who} {task} made {r['steps']} optimizer steps, expected {steps}.")
    # in the run: from the end of step n1 to the end of the last step (start-up and saving left out)
    n1 = ns.steps[0]
    inner = {k: (r[f"step_{k}"][-1] - r[f"step_{k}"][n1 - 1]) / (len(r[f"step_{k}"]) - n1)
             for k in ("wall", "cpu")} if r["steps"] > n1 else {"wall": None, "cpu": None}
    return {"wall": wall, "cpu": cpu, "run_wall": inner["wall"], "run_cpu": inner["cpu"], "first_step": r["first_step"] - launched,
            "first_step_cpu": r["step_cpu"][0], "peak_rss_mb": r["peak_rss_mb"]}


def _base_folder(size: str, folder: Path) -> None:
    """Write the base the three contenders load (``small``: the tiny random base; ``world``: a copy of
    the demo world's committed base, 32 px; ``sd15``: SD-1.5-sized random weights)."""
    if size == "world":
        import shutil

        from studio.world import DEMO_BASE_DIR

        shutil.copytree(DEMO_BASE_DIR, folder)
        return
    if size == "small":
        from studio.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline("tiny")
    else:
        from bench.common import sd15_random

        pipe = sd15_random().pipe
    pipe.save_pretrained(str(folder), safe_serialization=True)


def compare(ns: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import write_images

    rows = []
    with tempfile.TemporaryDirectory(prefix="compare_examples-") as tmp:
        work = Path(tmp)
        _base_folder(ns.size, work / "base")
        write_images(work / "images", n=4, size=ns.resolution)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   OMP_NUM_THREADS=str(ns.threads))
        standin = _standin_needed(env)
        if standin:
            (work / "transforms_standin.py").write_text(_TRANSFORMS_STANDIN)
            env["COMPARE_EXAMPLES_TRANSFORMS"] = str(work / "transforms_standin.py")
            print("note: no importable torchvision matches this torch; the examples get a stand-in of the "
                  "transforms they use", flush=True)
        for task in ns.tasks:
            runs: dict[str, dict[int, list[dict[str, Any]]]] = {w: {n: [] for n in ns.steps} for w in ns.who}
            if "studio" in ns.who and ns.studio_latents == "warm":  # an earlier run on these photos filled the store
                _run("studio", task, ns, work, 1, env)
            for _ in range(ns.repeats):
                for n in ns.steps:
                    for who in ns.who:  # interleaved: a slow moment of the machine hits every contender
                        r = _run(who, task, ns, work, n, env)
                        runs[who][n].append(r)
                        print(f"{TASKS[task]:32s} {who:8s} {n:4d} steps  {r['wall']:.2f} s  CPU {r['cpu']:.2f} s  first step "
                              f"{r['first_step']:.2f} s (CPU {r['first_step_cpu']:.2f} s)  peak RSS {r['peak_rss_mb']:.0f} MB",
                              flush=True)
            n1, n2 = ns.steps
            for who in ns.who:
                t1 = statistics.median(r["wall"] for r in runs[who][n1])
                t2 = statistics.median(r["wall"] for r in runs[who][n2])
                c1 = statistics.median(r["cpu"] for r in runs[who][n1])
                c2 = statistics.median(r["cpu"] for r in runs[who][n2])
                rows.append({"task": TASKS[task], "who": who, "s/step": (t2 - t1) / (n2 - n1),
                             "CPU s/step": (c2 - c1) / (n2 - n1),
                             "in-run s/step": statistics.median(r["run_wall"] for r in runs[who][n2]),
                             "in-run CPU s/step": statistics.median(r["run_cpu"] for r in runs[who][n2]),
                             "first step s": statistics.median(r["first_step"] for r in runs[who][n1]),
                             "first step CPU s": statistics.median(r["first_step_cpu"] for r in runs[who][n1]),
                             "peak RSS MB": max(r["peak_rss_mb"] for r in runs[who][n2])})
            ref = next((r for r in rows if r["task"] == TASKS[task] and r["who"] == "example"), None)
            floor = next((r for r in rows if r["task"] == TASKS[task] and r["who"] == "bare"), None)
            for r in rows:
                if r["task"] == TASKS[task] and ref is not None:
                    r["× example s/step"] = r["s/step"] / ref["s/step"] if ref["s/step"] > 0 else None
                    r["× example RSS"] = r["peak RSS MB"] / ref["peak RSS MB"]
                    r["× example first step"] = r["first step s"] / ref["first step s"]
                    r["× example first-step CPU"] = r["first step CPU s"] / ref["first step CPU s"]
                if r["task"] == TASKS[task] and floor is not None:
                    r["× bare s/step"] = r["s/step"] / floor["s/step"] if floor["s/step"] > 0 else None
                    r["× bare CPU"] = r["CPU s/step"] / floor["CPU s/step"] if floor["CPU s/step"] > 0 else None
                    r["× bare in-run"] = r["in-run s/step"] / floor["in-run s/step"]
                    r["× bare in-run CPU"] = r["in-run CPU s/step"] / floor["in-run CPU s/step"]
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples-dir", help="folder holding textual_inversion.py and train_dreambooth_lora.py (see above)")
    p.add_argument("--size", choices=["small", "world", "sd15"], default="small", help="small: the tiny random base "
                   "(32 px); world: the demo world's base (32 px); sd15: SD-1.5-sized random weights (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 small and world, 512 sd15")
    p.add_argument("--steps", type=int, nargs=2, default=[10, 30], metavar=("N1", "N2"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--who", nargs="+", choices=["example", "studio", "bare"], default=["example", "studio", "bare"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--studio-latents", choices=["cold", "warm"], default="cold",
                   help="the studio's latent store (trainers.latents): cold = empty for every run (a first run on "
                        "these photos); warm = filled by an unmeasured run first (a later run on the same photos)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--bare-child", nargs=7, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.bare_child is None:
        if "example" in ns.who and not ns.examples_dir:
            p.error("--examples-dir DIR is needed for the example scripts (the docstring says how to fetch them)")
        missing = [s for t, s in SCRIPTS.items() if t in ns.tasks and "example" in ns.who
                   and not (Path(ns.examples_dir) / s).is_file()]
        if missing:
            p.error(f"{', '.join(missing)} not found in {ns.examples_dir}")
        if ns.steps[1] <= ns.steps[0] or ns.steps[0] < 1:
            p.error("--steps N1 N2 needs 1 ≤ N1 < N2")
        ns.resolution = ns.resolution or (512 if ns.size == "sd15" else 32)
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    if ns.bare_child is not None:
        task, base, images, steps, res, seed, precision = ns.bare_child
        bare(task, base, images, int(steps), int(res), int(seed), precision)
        return 0
    from bench.common import table

    rows = compare(ns)
    print(table(rows, ["task", "who", "s/step", "CPU s/step", "in-run s/step", "in-run CPU s/step",
                       "× example s/step", "× bare s/step", "× bare CPU", "× bare in-run", "× bare in-run CPU",
                       "first step s", "first step CPU s", "× example first step", "× example first-step CPU",
                       "peak RSS MB", "× example RSS"]))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
