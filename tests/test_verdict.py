"""Every training ends with a verdict from a measurement it takes itself (trainers/probe.py): in the
concept file, on the CLI, in `concepts list` and on the Concepts tab's card; textual inversion
chooses its initialisation by the same measurement and derives its learning rate from the base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.methods import load_concept
from tests.helpers import write_photos
from trainers import get_trainer
from trainers.probe import LEARNED_GAIN, WEAK_GAIN, verdict, verdict_text
from trainers.runner import train
from trainers.textual_inversion import embedding_scale

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


def test_verdict_thresholds():
    assert verdict(LEARNED_GAIN) == "learned" and verdict(1.0) == "learned"
    assert verdict(WEAK_GAIN) == "weak" and verdict(LEARNED_GAIN - 1e-6) == "weak"
    assert verdict(0.0) == "not learned" and verdict(-0.2) == "not learned"
    assert verdict_text({}) == "" and verdict_text({"verdict": "nonsense"}) == ""
    text = verdict_text({"verdict": {"verdict": "weak", "gain": 0.02, "gain_start": -0.01}})
    assert text.startswith("verdict: weak") and "+0.020" in text


def test_training_stores_the_verdict_the_measured_init_and_the_effective_rate(tiny, photos, tmp_path):
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(photos), out=str(tmp_path / "c.safetensors"), class_word="cat", steps=2,
                        batch_size=2, log_every=0)
    assert cfg.lr is None and cfg.init == "auto"  # the defaults: measured init, rate from the base
    result = train(entry, cfg, tiny)
    concept = load_concept(result.path)
    v = concept.metrics["verdict"]
    assert v["verdict"] in ("learned", "weak", "not learned") and v["verdict"] == verdict(v["gain"])
    scores = concept.train["init_scores"]
    assert set(scores) == {"cross", "plain"} and concept.train["init_chosen"] == min(scores, key=scores.get)
    expected = [0.35 * s for s in embedding_scale(tiny.pipe, "cat")]
    assert concept.train["lr_effective"] == pytest.approx(expected, rel=1e-6)
    # an explicit --lr is the optimizer's value as is; a forced init measures nothing
    forced = entry.resolve(images=str(photos), out=str(tmp_path / "d.safetensors"), class_word="cat", steps=1,
                           batch_size=1, lr=1e-3, init="plain", log_every=0)
    concept = load_concept(train(entry, forced, tiny).path)
    assert concept.train["lr_effective"] == [1e-3] and concept.train["init_chosen"] == "plain"
    assert concept.train["init_scores"] == {}


def test_the_probe_leaves_the_training_stream_alone(tiny, photos, tmp_path):
    """Measuring (on by default) must not change what training does: same tensors with it off."""
    entry = get_trainer("textual-inversion")
    runs = []
    for probe in (True, False):
        cfg = entry.resolve(images=str(photos), out=str(tmp_path / f"p{probe}.safetensors"), class_word="cat",
                            steps=3, batch_size=2, log_every=0, init="cross", probe=probe)
        runs.append(load_concept(train(entry, cfg, tiny).path))
    assert torch.equal(runs[0].tensors["emb_params"], runs[1].tensors["emb_params"])
    assert "verdict" in runs[0].metrics and "verdict" not in runs[1].metrics


def test_the_verdict_shows_on_the_cli_in_the_list_and_on_the_card(photos, tmp_path):
    lib = tmp_path / "lib"
    cmd = [sys.executable, "-m", "studio", "train", "textual-inversion", "--base", "tiny", "--images", str(photos),
           "--class-word", "cat", "--steps", "2", "--batch-size", "1", "--library", str(lib), "--name", "kit"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("verdict: "))
    assert "denoising gain over the class prompt" in line
    listed = subprocess.run([sys.executable, "-m", "studio", "concepts", "list", "--library", str(lib), "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = json.loads(listed.stdout)
    assert rows[0]["verdict"] == line.split(" (")[0].removeprefix("verdict: ")

    from studio.models import BaseSettings
    from studio.service import Studio
    from studio.ui import concepts
    from studio.ui.common import UIContext

    ctx = UIContext.create(Studio(BaseSettings(base="tiny"), library=lib), out_dir=tmp_path / "out")
    card = concepts.cards(ctx)[0]
    assert card["verdict"].startswith(line.split(" (")[0])
    assert card["verdict"].split(" (")[0] in concepts.cards_html([card])


def test_the_auto_budget_stops_on_a_plateau_only_once_learned_and_keeps_the_best_step():
    """A flat start (nothing learned yet) never stops the run; after the gain says "learned", two stale
    measurements do, and the best measured step's tensors come back. Its state survives a checkpoint."""
    from trainers.probe import AutoBudget

    class Probe:
        def __init__(self, gains):
            self.gains = iter(gains)

        def gain(self, trainer):
            return next(self.gains)

    x = torch.zeros(3)
    flat = AutoBudget(Probe([0.001] * 20), {"x": x}, every=10)
    assert not any(flat.measure(10 * (i + 1), None, {"x": x}) for i in range(20))  # never learned: to the cap
    gains = [0.0, 0.01, 0.02, LEARNED_GAIN + 0.05, LEARNED_GAIN + 0.052, LEARNED_GAIN + 0.04, LEARNED_GAIN + 0.03]
    watch = AutoBudget(Probe(gains), {"x": x}, every=10)
    stops = []
    for i, _ in enumerate(gains):
        x.fill_(float(i))  # the trained tensor at step 10 (i + 1)
        stops.append(watch.measure(10 * (i + 1), None, {"x": x}))
    assert stops == [False] * 6 + [True]  # best at 40, then 3 stale (50 is within min_delta: no improvement)
    watch.restore_best({"x": x})
    # the kept step is the latest one tied with the best (50: +0.002 over it, within min_delta), not 40
    assert torch.equal(x, torch.full((3,), 4.0)) and watch.record(70)["kept_step"] == 50
    assert watch.best_step == 40
    again = AutoBudget(Probe([]), {"x": x}, every=10)
    again.load_state(json.loads(json.dumps(watch.state())))
    assert again.state() == watch.state()


def test_auto_budget_runs_record_their_curve(tiny, photos, tmp_path):
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(photos), out=str(tmp_path / "c.safetensors"), class_word="cat", steps=6,
                        batch_size=1, log_every=0, budget="auto", probe_every=2, lr=0.0)
    result = train(entry, cfg, tiny)
    budget = load_concept(result.path).metrics["verdict"]["budget"]
    assert result.steps == budget["steps_run"] == 6  # flat, never learned: the cap (3 stale would stop a learned run)
    assert [p[0] for p in budget["curve"]] == [2, 4, 6] and budget["kept_step"] == 6  # lr 0: all tie, the latest is kept
    # nothing to watch without the probe: a fixed budget
    assert entry.resolve(images=str(photos), class_word="cat", budget="auto", probe=False).budget == "fixed"


def test_measuring_leaves_perfusions_running_statistics_alone(tiny, photos):
    """Perfusion keeps an EMA of the concept's encodings seen in training prompts: the probe's forward
    passes (concept and class prompts, the latter without the trigger) must neither feed it nor fail."""
    from trainers.loop import run_training
    from trainers.perfusion import PerfusionConfig, PerfusionTrainer

    runs = []
    for probe in (True, False):
        # the initialisation forced: with the probe, --init auto could choose another start
        cfg = PerfusionConfig(images=str(photos), class_word="cat", steps=2, batch_size=2, log_every=0, probe=probe,
                              init="plain")
        runs.append(run_training(tiny, PerfusionTrainer(tiny, cfg, "<pf>"), cfg, method="perfusion",
                                 save=False).concept)
    for k, v in runs[1].tensors.items():
        assert torch.equal(runs[0].tensors[k], v), k
    assert runs[0].metrics["verdict"]["verdict"] in ("learned", "weak", "not learned")
