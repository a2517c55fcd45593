"""How fast the app answers, end to end in headless Chromium: `python -m bench.app_latency`.

Starts `streamlit run app.py` on loopback and drives it with Selenium as a user would: an
opacity change, a colour-map change, a class change, a switch between two embedded models and
a PNG download, each repeated, interleaved (A B C D E A B C D E ...), medians reported.

`--root PATH` (repeatable) measures the app of other checkouts in the same run, e.g. the code
before a change (`git worktree add --detach /tmp/before <commit>`): one server and one browser
per root, the roots' rounds interleaved too, so "before" and "after" share the machine's load.

A change counts as answered when the page's last change caused by it has landed: a
MutationObserver on the page records the time of every DOM change; after the action, once the
app has been idle (no "running" widget, no change) for a second, the answer time is the last
change's time minus the action's. The action is the click or key press itself: finding the
control (and opening a select box's list) comes before it, outside the time (it was inside
until December 2026, some 0.1 to 0.3 s of WebDriver round trips per change).

The opacity goes back and forth, so later rounds show settings, classes and models seen before
(as a user going back); `--fresh` moves it one way, so that no figure of a round was drawn
before and each change is drawn anew. Needs Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUIET = 1.0  # seconds without a DOM change or a running widget: the answer has landed
LIMIT = 120.0  # seconds: an answer or a download that takes longer is a failure, not a time

_OBSERVE = """
window.__changes = [];
new MutationObserver(() => window.__changes.push(performance.now()))
  .observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
return performance.now();
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, log: Path, root: Path = ROOT) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the app did not start: {log.read_text()[-1000:]}")


def open_browser(downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-dev-shm-usage",
                f"--user-data-dir={downloads.parent / f'profile-{downloads.name}'}", "--window-size=1440,1500"):  # fmt: skip
        opts.add_argument(arg)
    # a page's downloads after its first count as automatic (the file comes after the click's
    # fetch): allowed, else Chrome holds them for a prompt nobody answers
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "profile.default_content_setting_values.automatic_downloads": 1})  # fmt: skip
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})  # fmt: skip
    return driver


def _running(driver) -> bool:
    return bool(driver.find_elements("css selector", '[data-testid="stStatusWidget"]'))


def answered(driver, action) -> float:
    """Seconds from `action()` to the last page change it caused."""
    start = driver.execute_script(_OBSERVE)
    action()
    quiet_since, last = time.monotonic(), start
    begun = time.monotonic()
    while time.monotonic() - quiet_since < QUIET:
        if time.monotonic() - begun > LIMIT:
            raise TimeoutError(f"the page did not settle in {LIMIT:.0f} s")
        time.sleep(0.05)
        newest = driver.execute_script("return Math.max(0, ...window.__changes);")
        if _running(driver) or newest > last:
            last, quiet_since = max(last, newest), time.monotonic()
    return (last - start) / 1000


def _by_label(driver, testid: str, label: str):
    for el in driver.find_elements("css selector", f'[data-testid="{testid}"]'):
        if el.get_attribute("textContent").strip().startswith(label):
            return el
    raise LookupError(f"no {testid} labelled {label!r}")


def _choose(driver, label: str, option_index: int):
    """Open the select box; the click on an option other than the one shown (alternating)."""
    box = _by_label(driver, "stSelectbox", label)
    field = box.find_element("css selector", "input")
    shown = field.get_attribute("value")
    field.click()
    options = [o for o in driver.find_elements("css selector", '[role="option"]')
               if o.get_attribute("textContent").strip() != shown]  # fmt: skip
    return options[option_index % min(2, len(options))].click


def _key(driver, label: str, key: str):
    """The key press on the slider labelled `label`."""
    slider = _by_label(driver, "stSlider", label).find_element(
        "css selector", 'input[type="range"], [role="slider"]'
    )
    return partial(slider.send_keys, key)


def _class(driver, n: int):
    """The click on the first or second class of the "Explain class" radio (the one not chosen)."""
    radio = _by_label(driver, "stRadio", "Explain class")
    inputs = radio.find_elements("css selector", 'input[type="radio"]')
    target = inputs[1] if inputs[0].is_selected() else inputs[0]
    return partial(driver.execute_script, "arguments[0].click();", target)


def prepared(driver, prepare) -> float:
    """`prepare()` finds the control (and opens a select box's list): the user's way to the
    action, outside the time; then the seconds from its action to the last page change."""
    return answered(driver, prepare())


def _download(driver, downloads: Path) -> float:
    button = next(b for b in driver.find_elements("css selector", '[data-testid="stDownloadButton"] button')
                  if b.text.strip().endswith("PNG"))  # fmt: skip
    # by name and time: a file of the same name may be written over (a model seen before)
    before = {p: p.stat().st_mtime_ns for p in downloads.iterdir()}
    start = time.monotonic()
    button.click()
    while time.monotonic() - start < LIMIT:
        new = [p for p in downloads.iterdir() if p.suffix == ".png"
               and before.get(p) != _mtime(p)]  # fmt: skip
        if new and new[0].stat().st_size > 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise TimeoutError(f"no PNG download in {LIMIT:.0f} s")


CHANGES = ("opacity", "colour map", "class", "model", "download")


class Page:
    """One app (one root) in a browser of its own, ready for the changes."""

    def __init__(self, url: str, downloads: Path) -> None:
        self.downloads = downloads
        self.driver = open_browser(downloads)
        self.driver.get(url)
        answered(self.driver, lambda: None)
        deadline = time.monotonic() + 300
        while "Prediction:" not in self.driver.find_element("tag name", "body").text:
            if time.monotonic() > deadline:
                raise SystemExit("the app did not show a prediction in 5 minutes")
            time.sleep(0.5)
        answered(self.driver, lambda: None)

    def round(self, i: int, times: dict[str, list[float]], fresh: bool = False) -> None:
        """Each change once (its times appended), the direction alternating with `i`; `fresh`:
        the opacity moves one way, so that no figure of the round was drawn before."""
        from selenium.webdriver.common.keys import Keys

        driver = self.driver
        arrow = Keys.ARROW_RIGHT if i % 2 == 0 or fresh else Keys.ARROW_LEFT
        actions = {
            "opacity": partial(_key, driver, "Overlay opacity", arrow),
            "colour map": partial(_choose, driver, "Colour map", i),
            "class": partial(_class, driver, i),
            "model": partial(_choose, driver, "Model in use", i),
        }
        steps = {**{k: partial(prepared, driver, a) for k, a in actions.items()},
                 "download": partial(_download, driver, self.downloads)}  # fmt: skip
        for name, step in steps.items():
            try:
                times[name].append(step())
            except TimeoutError as exc:  # counted as failed (nan), the rounds go on
                times[name].append(float("nan"))
                print(f"  {name}: failed ({exc})", file=sys.stderr, flush=True)
                continue
            print(f"  {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        answered(driver, lambda: None)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # renamed from its partial name meanwhile
        return None


def measure(urls: list[str], rounds: int, tmp: Path,
            fresh: bool = False) -> list[dict[str, list[float]]]:  # fmt: skip
    """Per app: each change's times, the apps' rounds interleaved (app 1, app 2, app 1, ...)."""
    pages = []
    try:
        for n, url in enumerate(urls):
            (tmp / f"downloads{n}").mkdir()
            pages.append(Page(url, tmp / f"downloads{n}"))
        times = [{k: [] for k in CHANGES} for _ in urls]
        for i in range(rounds):
            for n, (page, mine) in enumerate(zip(pages, times)):
                print(f"round {i + 1}, app {n + 1}", file=sys.stderr, flush=True)
                page.round(i, mine, fresh)
        return times
    finally:
        for page in pages:
            page.driver.quit()


def conditions() -> str:
    """What else the machine was doing: cores, load, and the training job if it ran."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    busy = subprocess.run(["pgrep", "-f", "train_hybrid"], capture_output=True, text=True)
    training = "a training job (train_hybrid) running" if busy.stdout.strip() else "no training job"
    return f"{os.cpu_count()} cores, load average {load} (1/5/15 min), {training}"


def _median(values: list[float]) -> str:
    """The median of the runs that answered, and how many failed if any did."""
    ok = [v for v in values if v == v]
    shown = f"{statistics.median(ok):.2f}" if ok else "-"
    return shown + (f" ({len(values) - len(ok)} failed)" if len(ok) < len(values) else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.app_latency", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fresh", action="store_true",
                   help="the opacity moves one way (0.5 up, at most 10 rounds): every figure of "
                   "a round is drawn anew, none shown again from what the app kept")  # fmt: skip
    p.add_argument("--root", action="append", type=Path, default=[],
                   help="another checkout whose app.py to measure beside this one (repeatable; "
                   "its column comes first)")  # fmt: skip
    args = p.parse_args(argv)
    if args.fresh and args.rounds > 10:
        p.error("--fresh: at most 10 rounds (the opacity goes from 0.5 to 1 in steps of 0.05)")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        print("error: needs chromium and chromedriver (apt-get install chromium chromium-driver)")
        return 2
    roots = [r.resolve() for r in args.root] + [ROOT]
    for root in roots:
        if not (root / "app.py").is_file():
            print(f"error: no app.py in {root}")
            return 2
    print(f"before: {conditions()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        procs = []
        try:
            urls = []
            for n, root in enumerate(roots):
                port = _free_port()
                procs.append(start_app(port, tmp / f"streamlit{n}.log", root))
                urls.append(f"http://127.0.0.1:{port}")
            times = measure(urls, args.rounds, tmp, args.fresh)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    print(f"after: {conditions()}")
    heads = [str(r) for r in roots]
    print("| change | " + " | ".join(f"median s: {h}" for h in heads) + " | runs |")
    print("|---|" + "---:|" * len(roots) + "---|")
    for name in CHANGES:
        medians = " | ".join(_median(t[name]) for t in times)
        runs = "; ".join(", ".join(f"{v:.2f}" for v in t[name]) for t in times)
        print(f"| {name} | {medians} | {runs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
