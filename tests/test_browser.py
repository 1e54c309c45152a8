"""The studio as users run it: ``python app.py`` in a subprocess, driven in headless Chromium.

* Chromium is Debian's (``apt-get install -y chromium`` → ``/usr/bin/chromium``), driven by the
  ``playwright`` Python package with ``executable_path`` — nothing is downloaded at test time; the
  browser test skips (with the reason) only when ``/usr/bin/chromium`` is absent.
* The app runs on the offline demo base when the demo world is built, else on ``tiny``
  (``STUDIO_BASE``, set here), on a free localhost port, with a fresh library holding the shipped
  example concepts (``concepts/``, as a fresh clone's default library does).
* Screenshots of every tab go to ``test-artifacts/browser/`` (git-ignored), full page, and at the
  window's size to ``test-artifacts/browser/window/`` (the README's ``docs/screenshots/`` are copies).

The restart test needs no browser: it stops the app mid-job (SIGTERM), starts it again and checks
that the job resumes from its checkpoint and publishes its concept exactly once.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import write_photos

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TI = "textual-inversion"
FORM = f"train-{TI}"


# ----------------------------------------------------------------------------------------------
# The app in a subprocess
# ----------------------------------------------------------------------------------------------


def demo_world_built() -> bool:
    try:
        from studio.world import DEMO_BASE_DIR, ORACLE_PATH
    except ImportError:
        return False
    return (Path(DEMO_BASE_DIR) / "model_index.json").is_file() and Path(ORACLE_PATH).is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_app(library: Path, port: int, log: Path, base: str, allow: Path | None = None) -> subprocess.Popen[bytes]:
    """``allow``: a folder the page may name local models under (app.py --allow-path: the tests' CLIP judge)."""
    env = dict(os.environ, STUDIO_BASE=base, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", STUDIO_ALLOW_PATHS=str(allow or ""))
    env.pop("SPACE_ID", None)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "app.py"), "--library", str(library), "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(library.parent))


def stop_app(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")


def serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("photos"))


# ----------------------------------------------------------------------------------------------
# In Chromium
# ----------------------------------------------------------------------------------------------


def _need_chromium() -> None:
    """Without Chromium the browser tests skip on a developer's machine, but fail where it is
    required (``.ci/run`` sets STUDIO_REQUIRE_BROWSER=1 after installing it)."""
    if CHROMIUM.is_file():
        return
    message = f"{CHROMIUM} is absent: install Debian's Chromium (apt-get install -y chromium) to run the browser tests"
    if os.environ.get("STUDIO_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_chromium()
    from playwright.sync_api import sync_playwright  # requirements-dev.txt; no browser download is needed

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="studio-chromium-"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        try:
            yield context
        finally:
            context.close()




@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> Iterator[str]:
    _need_chromium()
    root = tmp_path_factory.mktemp("app")
    log = root / "app.log"
    port = free_port()
    library = root / "library"
    library.mkdir()
    for example in (REPO / "concepts").glob("*"):  # the shipped examples: a fresh clone's default library
        if example.suffix in (".safetensors", ".png"):
            shutil.copy2(example, library / example.name)
    proc = start_app(library, port, log, "demo" if demo_world_built() else "tiny",
                     allow=tmp_path_factory.getbasetemp())
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: serving(url), 240, "the app to serve its page", proc, log)
        yield url
    finally:
        stop_app(proc)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "app.log").write_bytes(log.read_bytes())


def shot(page: Any, name: str) -> None:
    (ARTIFACTS / "window").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "window" / f"{name}.png"))


def choose(page: Any, dropdown: str, option: str) -> None:
    page.locator(f"#{dropdown} input").click()
    page.locator(f"#{dropdown}").get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def set_number(page: Any, elem: str, value: str) -> None:
    """Type ``value`` into a number box; again if the page put its old value back meanwhile (a box in an
    accordion that has just opened is mounted with the server's value a moment later)."""
    box = page.locator(f"#{elem} input[type=number]").first
    for _ in range(5):
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(300)
        if box.input_value() == value:
            return
    raise AssertionError(f"#{elem} does not keep the value {value} (it shows {box.input_value()})")


def test_the_studio_end_to_end_in_chromium(browser, app_url, photos, clip_dir):
    """Generate, train (textual inversion, a few steps), watch it finish, find the concept in the
    library, generate with it (and an X/Y grid), evaluate it — with a screenshot of every tab."""
    from playwright.sync_api import expect

    demo = demo_world_built()
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(app_url, wait_until="domcontentloaded")
    page.wait_for_selector("#gen-go", timeout=60_000)
    expect(page.locator("#base-banner")).to_contain_text("demo" if demo else "tiny")

    # 0. First open: the example concepts are listed in the library (on the demo world they fit the base).
    examples = sorted(p.stem for p in (REPO / "concepts").glob("*.safetensors"))
    assert examples, "no example concepts in concepts/: python scripts/build_example_concepts.py"
    page.get_by_role("tab", name="Concepts").click()
    cards = page.locator("#concepts-cards")
    for name in examples:
        expect(cards).to_contain_text(name, timeout=10_000)
    if not demo:
        expect(cards).to_contain_text("for another base")
    shot(page, "0-concepts-examples")
    page.get_by_role("tab", name="Generate").click()

    # 1. Generate: an image, downloadable as a PNG that keeps its parameters.
    if demo:  # the first example prompt is in the world's vocabulary
        expect(page.locator("#gen-prompt textarea")).to_have_value(re.compile("a photo of a .* background"))
    page.locator("#gen-prompt textarea").fill("a photo of a cat")
    set_number(page, "gen-steps", "2")
    page.locator("#gen-go").click()
    expect(page.locator("#gen-info")).to_contain_text("1/1", timeout=120_000)
    expect(page.locator("#gen-gallery img").first).to_be_visible()
    # small images are enlarged without the browser's smoothing
    assert page.locator("#gen-gallery img").first.evaluate("e => getComputedStyle(e).imageRendering") in (
        "pixelated", "crisp-edges")
    href = page.locator("#gen-files a").first.get_attribute("href")
    png = Image.open(BytesIO(page.request.get(href if href.startswith("http") else app_url + href.lstrip("/")).body()))
    assert png.format == "PNG" and "Steps: 2" in png.text["parameters"] and "Seed: 0" in png.text["parameters"]
    if demo:
        assert png.size == (32, 32)  # the download is the image as rendered; the page shows it enlarged
    if demo:  # the example with two example concepts: both applied in one generation
        page.locator("#gen-examples").get_by_text(re.compile(r"<.*> <.*>")).first.click()
        set_number(page, "gen-steps", "20")  # the world's own sampling (32 px: a second)
        page.locator("#gen-go").click()
        expect(page.locator("#gen-info")).to_contain_text(re.compile(r"\(world-\w+\).*\(world-\w+\)"),
                                                          timeout=120_000)
    shot(page, "1-generate")

    # 2. Train: textual inversion, a few steps, tiny images; watch progress until done.
    page.get_by_role("tab", name="Train").click()
    page.locator(f"#{FORM}-class_word textarea").fill("cat")
    page.locator(f"#{FORM}-name textarea").fill("kitty")
    set_number(page, f"{FORM}-steps", "4")
    page.locator(f"#{FORM}-group-training").get_by_text("Training").click()  # advanced options start collapsed
    batch_box = page.locator(f"#{FORM}-batch_size input[type=number]").first
    expect(batch_box).to_be_visible()
    set_number(page, f"{FORM}-batch_size", "1")
    expect(batch_box).to_have_value("1")
    page.locator(f"#{FORM}-group-previews").get_by_text("Previews").click()
    # the value must stick: a preset re-applied at page load once reset it to 0 (no previews, no card image)
    preview_box = page.locator(f"#{FORM}-preview_every input[type=number]").first
    expect(preview_box).to_have_value("0")
    set_number(page, f"{FORM}-preview_every", "2")
    expect(preview_box).to_have_value("2")
    page.locator("#train-images input[type=file]").set_input_files([str(p) for p in photos])
    expect(page.locator("#train-images a")).to_have_count(3)  # uploaded (one download link each)
    # the dataset step: inspect the uploads (the report names what to fix), masks from the offline segmenter
    page.locator("#train-dataset").get_by_text("Prepare the photos").click()
    page.locator("#train-inspect").click()
    expect(page.locator("#train-inspect-report")).to_contain_text("3 image(s)", timeout=60_000)
    expect(page.locator("#train-inspect-report")).to_contain_text("under 512")
    page.locator("#train-mask").click()
    expect(page.locator("#train-dataset-note")).to_contain_text("3 mask(s) written", timeout=60_000)
    # "Copy CLI command": the command line that builds the same config (tests/test_ui.py checks every field)
    page.locator(f"#{FORM}-name textarea").click()  # leave the last number box: its value is committed on blur
    page.locator("#train-cli-go").click()
    expect(page.locator("#train-cli")).to_contain_text("python -m studio train textual-inversion")
    expect(page.locator("#train-cli")).to_contain_text("--preview-every 2")
    command = page.locator("#train-cli .cm-content").inner_text()
    from studio.cli import build_parser

    ns = build_parser().parse_args(shlex.split(command)[3:])
    assert (ns.steps, ns.batch_size, ns.name, ns.class_word, ns.preview_every) == (4, 1, "kitty", "cat", 2), command
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("Job 1")
    expect(page.locator("#train-status")).to_contain_text("done", timeout=240_000)
    expect(page.locator("#train-status")).to_contain_text("step 4/4")
    expect(page.locator("#train-log textarea")).to_have_value(re.compile("published"))
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    shot(page, "2-train")

    # 3. Jobs: the queue shows the finished job.
    page.get_by_role("tab", name="Jobs").click()
    expect(page.locator("#jobs-table")).to_contain_text("kitty", timeout=10_000)
    expect(page.locator("#jobs-table")).to_contain_text("done")
    shot(page, "3-jobs")

    # 4. Concepts: the new concept's card.
    page.get_by_role("tab", name="Concepts").click()
    cards = page.locator("#concepts-cards")
    expect(cards).to_contain_text("kitty", timeout=10_000)
    expect(cards).to_contain_text("<kitty>")
    expect(cards.locator("img").first).to_be_visible()
    shot(page, "4-concepts")

    # 5. Generate with the concept: its strength slider, its trigger in the PNG parameters.
    page.get_by_role("tab", name="Generate").click()
    choose(page, "gen-concepts", "kitty")
    expect(page.locator("#gen-strength-0")).to_be_visible()
    page.locator("#gen-prompt textarea").fill("a photo of <kitty>")
    set_number(page, "gen-steps", "2")
    page.locator("#gen-go").click()
    expect(page.locator("#gen-info")).to_contain_text("(kitty)", timeout=120_000)
    # an X/Y grid: the concept's strength (0, 0.5, 1) × seed (0, 1)
    page.get_by_text("X/Y grid").click()
    page.locator("#grid-x textarea").fill("0, 0.5, 1")
    page.locator("#grid-y textarea").fill("0, 1")
    page.locator("#grid-go").click()
    expect(page.locator("#grid-image img")).to_be_visible(timeout=120_000)
    shot(page, "5-generate-with-concept")

    # 5b. Compare: two concepts side by side, same prompts and seeds, with their scores.
    page.get_by_role("tab", name="Compare").click()
    choose(page, "compare-a", "kitty")
    choose(page, "compare-b", examples[0] if demo else "kitty")
    set_number(page, "compare-seeds", "1")
    set_number(page, "compare-steps", "0" if demo else "2")  # 0: the base's own steps (the world's: 20)
    page.locator("#compare-go").click()
    expect(page.locator("#compare-image img")).to_be_visible(timeout=180_000)
    expect(page.locator("#compare-table")).to_contain_text("kitty")
    shot(page, "5b-compare")

    # 6. Zero-shot: the tab renders (the form, or the note when the method is missing).
    page.get_by_role("tab", name="Zero-shot").click()
    page.wait_for_timeout(500)
    shot(page, "6-zero-shot")

    # 7. Evaluate: the demo world's oracle on the demo base; a tiny CLIP and reference photos on tiny.
    page.get_by_role("tab", name="Evaluate").click()
    choose(page, "eval-concepts", "kitty")
    set_number(page, "eval-seeds", "1")
    if demo:
        choose(page, "eval-protocol", "world")
    else:
        choose(page, "eval-protocol", "prompts below")
        page.locator("#eval-prompts textarea").fill("a photo of {}")
        page.locator("#eval-clip textarea").fill(str(clip_dir))
        page.locator("#eval-refs input[type=file]").set_input_files([str(p) for p in photos])
        expect(page.locator("#eval-refs a")).to_have_count(3)
        set_number(page, "eval-steps", "2")
    page.locator("#eval-go").click()
    expect(page.locator("#eval-text")).to_contain_text("Evaluated", timeout=180_000)
    expect(page.locator("#eval-table")).to_contain_text("fidelity" if demo else "clip_i")
    expect(page.locator("#eval-plot img")).to_be_visible()
    shot(page, "7-evaluate")
    page.close()


# ----------------------------------------------------------------------------------------------
# Restart: stop the app mid-job, start it again (no browser needed)
# ----------------------------------------------------------------------------------------------


def test_stopping_the_app_mid_job_then_restarting_finishes_the_job_once(photos, tmp_path):
    from studio.jobs import JobQueue

    library = tmp_path / "lib"
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    queue = JobQueue(library)
    steps = 30
    job = queue.submit(TI, {"images": str(folder), "class_word": "cat", "name": "restart", "steps": steps,
                            "checkpoint_every": 2, "batch_size": 1, "lr": 5e-2, "log_every": 0}, "tiny")
    log = tmp_path / "app.log"
    app = start_app(library, free_port(), log, "tiny")
    try:
        wait_for(lambda: queue.get(job.id).step >= 3, 240, "the job to pass step 3", app, log)
        app.send_signal(signal.SIGTERM)  # stop the app: the worker checkpoints and gives the job back
        app.wait(90)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    stopped = queue.get(job.id)
    assert stopped.state == "queued" and 3 <= stopped.step < steps, (stopped.state, stopped.step, log.read_text()[-2000:])
    assert not (library / "restart.safetensors").exists()

    app = start_app(library, free_port(), log, "tiny")
    try:
        done = wait_for(lambda: (j := queue.get(job.id)).state in ("done", "failed") and j, 300,
                        "the job to finish after the restart", app, log)
    finally:
        stop_app(app)
    assert done.state == "done", done.error
    messages = [e.text() for e in queue.events(job.id)]
    resumed = [m for m in messages if "resuming at step" in m]
    assert resumed and int(resumed[-1].rsplit(" ", 1)[1]) >= 3, messages
    assert sum(m.startswith("done: published") for m in messages) == 1, messages
    assert sorted(p.name for p in library.glob("*.safetensors")) == ["restart.safetensors"]
    assert [s for s, _ in queue.loss_curve(job.id)] == list(range(1, steps + 1))
