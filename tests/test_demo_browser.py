"""The demo in a real browser: headless Chromium (the Debian package, never a downloaded build) driven by Playwright.

The test starts the app itself (in this process, on a free local port) and the browser. Set
``VLM_ACCEL_DEMO_SCREENSHOT=docs/img/demo.png`` to also write the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install '.[demo]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")

from vlm_accel.demo.app import build_app, launch  # noqa: E402
from vlm_accel.demo.controls import base_config  # noqa: E402
from vlm_accel.demo.runner import SlotPool, run_request  # noqa: E402
from vlm_accel.errors import MethodNotApplicable  # noqa: E402
from vlm_accel.registry import list_methods  # noqa: E402

# gradio's queue calls pandas options that pandas 3 deprecates: not ours, and noisy
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning")]  # fmt: skip
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
SEED = 3  # the scene the tests draw (question family from the seed)
TIMEOUT_MS = 120_000


def _chromium() -> str | None:
    for path in (os.environ.get("VLM_ACCEL_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if path and Path(path).is_file():
            return path
    return None


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(build_app(SlotPool("testbed-l", slots=2), repeats=1), port=port, host="127.0.0.1", block=False)
    yield app
    app.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("no system Chromium (apt-get install chromium); .ci/run installs it")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


def _open(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.local_url)
    page.wait_for_selector("#run")
    return page


def _draw_scene(page, seed: int = SEED) -> None:
    page.locator("#scene-seed input").fill(str(seed))
    page.click("#draw-seed")
    page.wait_for_function("document.querySelector('#question textarea').value.length > 0")
    page.wait_for_selector("#preview img")


def _pick(page, picker: str, method: str) -> None:
    page.locator(f"#{picker}").get_by_label(method, exact=True).check()


def _run(page) -> None:
    """Click Run and wait for this request's reply (the page numbers its requests: a done marker or an error)."""
    number = page.evaluate("window.__demoRequests = (window.__demoRequests || 0) + 1")
    page.click("#run")
    page.wait_for_selector(f"#status [data-request='{number}']")


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def test_page_loads_with_every_method_and_no_outside_request(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
            else None)  # fmt: skip
    page.goto(server.local_url, timeout=TIMEOUT_MS)
    page.wait_for_selector("#run", timeout=TIMEOUT_MS)
    assert page.locator("h1").first.inner_text().startswith("vlm_accel demo")
    labels = page.locator("#method-a label").all_inner_texts()
    assert sorted(t.strip() for t in labels) == sorted(list_methods())
    # not "networkidle": gradio keeps its queue stream open while page-load events are queued behind other work
    page.wait_for_load_state("load", timeout=TIMEOUT_MS)
    page.wait_for_timeout(2_000)  # late asset requests (fonts, analytics) would be issued by now
    assert outside == []  # no fonts, analytics or CDN: the page works offline
    page.close()


@pytest.mark.parametrize("method", ["fastv", "pai"])
def test_question_on_a_scene(browser, server, method, tmp_path):
    page = _open(browser, server)
    _draw_scene(page)
    assert "Ground truth" in page.locator("#truth").inner_text()
    _pick(page, "method-a", method)
    _run(page)
    assert page.locator("#status .demo-error").count() == 0, page.locator("#status").inner_text()
    assert _value(page, "answer-base") and _value(page, "answer-patched")
    overlay = page.locator("#overlay img")
    overlay.wait_for()
    assert page.evaluate("document.querySelector('#overlay img').naturalWidth") > 100
    kept = page.locator("#kept").inner_text()
    assert ("64/256 from layer 2" in kept) if method == "fastv" else ("all 256" in kept)
    page.locator("#speed img").wait_for()
    page.locator("#layers img").wait_for()
    shot = tmp_path / f"demo-{method}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1280
    target = os.environ.get("VLM_ACCEL_DEMO_SCREENSHOT")
    if target and method == "fastv":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target, full_page=True)
    page.close()


def _expect_error(page, text: str) -> None:
    page.wait_for_selector("#status .demo-error")
    message = page.locator("#status .demo-error").inner_text()
    assert text in message, message
    assert not _value(page, "answer-patched")  # no stale answer next to an error


def test_bad_inputs_show_a_message_and_the_app_keeps_serving(browser, server, tmp_path):
    page = _open(browser, server)
    upload = page.locator("#upload input[type=file]")
    _run(page)  # nothing uploaded
    _expect_error(page, "upload an image")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    Image.new("L", (8000, 8000)).save(tmp_path / "huge.png")
    for name, text in (("notes.txt", "not an image file"), ("tiny.png", "1×1 pixels"), ("huge.png", "8000×8000")):
        upload.set_input_files(str(tmp_path / name))
        page.wait_for_selector(f"#status .demo-error:has-text('{text}')")  # shown as soon as the file arrives
        _run(page)
        _expect_error(page, text)  # and again on Run
        page.locator("#upload button[aria-label='Clear']").first.click()
    _draw_scene(page)
    page.locator("#question textarea").fill("")
    _run(page)
    _expect_error(page, "type a question")
    page.locator("#question textarea").fill("what " * 2000)
    _run(page)
    _expect_error(page, "limit is 500")
    page.locator("#question textarea").fill("what color is the circle ?")
    page.locator("#param-a-fastv-keep_ratio input").fill("1.5")
    _run(page)
    _expect_error(page, "keep_ratio must be in (0, 1]")
    page.locator("#param-a-fastv-keep_ratio input").fill("0.25")
    _pick(page, "method-b", "pool")  # pooling a pruned grid is ill-defined: refused with the reason
    _run(page)
    _expect_error(page, "cannot be composed")
    _pick(page, "method-b", "none")
    _run(page)  # the same page, a good request: still serving
    assert page.locator("#status .demo-error").count() == 0
    assert _value(page, "answer-patched")
    page.close()


def test_eight_concurrent_requests_match_the_same_requests_alone(browser, server):
    methods = list_methods()[:8]
    question = None
    pages = []
    for method in methods:
        page = _open(browser, server)
        _draw_scene(page)
        question = page.locator("#question textarea").input_value()
        _pick(page, "method-a", method)
        pages.append(page)
    for page in pages:  # all eight submitted before any is awaited
        page.click("#run")
    together = []
    for page in pages:
        page.wait_for_selector("#status [data-request='1']")
        together.append((_value(page, "answer-base"), _value(page, "answer-patched"),
                         page.locator("#kept").inner_text(), page.locator("#status").inner_text()))  # fmt: skip
        page.close()
    alone_pool = SlotPool("testbed-l", slots=1)
    image = Image.open(_scene_file(server)).convert("RGB")
    for method, got in zip(methods, together):
        try:
            result = run_request(alone_pool, image, question, [base_config(method)], 8, repeats=1)
        except MethodNotApplicable as err:
            assert str(err) in got[3], (method, got)
            continue
        from vlm_accel.demo.app import _kept_line

        assert got[:3] == (result.base.answer, result.patched.answer, _kept_line(result)), method


def _scene_file(server) -> Path:
    files = sorted(Path(server.scene_dir).glob(f"scene-{SEED}-*.png"))
    assert files, "the scene was not drawn"
    return files[0]
