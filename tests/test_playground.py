"""The web playground (``GET /``, ``static/``) end to end in real headless Chromium against the running server.

Debian's ``/usr/bin/chromium`` driven by Playwright's Python package (never ``playwright install``: its own
browser download fails offline). Without either, every test here skips with the reason; ``scripts/
install_browser.sh`` installs both. The model is the scripted double, so the page sees exact replies.
Screenshots (the desktop page after a session, and a 390-px phone) are kept as test artifacts in
``out/playground/`` at the repository root (git-ignored), or in ``$PLAYGROUND_SCREENSHOT_DIR``.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import REPO_ROOT
from shared import Settings
from support import running_server, scripted_loader

CHROMIUM = os.environ.get("PLAYGROUND_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless as root, and no background traffic: this machine's closed network refuses Chromium's own
# connections (updates, sync, QUIC probes), which would otherwise show up as non-local requests.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
API_KEY = "playground-test-key-0123456789"
TIMEOUT_MS = 15_000
PHONE = {"width": 390, "height": 844}  # a 390-px wide phone (iPhone 12-15), portrait


def screenshot_path(name: str) -> str:
    """Where a screenshot is kept after the run (a test artifact; ``out/`` is git-ignored)."""
    folder = os.environ.get("PLAYGROUND_SCREENSHOT_DIR") or str(REPO_ROOT / "out" / "playground")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)

WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "London"}}\n</tool_call>'
HELLO = "Hello! This answer streams in word by word, one token at a time. The end."
LONG_STORY = "once upon a time " * 200
STORY = "once upon a time " * 40
MARKUP = '<b id="injected">bold</b><img src="x" onerror="window.__xss = 1">'


def respond(prompt: str) -> str:
    """The scripted model, keyed on the last user turn (tool responses come back in a user turn)."""
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
    if "<tool_response>" in last:
        result = last.split("<tool_response>", 1)[1].split("</tool_response>", 1)[0].strip()
        return f"The tool says {result}, so take a coat."
    if "weather" in last:
        return WEATHER_CALL
    if "long story" in last:
        return LONG_STORY
    if "a story" in last:
        return STORY
    if "echo" in last:
        return "You said: " + last
    return HELLO


def sync_playwright_or_skip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install playwright (or scripts/install_browser.sh); "
                    "it drives Debian's chromium, so never run `playwright install`")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"chromium not installed at {CHROMIUM}: apt-get install chromium (or scripts/install_browser.sh)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = sync_playwright_or_skip()
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def base_settings(tiny_model_dir, tmp_path_factory) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "server.log"),
                    kv_block_size=16, max_context=4096, max_batch=8, prefill_chunk=256)


@pytest.fixture(scope="module")
def server(browser, base_settings):  # `browser` first, so a skip costs no model load
    holder: dict = {}
    with running_server(base_settings, scripted_loader(respond, step_delay=0.01, holder=holder)) as app:
        app.model = holder["model"]
        app.model_name = os.path.basename(base_settings.model_id)
        yield app


class Page:
    """A browser tab on the playground that records every request it makes and every script error."""

    def __init__(self, browser: Any, app: Any, viewport: dict[str, int] | None = None) -> None:
        self.context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.requests: list[Any] = []
        self.sockets: list[str] = []
        self.script_errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("websocket", lambda ws: self.sockets.append(ws.url))
        self.page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.goto(f"http://{app.base}/")

    def _console(self, message: Any) -> None:
        # A 4xx answer to fetch() is logged by the browser itself; anything else (a CSP violation, an
        # exception) is a bug in the page.
        if message.type == "error" and "status of 4" not in message.text:
            self.script_errors.append(message.text)

    def by(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    def create_session(self) -> None:
        from playwright.sync_api import expect

        self.by("create-session").click()
        expect(self.by("connection-status")).to_have_text("connected")

    def send(self, text: str) -> Any:
        """Send a message; returns the locator of its assistant turn."""
        from playwright.sync_api import expect

        expect(self.by("send")).to_be_enabled()
        turns = self.by("turn").count()
        self.by("message").fill(text)
        self.by("send").click()
        expect(self.by("turn")).to_have_count(turns + 1)
        return self.by("turn").nth(turns)

    def external_requests(self) -> list[str]:
        urls = [r.url for r in self.requests] + self.sockets
        return [u for u in urls if urlsplit(u).scheme not in ("data", "about", "blob")
                and urlsplit(u).hostname not in LOCAL_HOSTS]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, server) -> Iterator[Page]:
    page = Page(browser, server)
    yield page
    page.close()


def stat(turn: Any, name: str) -> str:
    return turn.get_by_test_id(f"stat-{name}").locator(".stat-value").inner_text()


def test_chat_tool_call_and_cancel(tab: Page, server) -> None:
    from playwright.sync_api import expect

    page = tab.page
    expect(page).to_have_title(re.compile("Qwen2.5 playground"))
    # The header names the served model (the tiny model's directory) and says it is the CPU fallback.
    expect(tab.by("model-id")).to_have_text(server.model_name)
    expect(tab.by("cpu-fallback")).to_have_text("CPU fallback")
    expect(tab.by("cpu-fallback")).to_have_attribute("title", re.compile("no CUDA GPU"))
    # The empty transcript says what to do; the composer says a session comes first.
    expect(tab.by("empty-hint")).to_be_visible()
    expect(tab.by("empty-hint")).to_contain_text("Create session")
    expect(tab.by("message")).to_have_attribute("placeholder", re.compile("Create a session first"))

    # Tools are checked as JSON before anything is sent; the server's 4xx details are shown.
    tools = tab.by("tools-json").input_value()
    tab.by("tools-json").fill("[{not json")
    tab.by("create-session").click()
    expect(tab.by("settings-error")).to_contain_text("Tools is not valid JSON")
    tab.by("tools-json").fill('[{"name": "bad name!", "parameters": {"type": "object"}}]')
    tab.by("create-session").click()
    expect(tab.by("error").last).to_contain_text("HTTP 422 invalid_request")
    expect(tab.by("error").last).to_contain_text("tools.0.name")
    tab.by("tools-json").fill(tools)  # the default: get_weather
    tab.create_session()
    expect(tab.by("message")).to_have_attribute("placeholder", re.compile("Enter sends"))
    session_id = tab.by("session-id").inner_text().removeprefix("session ")
    assert len(session_id) == 36 and page.inner_text("body").count(session_id) == 1  # shown once
    expect(tab.by("note").last).to_have_text("New session with 1 tool(s): get_weather.")

    # A streamed answer: record the answer's length at every DOM change to see it grow chunk by chunk.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('[data-testid=answer]');
            if (answers.length) window.__lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true});
    }""")
    turn = tab.send("hello there")
    expect(tab.by("empty-hint")).to_be_hidden()
    expect(turn.get_by_test_id("stat-finish")).to_have_text("stop")
    expect(turn.get_by_test_id("answer")).to_have_text(HELLO)
    lengths = page.evaluate("window.__lengths")
    growth = sorted(set(lengths))
    assert len(growth) >= 5 and growth[-1] == len(HELLO), lengths
    assert int(stat(turn, "prompt")) > 0 and int(stat(turn, "completion")) > 0
    assert stat(turn, "ttfc").endswith(("ms", " s")) and float(stat(turn, "tps")) > 0

    # A tool call answered through its card: a malformed result is caught before sending.
    turn = tab.send("What is the weather like in London?")
    card = turn.get_by_test_id("tool-card")
    expect(card.get_by_test_id("tool-name")).to_have_text("get_weather")
    expect(card.get_by_test_id("tool-args")).to_contain_text('"location": "London"')
    expect(tab.by("cancel")).to_be_enabled()
    card.get_by_test_id("tool-result-input").fill("sunny")
    card.get_by_test_id("tool-submit").click()
    expect(card.get_by_test_id("tool-error")).to_contain_text("not valid JSON")
    card.get_by_test_id("tool-result-input").fill('{"temperature": "15°C", "condition": "Cloudy"}')
    card.get_by_test_id("tool-submit").click()
    expect(turn.get_by_test_id("stat-finish")).to_have_text("stop")
    expect(turn.get_by_test_id("answer")).to_contain_text('"temperature": "15°C"')
    expect(turn.get_by_test_id("answer")).to_contain_text("so take a coat.")
    assert int(stat(turn, "cached")) > 0  # the continuation after the tool result reused the warm cache
    expect(turn.get_by_test_id("stat-tool-wait")).to_be_visible()

    # Canned results answer a call without a click.
    tab.by("canned-json").fill('{"get_weather": {"temperature": "21°C"}}')
    turn = tab.send("and the weather tomorrow?")
    expect(turn.get_by_test_id("tool-status")).to_have_text("answered automatically from canned results")
    expect(turn.get_by_test_id("answer")).to_contain_text('"temperature": "21°C"')

    # Cancel a long answer once it has started streaming.
    expect(tab.by("cancel")).to_be_disabled()
    turn = tab.send("tell me a long story")
    expect(turn.get_by_test_id("answer")).to_contain_text("once upon a time once upon")
    tab.by("cancel").click()
    expect(turn.get_by_test_id("stat-finish")).to_have_text("cancelled")
    assert len(turn.get_by_test_id("answer").inner_text()) < len(LONG_STORY.strip())
    expect(tab.by("send")).to_be_enabled()
    expect(tab.by("cancel")).to_be_disabled()

    # "Long answer" (ignore_eos): a short reply runs on to max_new_tokens; then one long enough to cancel.
    tab.by("ignore-eos").check()
    tab.by("max-new-tokens").fill("40")
    turn = tab.send("hello, at length")
    expect(turn.get_by_test_id("stat-finish")).to_have_text("length")
    assert int(stat(turn, "completion")) == 40
    tab.by("max-new-tokens").fill("5000")
    turn = tab.send("hello, at great length")
    expect(turn.get_by_test_id("answer")).to_contain_text(HELLO)  # the reply is out; generation goes on
    expect(tab.by("cancel")).to_be_enabled()
    tab.by("cancel").click()
    expect(turn.get_by_test_id("stat-finish")).to_have_text("cancelled")
    tab.by("ignore-eos").uncheck()
    tab.by("max-new-tokens").fill("512")

    # A JSON-RPC error response (max_new_tokens above the server's cap) shows in the transcript.
    tab.by("max-new-tokens").fill("100000")
    tab.by("message").fill("hi")
    tab.by("send").click()
    expect(tab.by("error").last).to_contain_text("generate: error -32602 (invalid params)")
    expect(tab.by("error").last).to_contain_text("max_new_tokens: must be <= 8192")
    expect(tab.by("user-msg").last).to_contain_text("not sent")
    expect(tab.by("send")).to_be_enabled()
    tab.by("max-new-tokens").fill("512")

    # A task that fails in the model: its `error` notification, then `end` with finish reason "error".
    server.model.fail_next.set()
    turn = tab.send("hello once more")
    expect(turn.get_by_test_id("stat-finish")).to_have_text("error")
    expect(tab.by("error").last).to_contain_text("The task failed: error -32000 (generation failed)")

    # Model and user text is shown as text, never as markup.
    turn = tab.send("echo " + MARKUP)
    expect(turn.get_by_test_id("stat-finish")).to_have_text("stop")
    expect(turn.get_by_test_id("answer")).to_contain_text(MARKUP)
    assert page.locator("#injected").count() == 0 and page.evaluate("window.__xss") is None

    shot = screenshot_path("desktop.png")
    page.screenshot(path=shot, full_page=True)
    print(f"playground screenshot: {shot}")

    assert tab.external_requests() == []
    assert tab.sockets and all(urlsplit(u).path.startswith("/ws/") for u in tab.sockets)
    assert tab.script_errors == []


def test_a_dropped_socket_resumes_by_itself(tab: Page, server) -> None:
    """The socket drops mid-answer: the page reopens it with ?resume_from=<last seq>, the server (which kept the
    task running) replays what was missed, and the answer completes with nothing lost or doubled."""
    from playwright.sync_api import expect

    tab.create_session()
    turn = tab.send("tell me a story")
    expect(turn.get_by_test_id("answer")).to_contain_text("once upon a time once upon a time")
    sid = tab.page.evaluate("document.getElementById('session-id').textContent").split()[-1]
    conn = server.state.runtime.sessions.get(sid).connection
    server.server.loop.call_soon_threadsafe(conn.close, 1001, "going away")
    expect(tab.by("connection-status")).not_to_have_text("connected")  # it did drop mid-answer
    expect(turn.get_by_test_id("stat-finish")).to_have_text("stop")
    expect(turn.get_by_test_id("answer")).to_have_text(STORY.strip())
    expect(tab.by("connection-status")).to_have_text("connected")
    assert any("resume_from=" in u for u in tab.sockets[1:]), tab.sockets
    turn = tab.send("hello again")
    expect(turn.get_by_test_id("answer")).to_have_text(HELLO)
    assert tab.external_requests() == [] and tab.script_errors == []


def test_a_socket_replaced_is_shown_and_reconnect_continues(tab: Page, server) -> None:
    """A socket closed for good (here: as if a newer socket had resumed the session) is not reopened by itself;
    the Reconnect button continues the conversation."""
    from playwright.sync_api import expect

    tab.create_session()
    turn = tab.send("tell me a long story")
    expect(turn.get_by_test_id("answer")).to_contain_text("once upon a time")
    for conn in list(server.state.runtime.connections):
        server.server.loop.call_soon_threadsafe(conn.close, 4000, "replaced")
    expect(tab.by("error").last).to_contain_text("Socket closed (code 4000: replaced)")
    expect(turn.get_by_test_id("stat-finish")).to_have_text("socket closed")
    expect(tab.by("connection-status")).to_have_text("disconnected")
    expect(tab.by("send")).to_be_disabled()
    tab.by("reconnect").click()
    expect(tab.by("connection-status")).to_have_text("connected")
    turn = tab.send("hello again")
    expect(turn.get_by_test_id("answer")).to_have_text(HELLO)
    assert tab.external_requests() == [] and tab.script_errors == []


def test_api_key_uses_a_ticket_for_the_socket(browser, base_settings) -> None:
    from playwright.sync_api import expect

    with running_server(replace(base_settings, api_key=API_KEY), scripted_loader(respond)) as app:
        tab = Page(browser, app)
        try:
            tab.by("create-session").click()
            expect(tab.by("error").last).to_contain_text("HTTP 401 unauthorized")
            tab.by("api-key").fill(API_KEY)
            tab.create_session()
            turn = tab.send("hello")
            expect(turn.get_by_test_id("answer")).to_have_text(HELLO)

            posts = {urlsplit(r.url).path: r for r in tab.requests if r.method == "POST"}
            assert posts["/create_session"].headers.get("authorization") == f"Bearer {API_KEY}"
            assert posts["/auth/ticket"].headers.get("authorization") == f"Bearer {API_KEY}"
            [socket] = tab.sockets
            assert "ticket=" in socket and API_KEY not in socket  # the key itself never goes in a URL
            assert tab.external_requests() == [] and tab.script_errors == []
        finally:
            tab.close()


def in_view(locator: Any, viewport: dict[str, int]) -> bool:
    """The element is on screen without scrolling the page: its whole box inside the viewport."""
    box = locator.bounding_box()
    return box is not None and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= viewport["width"] \
        and box["y"] + box["height"] <= viewport["height"]


def test_phone_layout_390px(browser, server) -> None:
    """On a 390-px phone the model name, the hint, Create session, the message box and Send are all on the
    first screen, nothing is wider than the screen, and a whole exchange works there."""
    from playwright.sync_api import expect

    tab = Page(browser, server, viewport=PHONE)
    try:
        expect(tab.by("model-id")).to_have_text(server.model_name)
        expect(tab.by("empty-hint")).to_be_visible()
        for testid in ("model-name", "create-session", "empty-hint", "message", "send", "cancel"):
            assert in_view(tab.by(testid), PHONE), testid
        assert tab.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        tab.create_session()
        turn = tab.send("hello from a phone")
        expect(turn.get_by_test_id("answer")).to_have_text(HELLO)
        assert in_view(tab.by("send"), PHONE) and in_view(turn.get_by_test_id("answer"), PHONE)
        assert tab.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        shot = screenshot_path("phone-390px.png")
        tab.page.screenshot(path=shot)
        print(f"playground screenshot (390 px): {shot}")
        assert tab.external_requests() == [] and tab.script_errors == []
    finally:
        tab.close()
