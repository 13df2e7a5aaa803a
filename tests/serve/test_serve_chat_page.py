"""The chat page at / in a real headless browser: Debian's chromium driven by playwright.

Set KILN_SAVE_SCREENSHOT=1 to also write docs/img/chat_page.png (the screenshot in docs/serve.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make chromium) to test the chat page")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to test the chat page")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=ARGS, viewport={"width": 1000, "height": 640})
        yield ctx
        ctx.close()


def test_chat_page_streams_a_reply_and_keeps_history(server, browser_context, tmp_path):
    page = browser_context.new_page()
    page.goto(server.url + "/")
    page.locator("#model", has_text="kiln-chat-tiny").wait_for()  # (no string eval: the page's CSP forbids it)
    page.fill("#temperature", "0")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    # the reply streams into the assistant bubble; the meta line appears once the stream ended
    page.wait_for_selector(".assistant .meta", timeout=30_000)
    reply = page.eval_on_selector(".assistant", "el => el.firstChild.textContent")
    assert reply == "Hello! I am Kiln, a small model."
    page.fill("#input", "who are you?")
    page.click("#send")
    page.locator(".assistant .meta").nth(1).wait_for(timeout=30_000)
    bubbles = page.eval_on_selector_all(".msg", "els => els.map(e => e.className.split(' ')[1])")
    assert bubbles == ["user", "assistant", "user", "assistant"]
    # the whole history went with the second turn: the model answers as trained on the two-turn chat
    assert page.eval_on_selector_all(".assistant", "els => els.map(e => e.firstChild.textContent)") == [
        "Hello! I am Kiln, a small model.", "I am Kiln, a small model."]
    assert page.eval_on_selector_all(".meta", "els => els.map(e => e.textContent)")[1].endswith(" s")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("KILN_SAVE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "img" / "chat_page.png")


def test_chat_page_stop_button_ends_the_stream(server, browser_context):
    page = browser_context.new_page()
    page.goto(server.url + "/")
    page.locator("#model", has_text="kiln-chat-tiny").wait_for()  # (no string eval: the page's CSP forbids it)
    aborted = server.health()["aborted"]
    page.fill("#temperature", "2")  # a sampled ramble: long enough to stop (up to 100 tokens)
    page.fill("#top_p", "1")
    page.fill("#max_tokens", "100")
    page.fill("#input", "tell me a story")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant")
    page.eval_on_selector("#stop", "b => b.click()")  # a no-op if the reply already finished
    page.wait_for_selector(".assistant .meta")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    if page.text_content(".assistant .meta") == "stopped":  # it did not finish first: the server aborted it
        for _ in range(100):  # the server sees the hang-up when it next writes to the stream
            if server.health()["aborted"] > aborted:
                break
            page.wait_for_timeout(100)
        assert server.health()["aborted"] > aborted
