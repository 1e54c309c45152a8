"""Mixed precision in the shared loop (trainers/precision.py): every trainer trains under bf16 autocast on a
CPU over a base whose frozen weights are bf16, its trained tensors stay float32 through training, the loss is
finite, and the file it writes has the keys and dtypes of a float32 run's; fp16 on a CPU is refused in one
line; the fp16 loss scaling (a GPU path) is checked with a CPU GradScaler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from studio.errors import TrainingError
from studio.methods.runtime import text_encoders
from tests.helpers import write_photos
from tests.method_cases import tiny_image_encoder
from trainers import get_trainer
from trainers.loop import TrainCallbacks, run_training
from trainers.precision import Precision, check_trainable

TRAINERS = ["textual-inversion", "dreambooth", "neti", "perfusion", "adapter"]


@pytest.fixture(scope="module")
def bases():
    """The tiny base twice: float32 weights, and bf16 weights (the frozen weights in the low precision)."""
    from studio.models import load_base

    return {"fp32": load_base("tiny", device="cpu"), "bf16": load_base("tiny", device="cpu", dtype="bf16")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    write_photos(root / "images", 3, 32)
    tiny_image_encoder().save_pretrained(root / "encoder")
    return root


def _weights(pipe) -> dict[str, torch.Tensor]:
    mods = [pipe.unet, pipe.vae, *(te for _, te in text_encoders(pipe))]
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(mods) for n, p in m.state_dict().items()}


class Watch(TrainCallbacks):
    """Reads the trainer's tensors after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.dtypes, self.frozen = trainer, [], set()

    def on_step(self, step, total, loss, seconds):
        tensors = self.trainer.trainable()
        self.dtypes.append({k: t.dtype for k, t in tensors.items() if t.requires_grad})
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
        unet = self.trainer.base.pipe.unet
        self.frozen |= {p.dtype for p in unet.parameters() if not p.requires_grad}


def _train(name: str, base, inputs: Path, out: Path, mixed_precision: str):
    entry = get_trainer(name)
    extra = {"dreambooth": dict(prior_preservation=False), "neti": dict(grad_accum=1),
             "adapter": dict(adapter="new", image_encoder=str(inputs / "encoder"), save_image_encoder=False)}
    cfg = entry.resolve(images=str(inputs / "images"), out=str(out), steps=2, batch_size=2, seed=0, probe=False,
                        log_every=0, class_word="dog", token="<mp>" if name != "dreambooth" else None,
                        mixed_precision=mixed_precision, **extra.get(name, {}))
    token = "<mp>" if name != "dreambooth" else "sks"
    trainer = entry.make_trainer(base, cfg, token)
    watch = Watch(trainer)
    result = run_training(base, trainer, cfg, method=entry.method, callbacks=watch)
    return result, watch


def _file_layout(path: Path) -> dict[str, str]:
    """Tensor name → dtype of a written concept (or an adapter folder's weights file)."""
    file = path / "ip_adapter.safetensors" if path.is_dir() else path
    with safe_open(str(file), "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("name", TRAINERS)
def test_bf16_trains_float32_tensors_and_writes_the_float32_layout(name, bases, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_PERFUSION_CACHE", str(tmp_path / "perfusion"))
    suffix = "" if name == "adapter" else ".safetensors"
    ref, _ = _train(name, bases["fp32"], inputs, tmp_path / f"fp32{suffix}", "no")
    base = bases["bf16"]
    before = _weights(base.pipe)
    low, watch = _train(name, base, inputs, tmp_path / f"bf16{suffix}", "bf16")
    # trained tensors: float32 after every step, while the frozen UNet weights were bf16
    assert len(watch.dtypes) == 2 and watch.dtypes[0]
    assert all(d == torch.float32 for step in watch.dtypes for d in step.values()), watch.dtypes
    assert watch.frozen == {torch.bfloat16}
    assert all(math.isfinite(v) for v in low.losses) and len(low.losses) == 2
    # bf16 autocast moved the loss, but not far (the same data, noise and initial tensors)
    assert low.losses[0] == pytest.approx(ref.losses[0], rel=0.05)
    # the written file: the same tensors, the same dtypes as the float32 run's
    assert _file_layout(low.path) == _file_layout(ref.path)
    assert set(low.concept.tensors) == set(ref.concept.tensors)
    assert {k: v.dtype for k, v in low.concept.tensors.items()} == {k: v.dtype for k, v in ref.concept.tensors.items()}
    # the base is handed back untouched
    after = _weights(base.pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_autocast_over_float32_weights_says_how_to_save_memory(bases, inputs, tmp_path):
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(inputs / "images"), out=str(tmp_path / "a.safetensors"), steps=1, batch_size=2,
                        probe=False, log_every=0, class_word="dog", token="<mp>", mixed_precision="bf16")
    logs: list[str] = []

    class Log(TrainCallbacks):
        def on_log(self, message):
            logs.append(message)

    trainer = entry.make_trainer(bases["fp32"], cfg, "<mp>")
    result = run_training(bases["fp32"], trainer, cfg, method=entry.method, callbacks=Log())
    assert math.isfinite(result.losses[0])
    assert any("float32 while autocast runs bf16" in m and "--dtype bf16" in m for m in logs), logs


def test_mixed_precision_changes_between_runs_of_one_process(bases, inputs, tmp_path):
    """accelerate keeps one mixed-precision mode per process; the loop's own mode lets a worker run a bf16 job
    after a float32 one and back (it raised "AcceleratorState has already been initialized" before)."""
    entry = get_trainer("textual-inversion")
    losses = []
    for i, mp in enumerate(["no", "bf16", "no"]):
        cfg = entry.resolve(images=str(inputs / "images"), out=str(tmp_path / f"{i}.safetensors"), steps=1,
                            batch_size=2, probe=False, log_every=0, class_word="dog", token="<mp>", mixed_precision=mp)
        trainer = entry.make_trainer(bases["fp32"], cfg, "<mp>")
        losses.append(run_training(bases["fp32"], trainer, cfg, method=entry.method).losses[0])
    assert losses[0] == losses[2] and losses[1] != losses[0]  # bf16 really ran in between


def test_fp16_on_a_cpu_is_refused_in_one_line_and_the_base_is_untouched(bases, inputs, tmp_path):
    base = bases["fp32"]
    before = _weights(base.pipe)
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(inputs / "images"), out=str(tmp_path / "x.safetensors"), steps=1, probe=False,
                        class_word="dog", token="<mp>", mixed_precision="fp16")
    trainer = entry.make_trainer(base, cfg, "<mp>")
    with pytest.raises(TrainingError) as err:
        run_training(base, trainer, cfg, method=entry.method)
    message = str(err.value)
    assert "\n" not in message and "fp16 needs a GPU" in message and "--mixed-precision bf16" in message
    assert not (tmp_path / "x.safetensors").exists()
    after = _weights(base.pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_low_precision_trained_tensor_is_refused():
    p32, p16 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    state = torch.ones(2, dtype=torch.bfloat16)  # a state tensor without gradient (e.g. Perfusion's i*) may be anything
    prec = Precision.for_run("bf16", torch.device("cpu"))
    check_trainable({"a": p32, "state": state}, prec)
    with pytest.raises(TrainingError, match="b are torch.bfloat16, not float32"):
        check_trainable({"a": p32, "b": p16}, prec)


def test_fp16_loss_scaling_unscales_before_clipping_and_skips_overflowing_steps():
    """The fp16 path's arithmetic, with a CPU GradScaler standing in for CUDA's: the backward sees the scaled
    loss, the optimizer the true gradient, an overflow skips the step and halves the scale, and the scale
    survives a checkpoint's JSON."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    prec = Precision("fp16", "cpu", torch.bfloat16, scaler)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    x = torch.tensor([3.0, 4.0])
    prec.backward((w * x).sum())
    assert torch.equal(w.grad, 1024.0 * x)  # scaled
    prec.unscale(opt)
    assert torch.equal(w.grad, x)  # the true gradient, what clipping must see
    assert prec.step(opt) is True
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.3, -2.0 - 0.4]))
    opt.zero_grad()
    before = w.detach().clone()
    prec.backward((w * torch.tensor([float("inf"), 1.0])).sum())
    prec.unscale(opt)
    assert prec.step(opt) is False  # skipped: the weights did not move, the scale shrank
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 512.0
    saved = json.loads(json.dumps(prec.state()))
    other = Precision("fp16", "cpu", torch.bfloat16, torch.amp.GradScaler("cpu"))
    other.load_state(saved)
    assert other.scaler.get_scale() == 512.0
    assert Precision.for_run("no", torch.device("cpu")).state() == {}


def test_bf16_precision_autocasts_matmuls_and_no_leaves_them_alone():
    a = torch.randn(4, 4)
    with Precision.for_run("bf16", torch.device("cpu")).autocast():
        assert (a @ a).dtype == torch.bfloat16
    with Precision.for_run("no", torch.device("cpu")).autocast():
        assert (a @ a).dtype == torch.float32
