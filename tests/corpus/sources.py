"""Where the corpus's real DICOM files come from, and the cache that keeps them.

Installed packages (test dependencies): ``pydicom-data`` (its ``data_store/data``) and
``pynetdicom`` (``pynetdicom/tests/dicom_files``). Downloaded once with pip, by exact
version, into ``$LASTMILE_CORPUS_CACHE`` (default ``~/.cache/lastmile-corpus``), one
folder per package and version, written atomically (a half-finished download is never
taken for a cached one):

- ``nibabel`` (wheel): ``nibabel/nicom/tests/data`` and ``nibabel/tests/data``;
- ``deid-data`` (sdist): real DX, CT, US and secondary captures from several vendors;
- ``xnat`` 0.8.1 *source* distribution (``--no-binary :all:``): the de-identified GE
  brain MR study with PD, FLAIR and T1 series (``xnat/tests/resources/ANONYMIZ.zip``)
  and a second GE MR study (``Case001``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import util
from pathlib import Path


@dataclass(frozen=True)
class Download:
    package: str
    version: str
    source_only: bool  # pip download --no-binary :all:


NIBABEL = Download("nibabel", "5.4.2", source_only=False)
DEID_DATA = Download("deid-data", "0.0.20", source_only=True)
XNAT = Download("xnat", "0.8.1", source_only=True)


def cache_dir() -> Path:
    root = os.environ.get("LASTMILE_CORPUS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lastmile-corpus"


def _fetch(dl: Download) -> Path:
    """The package's archive, downloaded once (pip, PyPI) into the cache."""
    folder = cache_dir() / f"{dl.package}-{dl.version}" / "download"
    found = sorted(folder.glob("*")) if folder.is_dir() else []
    if found:
        return found[0]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=root))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--disable-pip-version-check", "-d", str(tmp), f"{dl.package}=={dl.version}"]
        if dl.source_only:
            cmd[4:4] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True, timeout=900)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(folder.glob("*"))[0]


def _extracted(dl: Download, name: str, extract: Callable[[Path, Path], None]) -> Path:
    """``extract(archive, into)`` once per package version; the folder it filled."""
    target = cache_dir() / f"{dl.package}-{dl.version}" / name
    if target.is_dir():
        return target
    archive = _fetch(dl)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".x-", dir=target.parent))
    try:
        extract(archive, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gunzip_all(folder: Path) -> None:
    for gz in folder.rglob("*.dcm.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()


def nibabel_files() -> Path:
    """nibabel's test DICOMs (``*.dcm``; the gzipped ones unpacked)."""
    def extract(archive: Path, into: Path) -> None:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if (member.startswith(("nibabel/nicom/tests/data/", "nibabel/tests/data/"))
                        and member.endswith((".dcm", ".dcm.gz"))):
                    z.extract(member, into)
        _gunzip_all(into)
    return _extracted(NIBABEL, "files", extract)


def deid_files() -> Path:
    """deid-data's ``deid_data/data`` (the cine zips unpacked)."""
    def extract(archive: Path, into: Path) -> None:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/deid_data/data/" in m.name
                       and m.isfile() and m.name.endswith((".dcm", ".zip"))]
            tar.extractall(into, members=members, filter="data")
        for z in into.rglob("*.zip"):
            with zipfile.ZipFile(z) as zf:
                zf.extractall(z.parent)
            z.unlink()
    return _extracted(DEID_DATA, "files", extract)


def xnat_files() -> Path:
    """The xnat source distribution's test studies: ``ANONYMIZ/`` and ``Case001/``."""
    def extract(archive: Path, into: Path) -> None:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/xnat/tests/resources/" in m.name
                       and m.isfile() and (m.name.endswith((".dcm", "ANONYMIZ.zip")))]
            tar.extractall(into, members=members, filter="data")
        (zip_path,) = into.rglob("ANONYMIZ.zip")
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(into)
        zip_path.unlink()
        (case,) = into.rglob("Case001")
        os.replace(case, into / "Case001")
    return _extracted(XNAT, "files", extract)


def _package_dir(module: str) -> Path:
    spec = util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module} is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations)))


def pydicom_data_files() -> Path:
    """pydicom-data's files (the package installs as ``data_store``)."""
    return _package_dir("data_store") / "data"


def pynetdicom_files() -> Path:
    return _package_dir("pynetdicom") / "tests" / "dicom_files"
