"""The memory estimate (trainers/memory.py): counts come from the real modules (SD 1.5 / SDXL from
their configs, no weights), the phases add up, each lever moves it the way it must, ``train …
--dry-run`` prints it without training, and it matches a measured peak (CPU RSS, tiny base)."""

from __future__ import annotations

import pytest
import torch

from studio.errors import StudioError
from trainers import get_trainer
from trainers.memory import (
    AUTOCAST,
    GIB,
    estimate,
    estimate_text,
    optimizer_state,
)
from trainers.memory_layout import layout_for_spec

SD15_UNET = 859_520_964  # the published SD 1.5 UNet's parameters
SDXL_UNET = 2_567_463_684  # the published SDXL base UNet's


def _cfg(method: str, **kw):
    return get_trainer(method).resolve(class_word="dog", **kw)


def test_real_size_layouts_are_counted_from_their_configs():
    sd15 = layout_for_spec("sd15", device="cuda", dtype="fp16")
    sdxl = layout_for_spec("sdxl", device="cuda", dtype="fp16")
    assert sum(p.numel() for p in sd15.unet.parameters()) == SD15_UNET
    assert sum(p.numel() for p in sdxl.unet.parameters()) == SDXL_UNET
    assert [te.config.hidden_size for te in sdxl.text_encoders] == [768, 1280]
    assert (sd15.native_size, sdxl.native_size, sd15.dtype) == (512, 1024, torch.float16)
    assert all(p.device.type == "meta" for m in sdxl.modules for p in m.parameters())  # no weights were made


def test_full_finetune_on_sd15_params_gradients_and_adam_state():
    """A full fine-tune trains every UNet weight: 4 B of parameter, 4 of gradient, 8 of AdamW moments each;
    8-bit AdamW keeps ~2 B; half-precision weights are refused by the trainer, so fp32 is counted (noted)."""
    cfg = _cfg("dreambooth", full=True, train_text_encoder=False, mixed_precision="fp16", resolution=256,
               batch_size=1, probe=False, class_images="/nonexistent")
    est = estimate("dreambooth", "sd15", cfg, device="cuda", weights_dtype="fp16", n_images=0)
    assert est.trainable_params == SD15_UNET
    assert (est.trainable, est.gradients, est.optimizer_state) == (4 * SD15_UNET, 4 * SD15_UNET, 8 * SD15_UNET)
    assert est.weights_dtype == "fp32" and any("float32" in n for n in est.notes)
    update = est.weights + est.trainable + est.extra_state + est.gradients + est.optimizer_state + est.optimizer_temp
    assert est.phases["update"] == update and est.peak_phase == "update"
    assert est.total == update + est.overhead and 17 * GIB < est.total < 24 * GIB
    small = optimizer_state("adamw8bit", [SD15_UNET])
    assert 2 * SD15_UNET < small < 2.05 * SD15_UNET
    assert optimizer_state("adamw8bit", [100]) == 800 and optimizer_state("sgd", [SD15_UNET]) == 0


def test_phases_and_total_add_up_and_the_table_says_so():
    cfg = _cfg("textual-inversion", resolution=64, batch_size=2)
    est = estimate("textual-inversion", "tiny", cfg, device="cpu", n_images=3)
    persistent = est.weights + est.trainable + est.extra_state
    in_flight = est.phases["step"] - persistent - est.optimizer_state - est.activations  # parameter gradients
    assert 0 <= in_flight <= est.gradients
    assert est.phases["encode"] == persistent + est.vae_encode and est.phases["probe"] == persistent + est.probe
    assert est.total == max(est.phases.values()) + est.overhead + est.host  # CPU: the host is the device
    assert est.trainable_params == 2 * 32  # two 32-d vectors of the tiny encoder
    text = estimate_text("textual-inversion", "tiny", cfg, device="cpu", n_images=3)
    assert "| **total (peak: step)** |" in text and "optimizer state (AdamW: 2 × fp32)" in text


def test_levers_move_the_estimate_the_right_way():
    def act(**kw):
        cfg = _cfg("dreambooth", resolution=64, probe=False, class_images="/nonexistent", **kw)
        return estimate("dreambooth", "tiny", cfg, device="cuda", n_images=0)

    base = act(batch_size=1)
    assert base.rows == 2  # prior preservation: instance + class rows in one forward
    two = act(batch_size=2)
    assert 1.6 < two.activations / base.activations < 2.2
    assert act(batch_size=1, gradient_checkpointing=True).activations < 0.6 * base.activations
    half = estimate("dreambooth", "tiny", _cfg("dreambooth", resolution=64, probe=False, class_images="/x"),
                    device="cuda", weights_dtype="fp16", n_images=0)
    full = estimate("dreambooth", "tiny", _cfg("dreambooth", resolution=64, probe=False, class_images="/x"),
                    device="cuda", weights_dtype="fp32", n_images=0)
    assert half.activations < 0.7 * full.activations  # the LoRA's float32 path keeps some float32 copies
    assert 1.99 < full.weights / half.weights < 2.0  # (integer buffers keep their size)
    auto = estimate("dreambooth", "tiny", _cfg("dreambooth", resolution=64, probe=False, class_images="/x",
                                               mixed_precision="bf16"), device="cuda", weights_dtype="fp32", n_images=0)
    assert auto.activations < full.activations and AUTOCAST["bf16"] == torch.bfloat16


def test_attention_maps_are_counted_without_memory_efficient_attention():
    """The math kernel keeps softmax(q kᵀ): heads × N² per attention. The tiny UNet (VAE factor 2) attends
    over N = 64² tokens at 128 px with 4 heads, in one down-block and two up-block attentions; 2 rows."""
    cfg = _cfg("dreambooth", resolution=128, probe=False, class_images="/x")
    sdpa = estimate("dreambooth", "tiny", cfg, device="cuda", weights_dtype="fp32", n_images=0)
    math_ = estimate("dreambooth", "tiny", cfg, device="cuda", weights_dtype="fp32", n_images=0, attention="math")
    one_map = 2 * 4 * 4096 * 4096 * 4
    assert math_.activations - sdpa.activations > 2 * one_map


def test_a_loaded_base_gives_the_same_estimate_and_is_left_untouched():
    from studio.models import load_base

    base = load_base("tiny", device="cpu")
    flags = [p.requires_grad for p in base.pipe.unet.parameters()]
    cfg = _cfg("dreambooth", resolution=64, probe=False, class_images="/x")
    loaded = estimate("dreambooth", base, cfg, n_images=0)
    spec = estimate("dreambooth", "tiny", cfg, device="cpu", n_images=0)
    assert (loaded.weights, loaded.trainable_params, loaded.activations) == \
        (spec.weights, spec.trainable_params, spec.activations)
    assert getattr(base.pipe.unet, "peft_config", None) is None  # the LoRA went on a meta copy
    assert [p.requires_grad for p in base.pipe.unet.parameters()] == flags


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(StudioError, match="Unknown training method"):
        estimate("no-such-method", "tiny")
    with pytest.raises(StudioError, match="without downloading"):
        estimate("textual-inversion", "someone/some-model", _cfg("textual-inversion"))
    with pytest.raises(StudioError, match="multiple of the VAE"):
        estimate("textual-inversion", "sd15", _cfg("textual-inversion", resolution=100))


def test_dry_run_prints_settings_and_memory_and_trains_nothing(tmp_path, capsys):
    from studio.cli import main

    library = tmp_path / "library"
    rc = main(["train", "textual-inversion", "--base", "tiny", "--class-word", "dog", "--library", str(library),
               "--resolution", "64", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "num_vectors" in out and "Memory estimate: textual-inversion on tiny" in out
    assert "| **total" in out and not library.exists()  # nothing trained, nothing written
    rc = main(["train", "dreambooth", "--base", "tiny", "--class-word", "dog", "--queue", "--dry-run",
               "--library", str(library)])
    assert rc == 2 and "cannot be queued" in capsys.readouterr().err and not library.exists()  # nothing queued


def test_measured_training_peaks_are_within_25_percent(tmp_path):
    """Train for real (2 steps, CPU, a fresh process each, run side by side) and compare the RSS growth while
    training with the estimate's training part: on the tiny base the interpreter (~0.45 GiB) dwarfs the
    model, so only the growth over the process's baseline says anything."""
    from pathlib import Path

    from bench.common import write_images
    from bench.memory_estimate import case_config, estimate_case, result, start

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak RSS is reset through Linux's /proc/self/clear_refs")
    images = write_images(tmp_path / "imgs", n=4, size=96)
    cases = {"textual-inversion": case_config("textual-inversion", images, dict(resolution=96, batch_size=4,
                                                                                 probe=False)),
             "dreambooth": case_config("dreambooth", images, dict(resolution=96, batch_size=2, probe=False))}
    running = {method: start(method, "tiny", cfg) for method, cfg in cases.items()}
    for method, cfg in cases.items():
        measured = result(running[method])
        assert measured["hwm_reset"]
        est = estimate_case(method, "tiny", cfg, 4)
        ratio = (measured["peak"] - measured["baseline"]) / est.training_bytes
        assert 0.75 <= ratio <= 1.25, (method, ratio, measured, est.training_bytes)
