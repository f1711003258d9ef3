"""The governance report as PDF: the same HTML (``dashboards.report``) printed by
Debian's headless Chromium through Playwright's ``page.pdf()``.

Why Chromium: it is already the browser the pages are tested in (a Debian package, no
downloaded browser), it renders the report's inline SVG plots exactly as a reader's
browser shows them, and printing needs no second layout engine (WeasyPrint would need
Pango and its own CSS subset) — one HTML, two formats that cannot disagree.

``LASTMILE_CHROMIUM`` names another Chromium binary (default ``/usr/bin/chromium``).
"""

from __future__ import annotations

import os
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


class ReportPdfError(RuntimeError):
    """The PDF could not be printed (no Chromium, or it failed); the HTML still can."""


def chromium_path() -> str:
    return os.environ.get("LASTMILE_CHROMIUM", CHROMIUM)


def report_pdf(html: str, timeout_s: float = 60.0) -> bytes:
    """Print the self-contained report ``html`` to PDF bytes (ISO A4, landscape, CSS
    backgrounds kept, 10 mm margins). Raises ``ReportPdfError`` naming the Chromium
    binary when it is missing or printing fails."""
    exe = chromium_path()
    if not Path(exe).exists():
        raise ReportPdfError(f"cannot print the report as PDF: no Chromium at {exe} "
                             "(install Debian's chromium or set LASTMILE_CHROMIUM)")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True,
                                         args=CHROMIUM_ARGS, timeout=timeout_s * 1000)
            try:
                page = browser.new_page()
                page.set_content(html, wait_until="load", timeout=timeout_s * 1000)
                page.emulate_media(media="print")
                return page.pdf(format="A4", landscape=True, print_background=True,
                                margin={"top": "10mm", "bottom": "10mm", "left": "10mm",
                                        "right": "10mm"})
            finally:
                browser.close()
    except PlaywrightError as exc:
        raise ReportPdfError(f"cannot print the report as PDF with {exe}: "
                             f"{str(exc).splitlines()[0]}") from None
