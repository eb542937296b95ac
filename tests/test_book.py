"""The book builds without warnings from the notebooks' stored (nbval-verified) outputs,
and every page loads in headless Chromium without console errors, broken links or images."""

import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site():
    """Build the book without executing, then serve it on 127.0.0.1."""
    result = subprocess.run([sys.executable, "-m", "stemml_core.cli", "book", "--no-execute"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert (HTML / "index.html").is_file()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is missing: run `make deps-system` (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="stemml-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _pages():
    skip = {"genindex.html", "search.html"}
    return sorted(str(p.relative_to(HTML)) for p in HTML.rglob("*.html")
                  if "_static" not in p.parts and "_sources" not in p.parts and p.name not in skip)


def test_book_pages_load_cleanly(site, browser):
    pages = _pages()
    assert "index.html" in pages and "notebooks/getting_started.html" in pages
    problems = []
    for page in pages:
        url = urljoin(site, page)
        browser.get(url)
        for entry in browser.get_log("browser"):
            if entry["level"] == "SEVERE":
                problems.append(f"{page}: console error: {entry['message']}")
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        problems += [f"{page}: image does not load: {src}" for src in broken]
        links = browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        for link in links:
            target, fragment = urldefrag(link)
            if not target.startswith(site):
                continue  # external links are not followed: the tests use no network
            path = HTML / urlparse(target).path.lstrip("/")
            if path.is_dir():
                path = path / "index.html"
            if not path.is_file():
                problems.append(f"{page}: broken link to {link}")
            elif fragment and path.suffix == ".html" and f'id="{fragment}"' not in path.read_text(encoding="utf-8"):
                problems.append(f"{page}: link to missing anchor {link}")
    assert not problems, "\n".join(problems)


def test_notebook_page_shows_executed_figures(site, browser):
    browser.get(urljoin(site, "notebooks/getting_started.html"))
    count = browser.execute_script(
        "return Array.from(document.images).filter(i => i.src.includes('_images') && i.naturalWidth > 0).length")
    assert count >= 2, "the getting-started page should show its stored figures"
