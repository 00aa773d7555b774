"""The published tree in a real browser: headless Chromium, driven by selenium, with no network
but 127.0.0.1. The tree is served from a sub-path (http://127.0.0.1:PORT/course/), as GitHub Pages
serves a project site; chapter 2 is also opened from disk.

On every page: MathJax has typeset every formula (no raw TeX left in the text), every image has
loaded, nothing came from another host; on the book's pages the download, Colab and repository
buttons point into the published tree; search finds "momentum". A screenshot of chapter 2 is
saved to _build/artifacts/ch02.png.

Browser: Debian's /usr/bin/chromium and /usr/bin/chromedriver (``apt-get install chromium
chromium-driver``; .ci/run installs them as root), or BN_CHROMIUM / BN_CHROMEDRIVER.
"""
import functools
import http.server
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

from bngrade.pipeline.course import REPO, assignments
from bnpublish import NOTEBOOKS, exercise_of
from test_publish import CONFIG, book_pages, colab_url

pytestmark = pytest.mark.xdist_group("book")

PREFIX = "/course/"
ARTIFACTS = REPO / "_build" / "artifacts"
SCREENSHOT = ARTIFACTS / "ch02.png"
CH02 = "chapters/02_batchnorm_forward/index.html"

# After the page has loaded: wait for MathJax's first typeset, then report what a reader sees.
INSPECT_JS = r"""
const done = arguments[arguments.length - 1];
const report = () => {
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest(skip) || !el.checkVisibility()) continue;
    if (/\\\(|\\\)|\\\[|\$\$|\\begin\{/.test(node.textContent)) raw.push(node.textContent.trim().slice(0, 80));
  }
  const math = Array.from(document.querySelectorAll(".math")).filter(el => !el.closest("pre, code"));
  done({
    math: math.length,
    typeset: math.filter(el => el.querySelector("mjx-container")).length,
    containers: document.querySelectorAll("mjx-container").length,
    raw: raw,
    images: Array.from(document.images).map(img => [img.currentSrc || img.src, img.complete && img.naturalWidth > 0]),
    resources: performance.getEntriesByType("resource").map(entry => entry.name),
    url: location.href,
  });
};
const settle = promise => Promise.race([promise.catch(() => null), new Promise(ok => setTimeout(ok, 10000))]);
const images = Array.from(document.images).map(img => settle(img.decode()));
const typeset = window.MathJax && MathJax.startup ? MathJax.startup.promise : Promise.resolve();
Promise.all([typeset, ...images]).then(report, error => done({error: String(error)}));
"""


def _executable(variable, *candidates):
    for candidate in [os.environ.get(variable), *candidates]:
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
    chromium = _executable("BN_CHROMIUM", "/usr/bin/chromium", "chromium")
    driver_path = _executable("BN_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
    if not (chromium and driver_path):
        pytest.skip("no chromium/chromedriver: `apt-get install chromium chromium-driver` (or set BN_CHROMIUM, "
                    "BN_CHROMEDRIVER) to run the browser tests")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--hide-scrollbars", "--no-first-run", "--disable-extensions",
                # No host but this one: math and pages must render from the site alone.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


class _SubPath(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory`` under PREFIX only, as GitHub Pages serves a project site."""

    def send_head(self):
        if not self.path.startswith(PREFIX):
            self.send_error(404)
            return None
        self.path = "/" + self.path[len(PREFIX):]
        return super().send_head()

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128   # a chapter's page asks for dozens of files at once
    daemon_threads = True


@pytest.fixture(scope="module")
def site(published):
    """The base URL of the published tree, served from a sub-path of 127.0.0.1."""
    server = _Server(("127.0.0.1", 0), functools.partial(_SubPath, directory=str(published)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
    server.shutdown()
    server.server_close()


def load(browser, url):
    """Open ``url`` and wait until its page has loaded (after a redirect page, such as index.html, the next)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("window.bnLeft = true;")   # the page we leave: not to be taken for the next
    browser.get(url)
    ready = "return !window.bnLeft && document.readyState === 'complete' && document.querySelector('footer') !== null"
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(ready))


def visit(browser, url):
    """Load ``url`` and inspect it."""
    load(browser, url)
    seen = browser.execute_async_script(INSPECT_JS)
    assert "error" not in seen, f"{url}: {seen}"
    return seen


def problems_of(seen, base):
    """What is wrong with a visited page, as a list of strings."""
    found = []
    if seen["typeset"] < seen["math"]:
        found.append(f"{seen['math'] - seen['typeset']} of {seen['math']} formulas not typeset by MathJax")
    if seen["raw"]:
        found.append(f"raw TeX in the text: {seen['raw'][:3]}")
    found += [f"image did not load: {src}" for src, ok in seen["images"] if not ok]
    found += [f"loaded from elsewhere: {name}" for name in seen["resources"]   # (the browser's own favicon.ico)
              if not name.startswith(base) and not name.startswith("data:") and not name.endswith("/favicon.ico")]
    return found


def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def test_every_page_typesets_its_math_and_loads_its_images(browser, site, published):
    pages = sorted(p for p in published.rglob("*.html") if "_static" not in p.parts)
    assert len(pages) >= 2 * len(assignments()) + 3
    failures, with_math = {}, 0
    for page in pages:
        seen = visit(browser, site + page.relative_to(published).as_posix())
        with_math += seen["math"] > 0
        if problems := problems_of(seen, site):
            failures[page.relative_to(published).as_posix()] = problems
    assert not failures, json.dumps(failures, indent=1)[:4000]
    assert with_math >= len(assignments()), "the chapters have math"


def test_buttons_point_into_the_published_tree(browser, site, published):
    from selenium.webdriver.common.by import By

    failures = []
    for page, docname in sorted(book_pages(published).items()):
        url = site + page.relative_to(published).as_posix()
        load(browser, url)
        links = lambda css: [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, css)]
        if not browser.find_elements(By.CSS_SELECTOR, ".dropdown-download-buttons"):
            failures.append(f"{docname}: no download button")
        for href in links(".dropdown-download-buttons a"):
            if not href.startswith(site) or fetch(href)[0] != 200:
                failures.append(f"{docname}: download link {href} is not in the published tree")
        if links("a.btn-source-repository-button") != [CONFIG["repository"]["url"]]:
            failures.append(f"{docname}: repository button {links('a.btn-source-repository-button')}")
        name = exercise_of(docname)
        if name:
            notebook = site + f"{NOTEBOOKS}/{name}.ipynb"
            if links("a.btn-download-notebook-button") != [notebook]:
                failures.append(f"{docname}: download {links('a.btn-download-notebook-button')}, not {notebook}")
            elif json.loads(fetch(notebook)[1]) != json.loads((published / NOTEBOOKS / f"{name}.ipynb").read_text()):
                failures.append(f"{docname}: {notebook} is not the released notebook")
            if links("a.btn-launch-colab-button") != [colab_url(name)]:
                failures.append(f"{docname}: Colab {links('a.btn-launch-colab-button')}, not {colab_url(name)}")
            chapter = url.rsplit("/", 1)[0] + "/index.html"
            if links("a.left-prev") != [chapter]:
                failures.append(f"{docname}: does not link back to its chapter {chapter}")
        elif docname.startswith("chapters/"):
            exercise = url.rsplit("/", 1)[0] + f"/ch{docname.split('/')[1]}.html"
            if exercise not in links("article a"):
                failures.append(f"{docname}: does not link its exercise {exercise}")
            if links("a.btn-launch-colab-button") or [h for h in links("a") if "colab.research" in h]:
                failures.append(f"{docname}: a Colab button for a page the published tree does not hold")
    assert not failures, "\n".join(failures)


def test_search_finds_momentum(browser, site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    load(browser, site + "search.html?q=momentum")
    results = WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_all_elements_located((By.CSS_SELECTOR, "#search-results ul.search li")))
    targets = [r.find_element(By.TAG_NAME, "a").get_attribute("href") for r in results]
    assert len(targets) >= 2 and all(t.startswith(site + "chapters/") for t in targets), targets


def test_chapter_2_renders_from_the_site_and_from_disk(browser, site, published):
    """Chapter 2 typesets its math served from a sub-path and opened as a file; its screenshot is an artifact."""
    seen = visit(browser, site + CH02)
    assert seen["math"] >= 10 and seen["containers"] >= seen["math"], seen["math"]
    assert problems_of(seen, site) == []
    from selenium.webdriver.common.by import By

    formula = browser.find_element(By.CSS_SELECTOR, "div.math mjx-container")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", formula)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 10_000

    on_disk = (published / CH02).as_uri()
    seen = visit(browser, on_disk)
    assert seen["url"] == on_disk
    assert seen["math"] >= 10 and seen["typeset"] == seen["math"], (seen["math"], seen["typeset"])
    assert problems_of(seen, published.as_uri() + "/") == []
    formula = browser.find_element(By.CSS_SELECTOR, "div.math mjx-container")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", formula)
    browser.save_screenshot(str(SCREENSHOT.with_name("ch02_from_disk.png")))
