"""The chat page at / in a real headless browser: Debian's chromium driven by playwright.

Set KILN_SAVE_SCREENSHOT=1 to also write docs/img/chat_page.png (the screenshot in docs/serve.md).
"""

from __future__ import annotations

import os
import re
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
    before = server.health()
    aborted, finished = before["aborted"], before["finished"]
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
        # The server sees the hang-up at its next write and aborts the sequence; on a fast machine the
        # engine may have finished the reply in the moment before the click reached it. Either way the
        # request has ended on the server and its blocks are free.
        for _ in range(100):
            h = server.health()
            if (h["aborted"] > aborted or h["finished"] > finished) and h["engine"]["used_blocks"] == 0:
                break
            page.wait_for_timeout(100)
        assert h["aborted"] > aborted or h["finished"] > finished, h
        assert h["pending"] == 0 and h["engine"]["used_blocks"] == 0, h


def test_chat_page_sends_a_penalty_only_when_set(server, browser_context):
    """The presence/frequency penalty inputs go in the request body when non-zero (OpenAI's default, 0,
    is left out), and a reply streams with them set."""
    page = browser_context.new_page()
    page.goto(server.url + "/")
    page.locator("#model", has_text="kiln-chat-tiny").wait_for()
    assert page.input_value("#presence_penalty") == "0" and page.input_value("#frequency_penalty") == "0"
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    page.fill("#presence_penalty", "0.5")
    page.fill("#input", "hi")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.press("#input", "Enter")
    body = sent.value.post_data_json
    assert body["presence_penalty"] == 0.5 and "frequency_penalty" not in body, body
    page.wait_for_selector(".assistant .meta", timeout=30_000)
    assert page.eval_on_selector(".assistant", "el => el.firstChild.textContent")  # a reply streamed
    assert re.match(r"\d+ tokens, ", page.text_content(".assistant .meta"))
    page.fill("#presence_penalty", "0")
    page.fill("#frequency_penalty", "-1.5")
    page.fill("#input", "who are you?")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.click("#send")
    body = sent.value.post_data_json
    assert body["frequency_penalty"] == -1.5 and "presence_penalty" not in body, body
    page.locator(".assistant .meta").nth(1).wait_for(timeout=30_000)
    assert page.query_selector(".error") is None


def test_chat_page_json_mode_asks_for_a_json_object(server, browser_context):
    """The JSON mode box sends ``response_format: {"type": "json_object"}``; the reply streams as JSON."""
    page = browser_context.new_page()
    page.goto(server.url + "/")
    page.locator("#model", has_text="kiln-chat-tiny").wait_for()
    assert not page.is_checked("#json_mode")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "30")
    page.check("#json_mode")
    page.fill("#input", "hi")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.press("#input", "Enter")
    assert sent.value.post_data_json["response_format"] == {"type": "json_object"}
    page.wait_for_selector(".assistant .meta", timeout=30_000)
    assert page.eval_on_selector(".assistant", "el => el.firstChild.textContent").startswith("{")
    page.uncheck("#json_mode")
    page.fill("#input", "hi")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.click("#send")
    assert "response_format" not in sent.value.post_data_json
    page.locator(".assistant .meta").nth(1).wait_for(timeout=30_000)
    assert page.query_selector(".error") is None
