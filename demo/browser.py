"""Driving the demo page in a real headless browser: Debian's chromium through selenium (the browser test and
``scripts/demo_screenshot.py``). Nothing here is needed to serve the page.

``ensure_chromium()`` finds ``chromium`` and ``chromedriver`` and, where they are missing and this process may
(root, with apt-get), installs Debian's ``chromium`` and ``chromium-driver`` packages; otherwise it says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

PACKAGES = ("chromium", "chromium-driver")


@dataclass
class Chromium:
    browser: str
    driver: str


def find_chromium() -> Chromium | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return Chromium(browser, driver) if browser and driver else None


def ensure_chromium(timeout_s: float = 900) -> Chromium:
    """Chromium and its driver, installed from Debian's packages when missing; RuntimeError saying why not."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"chromium and chromedriver are not installed, and this process cannot install them "
                           f"(needs root and apt-get): apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    found = find_chromium()
    if not found:
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)} but chromium / chromedriver are not on PATH")
    return found


def open_browser(chromium: Chromium, width: int = 1280, height: int = 1000) -> Any:
    """A headless selenium Chrome session on Debian's chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium.browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromium.driver), options=options)


def wait_for(condition: Any, timeout_s: float = 120, every_s: float = 0.2, what: str = "the page") -> Any:
    """Poll ``condition()`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # an element re-rendered between finding and reading it: look again
            value = None
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


class DemoPage:
    """The demo page in a browser: fill the inputs, generate, read the answer back."""

    def __init__(self, driver: Any, url: str):
        self.driver, self.url = driver, url
        driver.get(url)
        wait_for(lambda: self._find("#generate"), what="the page to load")

    def _find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def type_prompt(self, text: str) -> None:
        box = self._find("#prompt textarea")
        box.clear()
        box.send_keys(text)

    def choose(self, target: str) -> None:
        from selenium.webdriver.common.by import By

        for label in self.driver.find_elements(By.CSS_SELECTOR, "#target label"):
            if label.text.strip() == target:
                label.click()
                return
        raise ValueError(f"no target {target!r} on the page")

    def upload(self, which: str, path: str) -> None:
        """``which``: "picture" or "audio"; the file goes into that widget's file input."""
        field = wait_for(lambda: self._find(f"#{which}_in input[type=file]"), what=f"the {which} upload")
        field.send_keys(str(path))

    def status(self, which: str = "status") -> str:
        """The status line (or another Markdown element by id, e.g. "picture_note")."""
        element = self._find(f"#{which}")
        return element.text.strip() if element is not None else ""

    def generate(self, timeout_s: float = 60) -> str:
        """Click Generate and wait for the answer (or a refusal); returns the status line."""
        before = self.status()
        self._find("#generate").click()
        try:
            return wait_for(lambda: (s := self.status()) and s != before and ("done" in s or "⚠" in s) and s,
                            timeout_s, what="an answer")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; the status line says {self.status()!r} (before the click: {before!r})") from e

    def picture(self) -> bytes:
        """The bytes of the picture shown as the answer (fetched from its URL, as the browser did)."""
        import base64
        import urllib.request

        src = wait_for(lambda: (img := self._find("#picture_out img")) and img.get_attribute("src"),
                       what="the picture")
        if src.startswith("data:"):
            return base64.b64decode(src.split(",", 1)[1])
        with urllib.request.urlopen(src, timeout=30) as response:
            return response.read()

    def text(self) -> str:
        box = wait_for(lambda: self._find("#text_out textarea"), what="the text answer")
        return box.get_attribute("value")
