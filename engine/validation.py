"""The gate every SEG and SR passes before it is stored or sent: dciodvfy (dicom3tools).

dciodvfy checks an object against its IOD (PS3.3 modules, attribute types, enumerated
values) and every value against its VR (PS3.5). An object with any ``Error`` line is
not written to the results folder and never reaches a PACS or XNAT: the operator that
built it treats it as not writable (a SEG falls back to an SR with image references,
an invalid SR fails the run, final, with the errors). Warnings are allowed (dciodvfy
warns about our private ``99LM`` codes and defined terms it does not know).

dciodvfy quotes values in its messages (``<13.04.1937>``); ``errors`` returns them
rewritten to the message, the attribute's keyword and tag, without the value.

dicom3tools is a Debian package (``.ci/apt-packages.txt``). Where it is not installed
the gate cannot run: ``available()`` is False, ``errors`` returns ``None``, and the
caller records that the object was not validated.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

TIMEOUT_S = 120.0
_TAG = re.compile(r"\(0x([0-9a-fA-F]{4}),0x([0-9a-fA-F]{4})\)")
_NAMED = re.compile(r"(attribute |Element=|Module=|Macro=)<([^>]*)>")
_VALUE = re.compile(r"<[^>]*>")


def available() -> bool:
    return shutil.which("dciodvfy") is not None


def sanitise(line: str) -> str:
    """One dciodvfy line without the values it quotes (keyword and tag kept)."""
    text = line.strip()
    if text.startswith("Error - "):
        text = text[len("Error - "):]
    tag = _TAG.search(text)
    if tag:
        head = text[: tag.start()].rstrip(" -")
        number = int(tag[1] + tag[2], 16)
        keyword = keyword_for_tag(number) or "private attribute"
        return f"{head}: {keyword} ({tag[1].upper()},{tag[2].upper()})"
    kept: dict[str, str] = {}

    def keep(m: re.Match[str]) -> str:
        token = f"\x00{len(kept)}\x00"
        kept[token] = m[0]
        return token

    text = _NAMED.sub(keep, text)
    text = _VALUE.sub("<value not shown>", text)
    text = re.sub(r"= '.'( \(0x[0-9a-f]+\))?", "", text)
    for token, original in kept.items():
        text = text.replace(token, original)
    return text


def errors_in_file(path: Path) -> list[str] | None:
    """dciodvfy's error lines for a Part 10 file, sanitised and de-duplicated;
    ``None`` when dciodvfy is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    out = subprocess.run([exe, str(path)], capture_output=True, text=True,
                         timeout=TIMEOUT_S, errors="replace")
    lines = [sanitise(line) for line in (out.stdout + out.stderr).splitlines()
             if line.startswith("Error")]
    return list(dict.fromkeys(lines))


def errors(ds: Dataset) -> list[str] | None:
    """dciodvfy's error lines for ``ds`` (written to a temporary Part 10 file)."""
    if not available():
        return None
    with tempfile.TemporaryDirectory(prefix="lastmile-verify-") as tmp:
        path = Path(tmp) / "object.dcm"
        ds.save_as(path, enforce_file_format=True)
        return errors_in_file(path)
