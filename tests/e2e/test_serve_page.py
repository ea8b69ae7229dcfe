"""The server's web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
against a real ``mukv serve`` process (the server of ``tests/e2e/test_serve.py``): a file stream
picked from the list, its timeline growing, a question answered token by token with its retrieved
spans drawn on the timeline; a webcam stream from Chromium's fake camera over the WebSocket; an API
error shown on the page. Screenshots of each step go to ``$MUKV_TEST_ARTIFACTS`` (default
``build/test-artifacts``).

Every wait is bounded (Playwright timeouts); every request goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mukv.video.streams import eval_kinds, make_stream, write_stream_video
from tests.e2e import test_serve as serving

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (scripts/install.sh --dev installs Debian's)", allow_module_level=True)

# The module's server: the same fixture as tests/e2e/test_serve.py (one `mukv serve` per module).
server = serving.server

ROOT = Path(__file__).resolve().parents[2]
WAIT_MS = 30_000  # any single wait on the page, on a busy 2-core machine
# A file name a careless page would run as HTML: it must be shown as text and run nothing.
HOSTILE_NAME = '<img src=x onerror="window.__injected=1">.mp4'
# The stream of tests/e2e/test_serve.py's pushed stream: the default method (MuKV, three
# granularities) answers its questions right.
SEED = serving.PUSH_SEED


@pytest.fixture(scope="module")
def artifacts() -> Path:
    directory = Path(os.environ.get("MUKV_TEST_ARTIFACTS") or ROOT / "build" / "test-artifacts") / "serve-page"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def clip(server):
    """The video the page plays, and a copy under a hostile name."""
    stream = make_stream(8, seed=SEED, kinds=eval_kinds(SEED))
    video = write_stream_video(server.allowed / "page-clip.mp4", stream)
    shutil.copyfile(video, server.allowed / HOSTILE_NAME)
    return stream


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            timeout=WAIT_MS,
            # A fake camera (a moving test pattern) that needs no permission prompt; no proxy of the
            # environment between the browser and the server on 127.0.0.1.
            args=["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--no-proxy-server"],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    failures: list[str] = []
    opened.on("pageerror", lambda error: failures.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not failures, f"the page's script failed: {failures}"


def open_page(page: Page, server) -> None:
    """Open the page and give it the server's token."""
    page.goto("/")
    page.fill("#token", server.token)
    page.press("#token", "Tab")  # the page reads the token when it changes


def record_text_changes(page: Page) -> None:
    """Record every text the page sets on an answer's text and status (in order), so a test can see
    tokens arrive before the answer is done, however fast they come."""
    page.evaluate(
        """() => {
            window.__changes = [];
            new MutationObserver((records) => {
                for (const record of records) {
                    const part = record.target.classList && record.target.classList[0];
                    if (!["text", "status"].includes(part)) continue;
                    for (const node of record.addedNodes) window.__changes.push([part, node.textContent]);
                }
            }).observe(document.getElementById("answers"), {childList: true, subtree: true});
        }"""
    )


def percent(style: str, name: str) -> float:
    """A ``left`` or ``width`` of an inline style, in percent."""
    return float(re.search(rf"(?:^|;)\s*{name}:\s*([\d.]+)%", style).group(1))


def test_a_file_stream_is_played_and_answered_on_the_page(page, server, clip, artifacts):
    page.goto("/")
    # No token yet: the page says why it cannot list the files.
    expect(page.locator("#errors .error[data-code=unauthorized]")).to_have_count(1)
    expect(page.locator("#errors .error .message")).to_contain_text("listing the video files: missing or wrong token")
    page.screenshot(path=artifacts / "00-no-token.png", full_page=True)
    page.fill("#token", server.token)
    page.press("#token", "Tab")
    expect(page.locator("#errors .error")).to_have_count(0)
    options = page.locator("#file-select option")
    expect(options).to_have_count(2)
    assert page.eval_on_selector_all("#file-select option", "all => all.map(o => o.value)") == [
        HOSTILE_NAME,
        "page-clip.mp4",
    ]
    assert page.evaluate("window.__injected") is None and page.locator("#file-select img").count() == 0
    expect(page.locator("#server-status")).to_have_text("model mukv-tiny")
    page.screenshot(path=artifacts / "01-sources.png", full_page=True)

    # 16 s of video at four times real time: about 4 s of playing, read by the page every second.
    page.evaluate(
        """() => {
            window.__frames = [];
            new MutationObserver(() => window.__frames.push(Number(document.getElementById("timeline").dataset.frames)))
                .observe(document.getElementById("timeline"), {attributes: true, attributeFilter: ["data-frames"]});
        }"""
    )
    page.select_option("#file-select", "page-clip.mp4")
    page.fill("#file-fps", "0.5")
    page.fill("#file-speed", "4")
    page.click("#file-start")
    expect(page.locator("#stream-id")).to_have_text(re.compile(r"^st_"))
    stream_id = page.text_content("#stream-id")
    page.wait_for_function("() => Number(document.getElementById('timeline').dataset.frames) >= 1")
    page.screenshot(path=artifacts / "02-file-playing.png", full_page=True)
    expect(page.locator("#stream-info dd[data-field=state]")).to_have_text("ended")
    expect(page.locator("#stream-info dd[data-field=frames]")).to_contain_text("8 received · 8 encoded")
    grown = page.evaluate("window.__frames")
    assert grown[-1] == 8 and any(0 < n < 8 for n in grown), f"the timeline never showed it growing: {grown}"
    assert percent(page.get_attribute("#timeline .encoded", "style"), "width") > 80
    expect(page.locator(f"#stream-list li[data-stream={stream_id}]")).to_have_class("selected")

    question = clip.questions[0]
    record_text_changes(page)
    page.fill("#question", question.question)
    page.fill("#max-tokens", "6")
    page.click("#ask")
    answer = page.locator(".answer").first
    expect(answer).to_have_class(re.compile(r"\bdone\b"))
    expect(answer.locator(".text")).to_have_text(question.answer)
    changes = page.evaluate("window.__changes")
    streamed = [text for part, text in changes if part == "text"]
    assert ["status", "answering…"] in changes and len(streamed) >= 2, changes
    assert streamed[0] and streamed[-1] == question.answer, changes

    # The spans drawn are the ones the server retrieves for this question, where it says they are.
    with server.client() as http:
        _, done = serving.ask(http, stream_id, question.question)
    expected = sorted((s["granularity"], s["first_frame"], s["last_frame"]) for s in done["retrieved"])
    assert len({g for g, _, _ in expected}) >= 2, expected  # MuKV retrieves more than one granularity
    spans = page.locator("#timeline .lane .span")
    expect(spans).to_have_count(len(expected))
    drawn = spans.evaluate_all(
        """all => all.map(s => [s.dataset.granularity, Number(s.dataset.firstFrame), Number(s.dataset.lastFrame),
                                s.getAttribute("style"), getComputedStyle(s).backgroundColor])"""
    )
    assert sorted(d[:3] for d in drawn) == [list(e) for e in expected]
    extent = float(page.text_content("#timeline-end").removesuffix(" s"))
    by_frames = {(s["granularity"], s["first_frame"], s["last_frame"]): s for s in done["retrieved"]}
    legend = "all => all.map(li => [li.dataset.granularity, getComputedStyle(li.firstChild).backgroundColor])"
    swatches = dict(page.locator("#legend li").evaluate_all(legend))
    for granularity, first, last, style, colour in drawn:
        span = by_frames[(granularity, first, last)]
        assert percent(style, "left") == pytest.approx(100 * span["start_time"] / extent, abs=0.1)
        width = 100 * (span["end_time"] - span["start_time"]) / extent
        assert percent(style, "width") == pytest.approx(width, abs=0.1)
        assert colour == swatches[granularity], (granularity, colour, swatches)
    assert len(set(swatches.values())) == len(swatches)  # one colour per granularity
    rows = answer.locator("table.retrieved tbody tr")
    expect(rows).to_have_count(len(expected))
    page.screenshot(path=artifacts / "03-file-answered.png", full_page=True)

    page.click("#stream-stop")
    expect(page.locator(f"#stream-list li[data-stream={stream_id}]")).to_have_count(0)


def test_a_webcam_stream_sends_frames_and_answers_over_the_websocket(page, server, artifacts):
    http_questions: list[str] = []
    page.on("request", lambda request: "/questions" in request.url and http_questions.append(request.url))
    open_page(page, server)
    page.fill("#webcam-fps", "2")
    page.click("#webcam-start")
    expect(page.locator("#preview")).to_be_visible()
    # Ticks are drawn from the socket's "frames" messages; the counters from its "stream" messages.
    page.wait_for_function("() => document.querySelectorAll('#timeline .tick').length >= 3")
    page.wait_for_function("() => Number(document.getElementById('timeline').dataset.frames) >= 3")
    page.screenshot(path=artifacts / "04-webcam-streaming.png", full_page=True)

    record_text_changes(page)
    page.fill("#question", "What colour was the star?")
    page.fill("#max-tokens", "4")
    page.click("#ask")
    answer = page.locator(".answer").first
    expect(answer).to_have_class(re.compile(r"\bdone\b"))
    assert answer.locator(".text").text_content().strip()
    changes = page.evaluate("window.__changes")
    assert ["status", "answering…"] in changes, changes
    expect(page.locator("#timeline .lane .span").first).to_be_visible()
    assert not http_questions, "the webcam stream's question went over HTTP, not its WebSocket"
    stream_id = page.text_content("#stream-id")
    with server.client() as http:
        frames = serving.info(http, stream_id)["frames"]
    assert frames["received"] >= 3 and frames["dropped"] == 0, frames
    page.screenshot(path=artifacts / "05-webcam-answered.png", full_page=True)

    page.click("#stream-stop")
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator(f"#stream-list li[data-stream={stream_id}]")).to_have_count(0)


def test_api_errors_are_shown_on_the_page(page, server, artifacts):
    open_page(page, server)
    page.fill("#url-input", "http://127.0.0.1:9/live")
    page.click("#url-start")
    error = page.locator("#errors .error[data-code=scheme_not_allowed]")
    expect(error).to_be_visible()
    expect(error.locator(".message")).to_contain_text("URL scheme 'http' is not allowed")
    expect(error.locator(".message")).to_contain_text("(field: source)")
    expect(page.locator("#stream-id")).to_have_text("none")
    page.screenshot(path=artifacts / "06-api-error.png", full_page=True)
