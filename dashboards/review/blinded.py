"""The blinded reading study's configuration (LTS): salt, readers, mask sources.

The file named by ``LASTMILE_BLINDED_STUDY`` (TOML) is the only place the key lives::

    pipeline = "lts"
    salt = "<a long random secret>"
    readers = ["reader.a", "reader.b"]
    sources = ["ai", "expert", "novice"]

Each source's mask of a run: ``ai`` is the run's own SEG; any other source is the latest
``EditSubmitted`` of the run with that ``source`` (registered with
``lastmile review add-mask UID --source expert FILE``). Readers see each mask under
``blinded_label(salt, study, source)`` in a per-reader order; ``unblinding`` turns the
log's runs into the label -> source map that ``projections.metrics.blinded_reads``
takes (``lastmile review unblinding-key``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dashboards.review.policy import blinded_label, reader_order, unblinding_key
from events.base import Event
from events.catalogue import EditSubmitted, InferenceCompleted

AI = "ai"


class BlindedStudyError(Exception):
    """The blinded study configuration is missing or malformed."""


@dataclass(frozen=True)
class BlindedStudy:
    pipeline: str
    salt: bytes
    readers: tuple[str, ...]
    sources: tuple[str, ...] = (AI, "expert", "novice")

    def label(self, study_uid: str, source: str) -> str:
        return blinded_label(self.salt, study_uid, source)


def parse_blinded_study(text: str, source: str = "blinded study file") -> BlindedStudy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BlindedStudyError(f"{source}: {exc}") from None
    unknown = set(data) - {"pipeline", "salt", "readers", "sources"}
    if unknown:
        raise BlindedStudyError(f"{source}: unknown keys {sorted(unknown)}")
    salt = data.get("salt")
    if not isinstance(salt, str) or len(salt) < 16:
        raise BlindedStudyError(f"{source}: salt must be a secret string of 16+ characters")
    readers = data.get("readers", [])
    sources = data.get("sources", [AI, "expert", "novice"])
    if not isinstance(readers, list) or not all(isinstance(r, str) for r in readers):
        raise BlindedStudyError(f"{source}: readers must be a list of user names")
    if not isinstance(sources, list) or not sources or len(set(sources)) != len(sources):
        raise BlindedStudyError(f"{source}: sources must be a list of distinct names")
    return BlindedStudy(str(data.get("pipeline", "lts")), salt.encode(), tuple(readers),
                        tuple(str(s) for s in sources))


def load_blinded_study(path: Path) -> BlindedStudy:
    """The study file; refused when others may read it (it holds the salt, which unblinds
    every label), as the users file is."""
    try:
        if path.stat().st_mode & 0o077:
            raise BlindedStudyError(f"{path} is readable by other users and holds the "
                                    f"blinding salt; run chmod 600 {path}")
        return parse_blinded_study(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise BlindedStudyError(f"cannot read {path}: {exc.strerror}") from None


def complete(study: BlindedStudy, masks: list[BlindedMask]) -> bool:
    """True when every configured source's mask exists: only a complete set is shown, so
    how many masks exist can never tell which one is the AI's."""
    return {m.source for m in masks} == set(study.sources)


@dataclass(frozen=True)
class BlindedMask:
    label: str
    source: str  # never shown to a reader
    result_key: str | None  # the AI SEG, relative to results_dir
    store_key: str | None  # another source's SEG, relative to instances_dir


def masks_of_run(study: BlindedStudy, result: InferenceCompleted,
                 events: Iterable[Event]) -> list[BlindedMask]:
    """The masks of one run that exist so far, one per configured source."""
    study_uid = result.study_uid or ""
    out: list[BlindedMask] = []
    latest: dict[str, EditSubmitted] = {}
    for ev in events:
        if isinstance(ev, EditSubmitted) and ev.run_key == result.run_key:
            latest[ev.source] = ev
    for src in study.sources:
        if src == AI:
            seg = next((k for k in result.result_keys if Path(k).name.startswith("seg-")), None)
            if seg:
                out.append(BlindedMask(study.label(study_uid, src), src, seg, None))
        elif src in latest:
            out.append(BlindedMask(study.label(study_uid, src), src, None,
                                   latest[src].store_key))
    return out


def ordered_for(masks: list[BlindedMask], reader: str, run_key: str) -> list[BlindedMask]:
    by_label = {m.label: m for m in masks}
    return [by_label[lbl] for lbl in reader_order(by_label, reader, run_key)]


def unblinding(study: BlindedStudy, events: Iterable[Event]) -> dict[str, str]:
    """label -> source for every run of the study's pipeline in ``events``."""
    studies: dict[str, set[str]] = {}
    for ev in events:
        if isinstance(ev, InferenceCompleted) and ev.pipeline == study.pipeline and ev.study_uid:
            studies.setdefault(ev.study_uid, set()).update(study.sources)
    return unblinding_key(study.salt, studies)
