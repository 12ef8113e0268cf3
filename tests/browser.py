"""A real browser for the report tests: headless Chromium screenshots, and the CI policy.

In CI (CI=true) a missing Chromium fails the test: the rendering check must run there. Elsewhere
it is skipped, saying how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def chromium() -> str | None:
    """The Chromium (or Chrome) binary on this machine, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def require_chromium() -> str:
    """Chromium's path; fails in CI and skips elsewhere when it is not installed."""
    browser = chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("Chromium not installed, but CI=true: the report rendering check must run in CI")
        pytest.skip("Chromium not installed (apt-get install chromium); CI installs it and runs this check")
    return browser


def screenshot(page: Path, shot: Path, window: tuple[int, int], profile: Path) -> Image.Image:
    """Headless Chromium's screenshot of ``page`` (a local HTML file) at ``window`` (width, height)."""
    command = [
        require_chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        f"--window-size={window[0]},{window[1]}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"Chromium wrote no screenshot of {page.name} (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return Image.open(shot)


def assert_not_blank(image: Image.Image, what: str) -> None:
    """The image shows something: spread in its pixels and more than a handful of colours."""
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.std() > 5, f"{what} looks blank (pixel std {pixels.std():.2f})"
    rgb = pixels.reshape(-1, 3).astype(np.int64)
    colours = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    assert len(colours) > 10, f"{what} has only {len(colours)} colours"
