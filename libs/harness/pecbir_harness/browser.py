"""Debian's chromium, headless, driven by Playwright: the browser of the page tests.

Never Playwright's own browser download (`playwright install`): the machines that run the
tests are offline, and the system's browser is the one a hospital's workstation would
update. `.ci/run` installs it (`apt-get install chromium`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CHROMIUM", "BrowserUnavailable", "chromium"]

CHROMIUM = Path("/usr/bin/chromium")


class BrowserUnavailable(RuntimeError):
    """No browser to drive: Playwright missing, no chromium, or it did not start."""


def _executable() -> Path:
    configured = os.environ.get("PECBIR_CHROMIUM")
    if configured:
        return Path(configured)
    found = shutil.which("chromium")
    return Path(found) if found else CHROMIUM


@contextmanager
def chromium(*, headless: bool = True) -> Iterator[object]:
    """A Playwright `Browser` of the system's chromium (``PECBIR_CHROMIUM`` overrides).

    Parameters
    ----------
    headless
        No window (the default; tests and benchmarks).

    Yields
    ------
    playwright.sync_api.Browser
        The started browser, closed on exit.

    Raises
    ------
    BrowserUnavailable
        Playwright is not installed, chromium is not there or does not start.
    """
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        raise BrowserUnavailable(f"playwright is not installed ({exc})") from None
    executable = _executable()
    if not executable.exists():
        raise BrowserUnavailable(f"no chromium at {executable} (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            # --no-sandbox: CI containers run as root, where chromium's sandbox cannot start.
            browser = playwright.chromium.launch(
                executable_path=str(executable),
                headless=headless,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
        except Error as exc:
            raise BrowserUnavailable(f"chromium did not start: {exc.message[:300]}") from None
        try:
            yield browser
        finally:
            browser.close()
