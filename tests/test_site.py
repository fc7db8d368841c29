"""The book as a reader sees it: build the site, serve it, open every page in a real browser.

The site is built exactly as `make book-build` does (`mkdocs build --strict`, which executes
every chapter; chapters already executed by tests/test_book.py in this session come from the
build's cache instead of running twice), served from 127.0.0.1, and every page of the
navigation is opened in headless Chromium, driven over the Chrome DevTools Protocol on a pipe
(standard library only; no driver, no extra package). On each page:

- the title and a visible heading are there;
- the math is rendered by the KaTeX shipped with the site: no TeX left in the visible text,
  no KaTeX error, and KaTeX output present on every page whose source has math;
- every image has loaded (`naturalWidth > 0`), and every link to another page of the site
  leads to a page;
- no JavaScript exception, console error, failed or error response, and no request leaves
  the local server (the site works offline);
- chapter pages show highlighted code and link a notebook and a source that download;
- every picture has an alt text of its own (not nbconvert's placeholder), the table of contents
  shows no TeX, and at a 1280 px window the content column is at least `MIN_CONTENT_WIDTH` wide
  and nothing in it (code, table, equation) reaches past its right edge (long lines scroll).

In the built HTML, no page prints the build machine's paths (the checkout, the home folder, the
temporary folder) and no chapter output is a stderr block.

Screenshots of the home page and of chapters 3 RoIAlign, 3.1 Training, 4.2 Ablations and the
appendix at 1280 px (the top of the page, and one further down), and of a chapter in the light
and dark themes, go to `test-artifacts/`.

Chromium is Debian's `chromium` package. Where it is missing, the session installs it with
apt-get when it runs as root (as CI does); elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import base64
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
ARTIFACTS = ROOT / "test-artifacts"
BUILD_TIMEOUT_S = 1800  # a cold build executes every chapter (each must run in under a minute)
MIN_CONTENT_WIDTH = 1000  # px of the content column at a 1280 px window (mkdocs-material's own: about 720)
NBCONVERT_PLACEHOLDER_ALT = "No description has been provided for this image"
SCREENSHOT_PAGES = ["index.md", "03_3_roi_align.py", "03_5_training.py", "04_2_ablations.py", "appendix_kernels.py"]

# A cold build executes every chapter inside the first test that asks for the site.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 300)]


# ----------------------------------------------------------------------------------------
# The pages: every entry of mkdocs.yml's nav


def _yaml_loader():
    class Loader(yaml.SafeLoader):
        """mkdocs.yml may hold tags such as !!python/name:...; their values are not needed here."""

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return Loader


def load_mkdocs_yml() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_yaml_loader())


def nav_pages(nav) -> list[tuple[str, str]]:
    """(title, source path relative to book/) for every page of the nav, in order."""
    pages = []
    for entry in nav or []:
        if isinstance(entry, str):
            pages.append((entry, entry))
            continue
        for title, value in entry.items():
            if isinstance(value, str):
                pages.append((title, value))
            else:
                pages.extend(nav_pages(value))
    return pages


def page_url(source: str) -> str:
    """The site path of a page with mkdocs' directory URLs: index.md -> '', a/b.py -> a/b/."""
    stem = source.rsplit(".", 1)[0]
    if stem == "index":
        return ""
    if stem.endswith("/index"):
        return stem[: -len("index")]
    return stem + "/"


def _page_id(page: tuple[str, str]) -> str:
    return page[1].rsplit(".", 1)[0]


def _source_has_math(source: str) -> bool | None:
    """Whether a page's source carries math; None when it cannot tell (generated API pages)."""
    path = BOOK / source
    if source.endswith(".py"):
        cells = jupytext.read(path).cells
        return any(cell.cell_type == "markdown" and "$" in cell.source for cell in cells)
    text = path.read_text()
    if ":::" in text:
        return None
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return "$" in text or "\\(" in text or "\\[" in text


try:
    CONFIG = load_mkdocs_yml()
    PAGES = [page for page in nav_pages(CONFIG.get("nav")) if (BOOK / page[1]).is_file()]
except Exception as error:  # the nav tests in tests/test_book.py report a broken mkdocs.yml
    CONFIG, PAGES = {}, []
    _CONFIG_ERROR = error
else:
    _CONFIG_ERROR = None


# ----------------------------------------------------------------------------------------
# Chromium, driven over the DevTools protocol on a pipe


def find_chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    for name in candidates:
        if name and (path := shutil.which(name)):
            return path
    return None


def install_chromium() -> str:
    """Install Debian's chromium with apt-get (root only); return the reason when that is impossible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Chromium is not installed, and installing it needs root and apt-get; install the `chromium` package"
    print("\n[test_site] Chromium is missing: installing Debian's `chromium` package with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"Chromium is not installed and `{' '.join(command)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    return ""


def _above_4(fd: int) -> int:
    """The same pipe end on a descriptor above 4, so that moving the child's ends onto 3 and 4 cannot clash."""
    import fcntl  # POSIX only (the pipe to Chromium): this module must still import where it is missing

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium and one tab, spoken to with the DevTools protocol over a pipe.

    Chromium reads JSON commands on file descriptor 3 and writes replies and events on 4, each
    message ending with a NUL byte (`--remote-debugging-pipe`). Replies are matched to
    commands by id; events are kept in `self.events` until `clear_events`.
    """

    def __init__(self, executable: str, log_path: Path):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        command_read, self._command_write = (_above_4(fd) for fd in os.pipe())
        self._reply_read, reply_write = (_above_4(fd) for fd in os.pipe())
        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        actions = [
            (os.POSIX_SPAWN_DUP2, command_read, 3),
            (os.POSIX_SPAWN_DUP2, reply_write, 4),
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        self.pid = os.posix_spawn(executable, args, os.environ, file_actions=actions)
        os.close(command_read)
        os.close(reply_write)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._condition = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=self.session)
        self.send("Network.setCacheDisabled", {"cacheDisabled": True}, session=self.session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=self.session,
        )

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._reply_read, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._condition:
                    self._closed = True
                    self._condition.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._condition:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._condition.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0) -> dict:
        with self._condition:
            self._next_id += 1
            command_id = self._next_id
        message = {"id": command_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._condition:
            while command_id not in self._replies:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise RuntimeError(f"Chromium exited; its log is {self.log_path}")
                if remaining <= 0:
                    raise TimeoutError(f"no reply to {method} within {timeout} s")
                self._condition.wait(remaining)
            reply = self._replies.pop(command_id)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def clear_events(self) -> None:
        with self._condition:
            self.events.clear()

    def wait_for_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for event in self.events:
                    if event.get("method") == method:
                        return event
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise RuntimeError(f"Chromium exited; its log is {self.log_path}")
                if remaining <= 0:
                    raise TimeoutError(f"no {method} within {timeout} s")
                self._condition.wait(remaining)

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        self.clear_events()
        result = self.send("Page.navigate", {"url": url}, session=self.session)
        if result.get("errorText"):
            raise AssertionError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_for_event("Page.loadEventFired", timeout)

    def evaluate(self, expression: str, timeout: float = 60.0):
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.session,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            for _ in range(50):
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                    break
                time.sleep(0.1)
            else:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        for fd in (self._command_write, self._reply_read):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# What a page must look like, measured in the page


PAGE_REPORT_JS = r"""
(async () => {
  await new Promise((resolve) => {
    if (document.readyState === "complete") resolve(); else addEventListener("load", resolve);
  });
  const images = Array.from(document.images);
  images.forEach((img) => { img.loading = "eager"; });
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  await document.fonts.ready;
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));

  const content = document.querySelector(".md-content") || document.body;
  const skip = "pre, code, script, style, textarea, .katex, .katex-display, .katex-error, .highlight, .highlight-ipynb";
  const walker = document.createTreeWalker(content, NodeFilter.SHOW_TEXT);
  const rawMath = [];
  const patterns = [/\$\$/, /\$[^$\s][^$]*\$/, /\\\(/, /\\\[/, /\\begin\{/, /\\[a-zA-Z]{2,}/];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip)) continue;
    if (parent.closest("[hidden]") || getComputedStyle(parent).display === "none") continue;
    const text = node.textContent;
    if (patterns.some((pattern) => pattern.test(text))) rawMath.push(text.trim().slice(0, 200));
  }
  const heading = content.querySelector("h1");
  const code = content.querySelectorAll(".highlight-ipynb span, .highlight span").length;
  return {
    title: document.title,
    h1: heading ? heading.textContent.replace(/[¶#]\s*$/, "").trim() : null,
    rawMath: rawMath,
    katex: content.querySelectorAll(".katex").length,
    katexErrors: Array.from(content.querySelectorAll(".katex-error")).map((e) => e.title || e.textContent),
    images: images.map((img) => ({
      src: img.currentSrc.slice(0, 120), complete: img.complete, naturalWidth: img.naturalWidth,
      alt: img.getAttribute("alt"), inContent: content.contains(img),
    })),
    toc: Array.from(document.querySelectorAll(".md-nav--secondary .md-nav__link")).map((a) => a.textContent.trim()),
    contentWidth: (document.querySelector(".md-content__inner") || content).getBoundingClientRect().width,
    pastTheEdge: (() => {
      // past the column's right edge and not inside a box that scrolls within it: cut off, or widening the page
      const edge = (document.querySelector(".md-content__inner") || content).getBoundingClientRect().right + 1;
      const scrollsWithin = (e) => {
        for (let box = e; box && box !== content; box = box.parentElement) {
          const overflow = getComputedStyle(box).overflowX;
          if ((overflow === "auto" || overflow === "scroll") && box.getBoundingClientRect().right <= edge) return true;
        }
        return false;
      };
      return Array.from(content.querySelectorAll("pre, table, .katex-display, .katex-display .katex-html, img"))
        .filter((e) => e.getBoundingClientRect().right > edge && !scrollsWithin(e))
        .map((e) => `${e.tagName.toLowerCase()}.${e.className}: ${(e.textContent || e.getAttribute("alt") || "").trim().slice(0, 80)}`);
    })(),
    notebookCells: content.querySelectorAll(".jupyter-wrapper .jp-Cell").length,
    highlightedTokens: code,
    downloads: Array.from(content.querySelectorAll(".book-downloads a")).map((a) => a.getAttribute("href")),
    links: Array.from(content.querySelectorAll("a[href]:not(.book-downloads a)")).map((a) => a.href),
    colorScheme: document.body.getAttribute("data-md-color-scheme"),
  };
})()
"""


def problems_in_events(events: list[dict], base_url: str) -> list[str]:
    """JavaScript exceptions, console errors, failed or error responses, and off-site requests."""
    problems = []
    local = (base_url, "data:", "blob:", "about:")
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"JavaScript exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            problems.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            problems.append(f"browser error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(local):
                problems.append(f"request leaves the site (not offline): {url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            problems.append(f"request failed: {params.get('errorText')} ({params.get('type')})")
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            if response.get("status", 200) >= 400:
                problems.append(f"HTTP {response['status']} for {response.get('url')}")
    return problems


# ----------------------------------------------------------------------------------------
# Fixtures: Chromium, the built site, the server


@pytest.fixture(scope="session")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = install_chromium()
        path = find_chromium()
        if path is None:
            pytest.skip(reason or "Chromium is still missing after installing the `chromium` package")
    return path


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site, built as `make book-build` builds it (strict), into a temporary folder."""
    if _CONFIG_ERROR is not None:
        pytest.fail(f"mkdocs.yml cannot be read: {_CONFIG_ERROR}")
    spec = importlib.util.spec_from_file_location("book_hooks", ROOT / "tools" / "book_hooks.py")
    book_hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(book_hooks)

    site_dir = tmp_path_factory.mktemp("site")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # as `make book-build`
    env[book_hooks.CACHE_ENV] = str(tmp_path_factory.getbasetemp() / "book-cache")  # shared with test_book.py
    env["NO_MKDOCS_2_WARNING"] = "1"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    log = result.stdout + result.stderr
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mkdocs-build.log").write_text(log)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-8000:]}"
    hits, misses = log.count("Cache hit:"), log.count("Cache miss")
    print(f"\n[test_site] site built in {time.monotonic() - started:.0f} s ({hits} chapters from cache, {misses} executed)")
    return site_dir


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def server(site) -> str:
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory):
    instance = Browser(chromium, tmp_path_factory.mktemp("chromium") / "chromium.log")
    yield instance
    instance.close()


def visit(browser: Browser, url: str, base_url: str) -> tuple[dict, list[str]]:
    browser.navigate(url)
    report = browser.evaluate(PAGE_REPORT_JS)
    time.sleep(0.2)  # let late console messages arrive
    return report, problems_in_events(list(browser.events), base_url)


# ----------------------------------------------------------------------------------------
# The tests


def test_the_nav_has_pages():
    assert _CONFIG_ERROR is None, f"mkdocs.yml cannot be read: {_CONFIG_ERROR}"
    assert PAGES and PAGES[0][1] == "index.md", "the nav must start with the home page, index.md"


def machine_paths() -> list[str]:
    """Absolute paths of the machine that builds the site: the checkout, the home and temporary folders."""
    paths = {str(ROOT), str(Path.home()), tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}
    return sorted(path.rstrip("/") + "/" for path in paths if len(path) > 1)


# A chapter output that went to stderr: nbconvert marks its block with the stderr MIME type
STDERR_BLOCK = re.compile(r'<div class="[^"]*\bjp-OutputArea-output\b[^"]*" data-mime-type="application/vnd\.jupyter\.stderr"')


class OutputsOnly(HTMLParser):
    """The text inside a chapter page's output blocks (what its cells printed), not its code or prose."""

    def __init__(self, html: str):
        super().__init__()
        self.depth, self.parts = 0, []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in ("img", "br", "hr", "input", "meta", "link", "source", "wbr"):
            return
        if self.depth:
            self.depth += 1
        elif "jp-OutputArea-output" in (dict(attrs).get("class") or "").split():
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth and tag not in ("img", "br", "hr", "input", "meta", "link", "source", "wbr"):
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.parts.append(data)


def test_pages_print_no_path_of_the_build_machine_and_no_stderr(site):
    """A page says what the chapter computed, not where it was built; warnings and log lines are not content.

    The checkout's path may appear nowhere; the home and temporary folders nowhere in what the
    cells printed (the prose may name a path such as /tmp/x.json in a command to try)."""
    pages = sorted(site.rglob("*.html"))
    assert pages
    paths, stderr = [], []
    for page in pages:
        html = page.read_text(errors="replace")
        printed = "".join(OutputsOnly(html).parts)
        paths += [f"{page.relative_to(site)}: {path}" for path in machine_paths() if path in printed]
        paths += [f"{page.relative_to(site)}: {ROOT}/ (outside the outputs)"] if f"{ROOT}/" in html and f"{ROOT}/" not in printed else []
        stderr += [f"{page.relative_to(site)}: {len(STDERR_BLOCK.findall(html))} stderr block(s)"] if STDERR_BLOCK.search(html) else []
    assert not paths, "pages print the build machine's paths:\n" + "\n".join(paths)
    assert not stderr, "chapter outputs on stderr (silence or capture them in the chapter):\n" + "\n".join(stderr)


@pytest.mark.parametrize("page", PAGES, ids=[_page_id(page) for page in PAGES])
def test_page_renders(page, server, browser):
    title, source = page
    url = server + page_url(source)
    report, problems = visit(browser, url, server)

    assert not problems, f"{source}: " + "\n".join(problems)
    site_name = CONFIG["site_name"]
    if source == "index.md":
        assert report["title"] == site_name
    else:
        assert report["title"] == f"{title} - {site_name}", f"{source}: page title {report['title']!r}"
    assert report["h1"], f"{source}: no visible heading"

    assert not report["katexErrors"], f"{source}: KaTeX could not parse: {report['katexErrors']}"
    assert not report["rawMath"], f"{source}: TeX left as text (math not rendered): {report['rawMath'][:5]}"
    if _source_has_math(source):
        assert report["katex"] > 0, f"{source} has math in its source but the page shows no rendered math"

    broken = [image for image in report["images"] if not (image["complete"] and image["naturalWidth"] > 0)]
    assert not broken, f"{source}: images that did not load: {broken}"
    undescribed = [image["src"][:60] for image in report["images"]
                   if image["inContent"] and (not (image["alt"] or "").strip() or image["alt"] == NBCONVERT_PLACEHOLDER_ALT)]
    assert not undescribed, f"{source}: pictures without an alt text of their own: {undescribed}"

    tex = [entry for entry in report["toc"] if re.search(r"\$|\\[a-zA-Z]+|\^\{|_\{", entry)]
    assert not tex, f"{source}: the table of contents shows TeX: {tex}"
    assert report["contentWidth"] >= MIN_CONTENT_WIDTH, f"{source}: the content column is {report['contentWidth']:.0f} px wide"
    assert not report["pastTheEdge"], f"{source}: reaches past the content column (cut off or overflowing): {report['pastTheEdge']}"

    # every link to another page of the site leads to a page (not to a chapter's source, not to a 404)
    local = sorted({link.split("#")[0] for link in report["links"] if link.startswith(server)} - {url, ""})
    to_sources = [link for link in local if link.endswith((".py", ".md"))]
    assert not to_sources, f"{source}: links to source files instead of their pages: {to_sources}"
    dead = []
    for link in local:
        try:
            with urllib.request.urlopen(link, timeout=30) as response:
                response.read()  # the whole page: closing early breaks the server's pipe mid-send
        except OSError as error:
            dead.append(f"{link} ({error})")
    assert not dead, f"{source}: links that lead nowhere: {dead}"

    if source.endswith(".py"):
        assert report["notebookCells"] > 0, f"{source}: no notebook cells on the page"
        assert report["highlightedTokens"] > 0, f"{source}: the code is not highlighted"
        stem = Path(source).stem
        assert sorted(report["downloads"]) == sorted([f"{stem}.ipynb", f"{stem}.py"]), report["downloads"]


@pytest.mark.skipif(not any(p[1].endswith(".py") for p in PAGES), reason="no chapter in the nav yet")
def test_chapter_downloads(server):
    for _, source in [p for p in PAGES if p[1].endswith(".py")]:
        base = server + page_url(source) + Path(source).stem
        with urllib.request.urlopen(base + ".py") as response:
            assert response.read() == (BOOK / source).read_bytes(), f"{source}: the downloaded source differs"
        with urllib.request.urlopen(base + ".ipynb") as response:
            notebook = nbformat.reads(response.read().decode(), as_version=4)
        nbformat.validate(notebook)
        expected = jupytext.read(BOOK / source)
        assert [cell.source for cell in notebook.cells] == [cell.source for cell in expected.cells]
        assert all(not cell.get("outputs") for cell in notebook.cells), f"{source}: the notebook download has outputs"
        assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_search_finds_the_legend(server, browser):
    """The search index is built and the search box answers, offline."""
    browser.navigate(server + "?q=dimension+legend")
    count = browser.evaluate(
        r"""
        (async () => {
          for (let i = 0; i < 100; i++) {
            const n = document.querySelectorAll(".md-search-result__item").length;
            if (n > 0) return n;
            await new Promise((resolve) => setTimeout(resolve, 100));
          }
          return 0;
        })()
        """
    )
    assert count > 0, "searching 'dimension legend' gives no result"
    assert not problems_in_events(list(browser.events), server)


def test_screenshots_at_1280_px(server, browser):
    """Screenshots for a person to look at: the pages a reader checks first, at the top and further down."""
    ARTIFACTS.mkdir(exist_ok=True)
    for source in SCREENSHOT_PAGES:
        if not (BOOK / source).is_file():
            continue
        visit(browser, server + page_url(source), server)
        height = browser.evaluate("document.documentElement.scrollHeight")
        for part, y in enumerate((0, height // 3)):
            browser.evaluate(f"window.scrollTo(0, {y})")
            time.sleep(0.3)
            browser.screenshot(ARTIFACTS / f"1280px-{Path(source).stem}-{part}.png")
        browser.evaluate("window.scrollTo(0, 0)")
    assert (ARTIFACTS / "1280px-index-0.png").stat().st_size > 10_000


def test_screenshots_light_and_dark(server, browser):
    """Screenshots for a person to look at, and the dark theme switch."""
    ARTIFACTS.mkdir(exist_ok=True)
    visit(browser, server, server)
    browser.screenshot(ARTIFACTS / "index.png")
    chapters = [p for p in PAGES if p[1].endswith(".py")]
    page = chapters[0] if chapters else PAGES[-1]
    report, _ = visit(browser, server + page_url(page[1]), server)
    browser.screenshot(ARTIFACTS / f"{_page_id(page).replace('/', '_')}.png")
    scheme = report["colorScheme"]
    browser.evaluate(
        """document.querySelector("form[data-md-component=palette] label:not([hidden])").click()"""
    )
    time.sleep(0.3)
    switched = browser.evaluate("document.body.getAttribute('data-md-color-scheme')")
    assert switched != scheme and switched in ("default", "slate"), (scheme, switched)
    browser.screenshot(ARTIFACTS / f"{_page_id(page).replace('/', '_')}-{switched}.png")
    browser.evaluate("""document.querySelector("form[data-md-component=palette] label:not([hidden])").click()""")
    assert (ARTIFACTS / "index.png").stat().st_size > 10_000
