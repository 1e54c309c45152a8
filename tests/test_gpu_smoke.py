"""bench/gpu_smoke.py: without CUDA it refuses in one line; ``--tiny --device cpu`` runs every trainer and the
generation cases of both families through the same code as on a GPU (tiny bases, bf16 weights and autocast)."""

from __future__ import annotations

import json
import math

from bench import gpu_smoke


def test_without_a_gpu_it_refuses_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(gpu_smoke.torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "need a CUDA GPU" in err and "--tiny --device cpu" in err


def test_tiny_runs_every_trainer_and_generation_case(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert gpu_smoke.main(["--tiny", "--device", "cpu", "--steps", "2", "--gen-steps", "1", "--no-checkpointing",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    cases = {(r["family"], r["case"]) for r in rows}
    for family in ("sd15", "sdxl"):
        assert {(family, t) for t in gpu_smoke.TRAINERS} <= cases
        assert {(family, "generate"), (family, "generate +LoRA fused"), (family, "generate +LoRA PEFT")} <= cases
        assert (family, "generate 64px +vae-tiling") in cases
    assert all(r["precision"] == "bf16" and math.isfinite(r["s/step"]) for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    printed = capsys.readouterr().out
    assert "s/step" in printed and "peak GB" in printed
