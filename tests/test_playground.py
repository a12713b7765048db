"""The playground page (dgemma/server/static/playground.html) in a real headless Chromium.

Two tests: one against a small fake SSE server written here (exercises the page's JS on its own: request
body, Bearer key, drafts, reasoning, Markdown with escaping), and one against a real ``dgemma serve`` on
a tiny random checkpoint. Both skip, saying why, without selenium, chromium or chromedriver.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "dgemma" / "server" / "static" / "playground.html"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# Records every text #draft shows (a MutationObserver, so steps faster than a poll are not missed).
RECORD_DRAFTS = """
window.__drafts = [];
const el = document.getElementById('draft');
new MutationObserver(() => {
  const t = el.textContent;
  if (t && window.__drafts[window.__drafts.length - 1] !== t) window.__drafts.push(t);
}).observe(el, {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it must use /usr/bin/chromium)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1400", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _chunk(delta: dict | None = None, draft: dict | None = None, finish: str | None = None,
           usage: dict | None = None) -> dict:
    out = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-model",
           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if draft is not None:
        out["draft"] = draft
    if usage is not None:
        out["usage"] = usage
    return out


ANSWER = ["## Hello\n\nThis is **bold**, *italic* and `a <b>code</b> span`.\n",
          "\n- one\n- two\n\n[a link](https://example.com/a_b_) and [bad](javascript:alert(1)) "
          "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>\n\n```\nx = 1 < 2\n```"]
REASONING = "I should greet."


def _fake_events(thinking: bool) -> list[dict]:
    """A stream as the server sends it: drafts per step, then the canvas's committed text."""
    events, tokens = [], 0
    canvases = ([("reasoning_content", REASONING)] if thinking else []) + [("content", a) for a in ANSWER]
    for i, (field, text) in enumerate(canvases):
        for step in range(3):  # noise, then half, then the whole canvas
            keep = len(text) * step // 2
            draft = text[:keep] + "?" * (len(text) - keep)
            events.append(_chunk(draft={"canvas": i, "step": step, "text": draft, "settled": 8 * step,
                                        "canvas_length": 16, "mean_entropy": 2.0 / (step + 1)}))
        tokens += 16
        events.append(_chunk(delta={field: text}, usage={"prompt_tokens": 5, "completion_tokens": tokens,
                                                         "total_tokens": 5 + tokens}))
    events.append(_chunk(finish="stop", usage={"prompt_tokens": 5, "completion_tokens": tokens,
                                               "total_tokens": 5 + tokens}))
    return events


class _FakeHandler(BaseHTTPRequestHandler):
    """GET / -> the page, GET /v1/models, POST /v1/chat/completions -> a paced SSE stream."""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/", "/playground"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode(),
                       "application/json")
        else:
            self._send(404, b"{}", "application/json")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
        if self.path != "/v1/chat/completions":
            return self._send(404, b"{}", "application/json")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        thinking = bool((body.get("chat_template_kwargs") or {}).get("enable_thinking"))
        for event in _fake_events(thinking):
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(0.08)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _run_prompt(driver, base_url: str, prompt: str, *, thinking: bool = False, key: str = "",
                timeout: float = 120.0) -> dict:
    """Open the page, send ``prompt``, wait for the end; returns what the page showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url)
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    if thinking:
        driver.find_element(By.ID, "thinking-toggle").click()
    if key:
        driver.find_element(By.ID, "api-key").send_keys(key)
    driver.execute_script(RECORD_DRAFTS)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, "status").text.startswith(("Done", "Error", "Stopped")))
    return {
        "status": driver.find_element(By.ID, "status").text,
        "drafts": driver.execute_script("return window.__drafts"),
        "committed": driver.execute_script("return document.getElementById('committed').textContent"),
        "answer_text": driver.find_element(By.ID, "answer").text,
        "answer_html": driver.execute_script("return document.getElementById('answer').innerHTML"),
    }


def test_playground_page_against_a_fake_stream(browser, fake_server, tmp_path):
    from selenium.webdriver.common.by import By

    server, url = fake_server
    seen = _run_prompt(browser, url + "/", "Say hello", thinking=True, key="sk-test")
    browser.save_screenshot(str(tmp_path / "playground-fake.png"))
    assert seen["status"].startswith("Done (stop)"), seen["status"]

    (request,) = server.requests
    assert request["authorization"] == "Bearer sk-test"
    body = request["body"]
    assert body["stream"] is True and body["include_drafts"] is True and body["model"] == "fake-model"
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]
    assert body["chat_template_kwargs"] == {"enable_thinking": True}

    assert len(set(seen["drafts"])) >= 4, seen["drafts"]  # the canvas changed while it streamed
    assert seen["committed"] == "".join(ANSWER)
    # the reasoning in its own (collapsed at the end) block, out of the answer
    assert browser.execute_script("return document.getElementById('reasoning-text').textContent") == REASONING
    assert browser.execute_script("return document.getElementById('reasoning').open") is False
    assert REASONING not in seen["answer_text"]

    answer = browser.find_element(By.ID, "answer")
    assert answer.find_element(By.TAG_NAME, "h2").text == "Hello"
    assert answer.find_element(By.TAG_NAME, "strong").text == "bold"
    assert answer.find_element(By.TAG_NAME, "em").text == "italic"
    assert [li.text for li in answer.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
    assert answer.find_element(By.CSS_SELECTOR, "p code").text == "a <b>code</b> span"
    assert answer.find_element(By.CSS_SELECTOR, "pre code").text == "x = 1 < 2"
    (link,) = answer.find_elements(By.TAG_NAME, "a")  # the javascript: one stays text
    assert link.get_attribute("href") == "https://example.com/a_b_" and link.text == "a link"
    # model text never becomes markup: no image, no script, nothing ran
    assert not answer.find_elements(By.TAG_NAME, "img") and not answer.find_elements(By.TAG_NAME, "script")
    assert "<script>window.__xss=2</script>" in seen["answer_text"]
    assert browser.execute_script("return window.__xss") is None
    # the stats were filled in from the drafts and the usage
    assert browser.find_element(By.ID, "stat-canvas").text == "2"
    assert browser.find_element(By.ID, "stat-settled").text == "16/16"
    assert float(browser.find_element(By.ID, "stat-rate").text) > 0
    assert (tmp_path / "playground-fake.png").stat().st_size > 1000


def test_markdown_renderer_escapes_everything(browser, fake_server):
    _, url = fake_server
    browser.get(url + "/")
    render = lambda text: browser.execute_script("return window.dgemmaPlayground.markdown(arguments[0])", text)
    assert render("<b>x</b> & 'y'") == "<p>&lt;b&gt;x&lt;/b&gt; &amp; &#39;y&#39;</p>"
    assert render('[x](https://a.b/?q="><script>)') == (
        '<p><a href="https://a.b/?q=&quot;&gt;&lt;script&gt;" rel="noopener noreferrer" target="_blank">x</a></p>')
    assert render("[x](data:text/html,hi)") == "<p>[x](data:text/html,hi)</p>"
    assert render("1. a\n2. b\n\n# T") == "<ol><li>a</li><li>b</li></ol>\n<h1>T</h1>"
    assert render("snake_case_name and `**not bold**`") == "<p>snake_case_name and <code>**not bold**</code></p>"
    assert render("__b__ and x__y__z, _i_") == "<p><strong>b</strong> and x__y__z, <em>i</em></p>"
    assert render("```py\n<i>\n```") == '<pre><code class="language-py">&lt;i&gt;</code></pre>'
    assert render("a\u0000 0\u0000") == "<p>a 0</p>"


# ------------------------------------------------------------------ the real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _serve_available() -> str | None:
    """Why ``dgemma serve`` cannot be tested yet, or None."""
    if not (ROOT / "dgemma" / "server" / "app.py").is_file():
        return "dgemma/server/app.py is not written yet"
    help_run = subprocess.run([sys.executable, "-m", "dgemma", "serve", "--help"], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if help_run.returncode != 0:
        return f"`dgemma serve --help` failed: {(help_run.stderr or help_run.stdout).strip()[-300:]}"
    return None


@pytest.fixture
def served_tiny(ckpt_factory, tmp_path):
    """A real ``dgemma serve`` on the tiny checkpoint: 3 canvases of 16 tokens, 8 steps each, every step taken."""
    reason = _serve_available()
    if reason:
        pytest.skip(reason)
    from dgemma.loading import read_generation_config, write_generation_config

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt_factory("tiny"), ckpt)
    gen = read_generation_config(ckpt)
    gen.update(max_new_tokens=48, max_denoising_steps=8, confidence_threshold=0.0, seed=0)
    write_generation_config(ckpt, gen)
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "dgemma", "serve", "--model", str(ckpt), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dgemma serve exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()[-2000:]}")
            try:
                if _get(base + "/v1/models")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("dgemma serve did not answer /v1/models within 180 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _page_url(base: str) -> str:
    for path in ("/playground", "/", "/static/playground.html", "/playground.html"):
        try:
            code, body = _get(base + path)
        except OSError:
            continue
        if code == 200 and b'id="prompt"' in body:
            return base + path
    pytest.fail("the server does not serve the playground at /playground, /, /static/playground.html")


def test_playground_page_against_dgemma_serve(browser, served_tiny, tmp_path):
    seen = _run_prompt(browser, _page_url(served_tiny), "Tell me a story about a small robot.", timeout=180)
    browser.save_screenshot(str(tmp_path / "playground-serve.png"))
    assert seen["status"].startswith("Done"), seen["status"]
    assert len(set(seen["drafts"])) >= 2, seen["drafts"]  # the canvas denoised live, step after step
    assert seen["committed"].strip(), "the tiny model committed no text"
    assert seen["answer_text"].strip(), "no answer rendered"  # the Markdown view of the committed text
    assert (tmp_path / "playground-serve.png").stat().st_size > 1000
