"""End to end in a real browser: `streamlit run app.py`, headless Chromium through Selenium.

Uploads a sample image through the page's file input, waits for the figures, checks that no
exception box is shown, downloads a figure and the zip for the image, and takes a screenshot.
The screenshot goes to the test's temporary folder, or to the path in ATTENTION_LENS_SCREENSHOT
(`ATTENTION_LENS_SCREENSHOT=docs/screenshot.png pytest tests/test_browser.py` refreshes the
README's picture). Uses the embedded CBAM checkpoint when it exists, else small random-weight
checkpoints. Skipped when chromium or chromedriver is not installed. Loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from models.checkpoints.zoo import CHECKPOINT_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
REAL_CBAM = ROOT / "checkpoints" / "resnet18_cbam_imagenette.safetensors"
UPLOAD = ROOT / "samples" / "tench_12881.jpg"
START_TIMEOUT = 120  # seconds for the server to answer its health check
PAGE_TIMEOUT = 240  # seconds for the page to finish a run (the CPU is shared)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End the server we started (its own process group), politely first."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


@pytest.fixture
def server(tmp_path, checkpoint_writer):
    env = dict(os.environ)
    if not REAL_CBAM.is_file():
        folder = tmp_path / "checkpoints"
        folder.mkdir()
        checkpoint_writer(folder, kinds=("cbam",))
        env[CHECKPOINT_DIR_ENV] = str(folder)
    port = _free_port()
    log = (tmp_path / "streamlit.log").open("wb")
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.headless", "true", "--server.port", str(port),
        "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}: {_tail(tmp_path)}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start in {START_TIMEOUT} s: {_tail(tmp_path)}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        log.close()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "streamlit.log").read_text(errors="replace")[-2000:]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1440,1500",
    ):  # fmt: skip
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        driver.downloads = downloads
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout=PAGE_TIMEOUT, what=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition, message=what)


def _idle(driver) -> bool:
    """The script is not running (no status widget saying so) and the page has content."""
    from selenium.webdriver.common.by import By

    running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
    return not running and bool(driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"]'))


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _rendered_images(driver) -> int:
    return driver.execute_script(
        'return [...document.querySelectorAll(\'[data-testid="stImage"] img, '
        '[data-testid="stFullScreenFrame"] img\')]'
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )


def _download(driver, button, suffix: str, timeout: float = 120) -> Path:
    before = set(driver.downloads.iterdir())
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in driver.downloads.iterdir() if p not in before and p.suffix == suffix]
        if new and new[0].stat().st_size > 0:
            return new[0]
        time.sleep(0.5)
    pytest.fail(f"no {suffix} download after {timeout} s: {sorted(driver.downloads.iterdir())}")


def test_upload_render_download_screenshot(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait(browser, lambda d: "Prediction:" in _text(d) and _idle(d), what="the worked example")

    inputs = browser.find_elements(By.CSS_SELECTOR, 'input[type="file"]')
    images_input = next(i for i in inputs if ".jpg" in (i.get_attribute("accept") or ""))
    images_input.send_keys(str(UPLOAD))
    caption = f"{UPLOAD.name} as the network sees it"
    _wait(
        browser,
        lambda d: caption in _text(d) and _idle(d) and _rendered_images(d) >= 2,
        what="the uploaded image's analysis and figures",
    )
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert "Traceback" not in _text(browser)
    assert "Prediction:" in _text(browser)

    buttons = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stDownloadButton"] button')
    png = next(b for b in buttons if b.text.strip().endswith("PNG"))
    path = _download(browser, png, ".png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    zip_button = next(b for b in buttons if "(zip)" in b.text)
    path = _download(browser, zip_button, ".zip")
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist()
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')

    shot = Path(os.environ.get("ATTENTION_LENS_SCREENSHOT") or tmp_path / "screenshot.png")
    shot = shot if shot.is_absolute() else ROOT / shot
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0);")
    for el in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"]'):
        browser.execute_script("arguments[0].scrollTop = 0;", el)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def _click(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    driver.execute_script("arguments[0].click();", element)


def _real_click(driver, element) -> None:
    """A real click, as a user's (React sees it); on a busy machine the page may still be
    laying out when it lands, so an intercepted click is retried once the page has settled."""
    from selenium.common.exceptions import ElementClickInterceptedException

    for attempt in range(5):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        try:
            element.click()
            return
        except ElementClickInterceptedException:
            if attempt == 4:
                raise
            time.sleep(1.0)


def _switch_on(driver, toggle) -> None:
    """Turn a toggle on as a user would; a click that lands while the expander above it is
    still opening is lost, so it is clicked again until the box is checked."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    box = toggle.find_element(By.CSS_SELECTOR, "input")
    for _ in range(5):
        _real_click(driver, toggle.find_element(By.CSS_SELECTOR, "label"))
        try:
            _wait(driver, lambda d: box.is_selected(), timeout=10, what="the toggle is on")
            return
        except TimeoutException:
            continue
    pytest.fail("the toggle did not turn on after five clicks")


def _view_button(driver, name: str):
    """The view control's button named `name` (a segmented control, not tabs)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def found(d):  # a rerun may be redrawing the page: wait for the control to be back
        buttons = d.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button')
        try:
            named = [b for b in buttons if b.get_attribute("textContent").strip() == name]
        except StaleElementReferenceException:  # replaced while read: look again
            return False
        return named[0] if named else False

    return _wait(driver, found, what=f"a view named {name!r}")


def _open_view(driver, name: str) -> None:
    """Click the view's button until the control marks it chosen (a click may be lost while
    the page is still laying out), then wait for the view to be drawn."""
    from selenium.common.exceptions import TimeoutException

    def chosen(d) -> bool:
        return _view_button(d, name).get_attribute("aria-checked") == "true"

    for _ in range(5):
        _real_click(driver, _view_button(driver, name))
        try:
            _wait(driver, chosen, timeout=15, what=f"the view {name!r} chosen")
            break
        except TimeoutException:
            continue
    _settled(driver, f"the view {name!r}")


def _settled(driver, what: str) -> None:
    time.sleep(1.0)  # let the rerun start before waiting for it to end
    _wait(driver, lambda d: _idle(d), what=what)
    assert "Unexpected error" not in _text(driver), _text(driver)[:2000]


def test_captum_panel_survives_a_class_revisit(server, browser):
    """Captum on, another class, the first class again: the page keeps working (the cached
    function that drew a progress bar failed on this replay)."""
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait(browser, lambda d: "Prediction:" in _text(d) and _idle(d), what="the worked example")
    _open_view(browser, "Class activation map")
    expander = next(e for e in browser.find_elements(By.CSS_SELECTOR, "summary")
                    if "Captum attributions" in e.get_attribute("textContent"))  # fmt: skip
    _click(browser, expander)
    toggle = next(t for t in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stCheckbox"]')
                  if t.get_attribute("textContent").strip() == "Run")  # fmt: skip
    _switch_on(browser, toggle)
    _wait(browser, lambda d: "Attribution (npz)" in _text(d) and _idle(d),
          what="the Captum attribution's figure and download")  # fmt: skip

    def classes():
        radio = next(r for r in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"]')
                     if "Explain class" in r.get_attribute("textContent"))  # fmt: skip
        return radio.find_elements(By.CSS_SELECTOR, '[role="radiogroup"] label')

    first, second = (o.get_attribute("textContent") for o in classes()[:2])
    for name in (second, first):
        option = next(o for o in classes() if o.get_attribute("textContent") == name)
        _real_click(browser, option)
        _wait(browser, lambda d, o=option: o.find_element(By.CSS_SELECTOR, "input").is_selected(),
              timeout=30, what=f"the class {name} chosen")  # fmt: skip
        _settled(browser, f"explaining {name}")
        assert "Attribution (npz)" in _text(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert "Prediction:" in _text(browser)


VIEWS = {  # each view's name and a text only it shows
    "Spatial attention": "PNG",
    "Channel attention": "Top channels of the last module",
    "Class activation map": "Captum attributions",
    "Agreement & deletion/insertion": "Deletion / insertion",
    "BAM hierarchy": "BAM hierarchy exists only",
    "Compare models": "Models side by side",
    "Class statistics": "Mean channel weight per class",
    "Data set": "Run the report",
}


def test_every_view_opens_and_a_revisit_keeps_its_choices(server, browser):
    """The view control draws one view at a time; the one chosen stays chosen through a
    drawing change, and a view's widgets keep their values while another shows."""
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait(browser, lambda d: "Prediction:" in _text(d) and _idle(d), what="the worked example")
    for name, marker in VIEWS.items():
        _open_view(browser, name)
        assert marker in _text(browser), (name, _text(browser)[-1500:])
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert "Top channels of the last module" not in _text(browser)  # one view at a time
    _open_view(browser, "Agreement & deletion/insertion")
    steps = next(s for s in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSlider"]')
                 if s.get_attribute("textContent").strip().startswith("Steps"))  # fmt: skip
    steps.find_element(By.CSS_SELECTOR, 'input[type="range"], [role="slider"]').send_keys(
        "\ue014"
    )  # right arrow
    _settled(browser, "the steps")
    _open_view(browser, "Spatial attention")
    opacity = next(s for s in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSlider"]')
                   if s.get_attribute("textContent").strip().startswith("Overlay opacity"))  # fmt: skip
    opacity.find_element(By.CSS_SELECTOR, 'input[type="range"], [role="slider"]').send_keys(
        "\ue014"
    )
    _settled(browser, "the opacity")
    assert _view_button(browser, "Spatial attention").get_attribute("aria-checked") == "true"
    _open_view(browser, "Agreement & deletion/insertion")
    assert "24" in next(s.text for s in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSlider"]')
                        if s.text.startswith("Steps"))  # fmt: skip
