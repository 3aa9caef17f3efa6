"""Open the HTML report the way a person does: in a real browser (headless Chromium).

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON
messages separated by NUL bytes on file descriptors 3 and 4), so no driver or Python
package is needed, only Debian's ``chromium``. The test records console errors, uncaught
exceptions, log errors (a CSP violation is one) and any request that leaves the file, then
checks what is on screen and takes a screenshot (``$BITCOMPILE_TEST_ARTIFACTS`` or the
test's tmp dir).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import bitcompile
from bitcompile.models import TinyLlama, TinyLlamaConfig

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium where apt-get is usable)"
)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


class Browser:
    """A Chromium process and the DevTools protocol over its pipe."""

    def __init__(self, user_data_dir: Path, log_path: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Move the child's ends above fd 10 so the dup2s onto 3 and 4 cannot clobber each other.
        high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        actions = [
            (os.POSIX_SPAWN_DUP2, high_r, 3),
            (os.POSIX_SPAWN_DUP2, high_w, 4),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
        ]
        argv = [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"]
        self.pid = os.posix_spawn(CHROMIUM, argv, os.environ, file_actions=actions)
        for fd in (to_chrome_r, from_chrome_w, high_r, high_w):
            os.close(fd)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                else:
                    self.events.put(message)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "params": params}
        if session:
            request["sessionId"] = session
        os.write(self._to_chrome, json.dumps(request).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._next_id in self._replies, timeout):
                raise TimeoutError(f"no reply to {method} in {timeout}s")
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self._to_chrome)


class Page:
    """One tab; collects console errors, exceptions, log errors and outside requests."""

    def __init__(self, browser: Browser, width: int = 1280, height: int = 900) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.errors: list[str] = []
        self.requests: list[str] = []

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, self.session, **params)

    def _drain(self, until: str | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.browser.events.get(timeout=0.2 if until is None else max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                if until is None:
                    return
                raise TimeoutError(f"no {until} event in {timeout}s") from None
            if event.get("sessionId") != self.session:
                continue
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                described = details.get("exception", {}).get("description", "")
                self.errors.append(f"exception: {details.get('text', '')} {described}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append("log: " + params["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith(("file:", "data:", "about:")):
                    self.requests.append(url)
            if method == until:
                return

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self._drain(until="Page.loadEventFired")
        self._drain()  # late console messages

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    instance = Browser(tmp / "profile", tmp / "chromium.log")
    try:
        instance.send("Browser.getVersion", timeout=60)
    except Exception as error:  # e.g. a chromium that cannot start in this sandbox
        instance.close()
        pytest.skip(f"chromium did not start: {error}; see {tmp / 'chromium.log'}")
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def page_path(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(num_layers=6))
    report = bitcompile.explain(model, torch.randint(0, 64, (1, 8)), exclude=["layers.3.mlp.up_proj"])
    return report.to_html(tmp_path_factory.mktemp("html"), title="bitcompile inspect TinyLlama(6 layers)")


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("BITCOMPILE_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_report_page_renders_without_errors(browser, page_path, tmp_path):
    page = Page(browser)
    page.open(page_path.as_uri())
    shot = page.screenshot(_artifacts(tmp_path) / "inspect_report.png")
    print(f"screenshot: {shot}")
    assert page.errors == [] and page.requests == []
    assert page.js("document.title") == "bitcompile inspect TinyLlama(6 layers)"
    assert page.js("document.querySelectorAll('#layer-table tbody tr').length") == 44  # 42 layers, the head, the embedding
    assert page.js("document.querySelectorAll('#layer-table tr.skipped').length") == 3  # excluded up_proj, float head, embedding
    assert page.js("document.querySelectorAll('#legend li').length") == 6
    # the picture is drawn, visible, and has boxes of each kind
    size = page.js("(() => { const r = document.querySelector('.picture svg').getBoundingClientRect(); return [r.width, r.height]; })()")
    assert size[0] > 200 and size[1] > 400
    kinds = page.js("[...document.querySelectorAll('.picture svg g.node')].map(g => g.id.split('-')[1])")
    assert {"ternary", "skipped", "collapsed", "plain", "input", "output"} <= set(kinds)
    # colours are the legend's (computed by the browser, not just written in the file)
    fill = page.js("getComputedStyle(document.querySelector('.picture g.node[data-role=ternary] rect, .picture g.node[id*=ternary] path, .picture g.node[id*=ternary] polygon')).fill")
    assert fill == "rgb(201, 239, 201)"
    assert page.js("document.querySelectorAll('pre.code span.replaced').length") == 41
    # clicking a layer in the picture brings its table row into view and flags it
    flagged = page.js(
        """(() => { const node = document.querySelector('.picture g.node[id*="-skipped-"]');
                     node.dispatchEvent(new MouseEvent('click', {bubbles: true}));
                     const row = document.querySelector('tr.flash');
                     return row && row.getAttribute('data-layer'); })()"""
    )
    assert flagged == "layers.3.mlp.up_proj"
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    page.js("document.querySelector('#graph-0 .picture').scrollIntoView()")
    picture = page.screenshot(_artifacts(tmp_path) / "inspect_graph.png")
    print(f"screenshot: {picture}")
    assert picture.read_bytes() != png


def test_harness_sees_errors_and_outside_requests(browser, tmp_path):
    """The checks above can fail: a page with a console error and a CDN script is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><script src="https://cdn.example.invalid/lib.js"></script></head>'
        "<body><script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    page = Page(browser)
    page.open(bad.as_uri())
    assert any("boom" in e for e in page.errors) and any("undefinedFunction" in e for e in page.errors)
    assert page.requests == ["https://cdn.example.invalid/lib.js"]


@pytest.fixture(scope="module")
def hf_page_path(tmp_path_factory):
    """``bitcompile inspect FOLDER --html`` on a 4-layer Hugging Face Llama saved by transformers."""
    transformers = pytest.importorskip("transformers")
    from bitcompile.cli import main

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    tmp = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "llama", safe_serialization=True)
    assert main(["inspect", str(tmp / "llama"), "--html", str(tmp / "html")]) == 0
    return tmp / "html" / "index.html"


def test_hf_report_page_renders_without_errors(browser, hf_page_path, tmp_path):
    page = Page(browser)
    page.open(hf_page_path.as_uri())
    assert page.errors == [] and page.requests == []
    assert page.js("document.querySelectorAll('#layer-table tbody tr').length") == 30  # embed_tokens + 4 x 7 + lm_head
    assert page.js("document.querySelectorAll('.picture svg').length") == 1
    assert page.js("document.querySelectorAll('.picture-failed').length") == 0
    size = page.js("(() => { const r = document.querySelector('.picture svg').getBoundingClientRect(); return [r.width, r.height]; })()")
    assert size[0] > 200 and size[1] > 300
    roles = page.js("[...document.querySelectorAll('.picture svg g.node')].map(g => g.getAttribute('data-role'))")
    # layers.0 (the untied lm_head is float by default, float_roles); layers.1-3 collapsed
    assert roles.count("ternary") == 7 and roles.count("collapsed") == 1
    collapsed = page.js("document.querySelector('.picture g.node[data-role=collapsed]').textContent")
    assert "model.layers.1 … model.layers.3" in collapsed and "21 ternary" in collapsed
    fill = page.js("getComputedStyle(document.querySelector('.picture g.node[data-role=ternary] path, .picture g.node[data-role=ternary] polygon, .picture g.node[data-role=ternary] rect')).fill")
    assert fill == "rgb(201, 239, 201)"
    flagged = page.js(
        """(() => { const node = document.querySelector('.picture g.node[data-layer="model.layers.0.mlp.down_proj"]');
                     node.dispatchEvent(new MouseEvent('click', {bubbles: true}));
                     const row = document.querySelector('tr.flash');
                     return row && row.getAttribute('data-layer'); })()"""
    )
    assert flagged == "model.layers.0.mlp.down_proj"
    page.js("document.querySelector('#graph-0 .picture').scrollIntoView()")
    shot = page.screenshot(_artifacts(tmp_path) / "inspect_hf_graph.png")
    print(f"screenshot: {shot}")
    assert shot.read_bytes().startswith(b"\x89PNG")
