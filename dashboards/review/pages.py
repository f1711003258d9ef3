"""The review pages (Streamlit): worklist, case (the PACS deep link), QC gate.

A case is read from the event log (the study's history), so what a reader submits is
checked against every fact, including ones the read model has not folded yet. Images
come from the instance store and the AI's SEG from the results folder; both are
immutable, so they are cached per run and per slice. Lists (worklist, QC queue,
priors) come from the read model through ``projections.review_queries``.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import fmt
from dashboards.config import ReviewConfig
from dashboards.review import dicom_files, render
from dashboards.review import event_log as log
from dashboards.review.auth import Role, User
from dashboards.review.policy import (
    Case,
    ReviewForm,
    ReviewRefused,
    build_edit,
    build_qc,
    build_review,
    cases_of_study,
    check_open,
    current_cases,
    questions,
)
from dashboards.review.session import blinded_study, require, review_config
from dashboards.text import html_table, plain
from events.base import Event
from events.catalogue import (
    CaseViewed,
    InferenceCompleted,
    InstanceStored,
    MeasurementRecomputed,
)
from events.errors import EditRejected, EventsError, StoreError
from events.instance_store import InstanceStore
from events.jetstream import BusSettings
from projections import review_queries as RQ
from projections.duckdb_store import read_only
from projections.errors import ProjectionsError

MAX_UPLOAD_MB = dicom_files.MAX_EDIT_MB
logger = logging.getLogger("lastmile.review.pages")


def _ctx() -> dict[str, Any]:
    ctx: dict[str, Any] = st.session_state["lm_ctx"]
    return ctx


def _user() -> User:
    user: User = _ctx()["user"]
    return user


def _bus() -> BusSettings:
    bus: BusSettings | None = _ctx()["bus"]
    if bus is None:
        st.error("The event log is not configured for this dashboard (LASTMILE_DASHBOARD_BUS).")
        st.stop()
    return bus


def _case_page() -> Any:
    return _ctx()["pages"]["case"]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class StudyFiles:
    """Where a run's images and AI result are, resolved from the study's events."""

    image_paths: dict[str, Path]  # sop_instance_uid -> file in the instance store
    seg_path: Path | None


def study_history(study_uid: str) -> list[Event]:
    try:
        events, _ = log.study_events(_bus(), study_uid)
    except EventsError as exc:
        st.error(f"The event log cannot be read: {exc}")
        st.stop()
    return events


def files_of(case: Case, events: Sequence[Event], cfg: ReviewConfig) -> StudyFiles:
    res = case.result
    wanted = set(res.selected_series)
    on_findings = {f.sop_instance_uid for f in res.findings if f.sop_instance_uid}
    paths: dict[str, Path] = {}
    for ev in events:
        if not isinstance(ev, InstanceStored):
            continue
        if (on_findings and ev.sop_instance_uid in on_findings) or \
                (not on_findings and (not wanted or ev.series_uid in wanted)):
            paths[ev.sop_instance_uid] = cfg.instances_dir / ev.store_key
    seg = next((cfg.results_dir / k for k in res.result_keys
                if Path(k).name.startswith("seg-")), None)
    return StudyFiles(paths, seg)


@st.cache_resource(max_entries=16, show_spinner="Loading images…")
def _volume(run_key: str, images: tuple[tuple[str, str], ...],
            seg: str | None) -> dicom_files.Volume:
    return dicom_files.load_volume({u: Path(p) for u, p in images}, Path(seg) if seg else None)


def volume_of(case: Case, files: StudyFiles) -> dicom_files.Volume:
    return _volume(case.run_key, tuple(sorted((u, str(p)) for u, p in
                                              files.image_paths.items())),
                   str(files.seg_path) if files.seg_path else None)


@st.cache_data(max_entries=4096, show_spinner=False)
def _slice_png(run_key: str, images: tuple[tuple[str, str], ...], seg: str | None,
               index: int) -> bytes:
    vol = _volume(run_key, images, seg)
    mask = vol.mask[index] if vol.mask is not None else None
    return render.slice_png(vol.images[index].pixels, mask)


@st.cache_data(max_entries=1024, show_spinner=False)
def _boxes_png(run_key: str, images: tuple[tuple[str, str], ...], seg: str | None,
               sop_uid: str, boxes: tuple[tuple[str, str, tuple[float, float, float, float]],
                                          ...]) -> bytes:
    vol = _volume(run_key, images, seg)
    img = next(i for i in vol.images if i.sop_instance_uid == sop_uid)
    return render.boxes_png(img.pixels, boxes)


def _read_model(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        with read_only(_ctx()["db"], wait_s=5.0) as con:
            return fn(con, *args, **kwargs)
    except ProjectionsError as exc:
        st.warning(f"The read model cannot be read: {exc}")
        return []


# --------------------------------------------------------------------------- drawing


def show_png(png: bytes, caption: str) -> None:
    """A case image sent inside the signed-in page connection (a ``data:`` URI), never as
    a Streamlit ``/media`` file: a patient's image has no URL anyone else could fetch."""
    b64 = base64.b64encode(png).decode("ascii")
    text = html.escape(caption)
    st.html(f'<figure class="lm-case-image" style="margin:0"><img alt="{text}" '
            f'style="max-width:100%;height:auto" src="data:image/png;base64,{b64}">'
            f'<figcaption style="font-size:0.85rem;color:#6b6f76">{text}</figcaption></figure>')


def draw_result(case: Case, files: StudyFiles) -> None:
    """The AI result on the source images: boxes on radiographs, a mask over slices."""
    if not files.image_paths:
        st.warning("The source images of this result are not in the instance store here.")
        return
    key = tuple(sorted((u, str(p)) for u, p in files.image_paths.items()))
    seg = str(files.seg_path) if files.seg_path else None
    res = case.result
    # boxes on radiographs (HFD); a study-level finding without a box (BTS's progression,
    # a classifier's decision) leaves the slices with their mask below
    per_image: dict[str, list[tuple[str, str, tuple[float, float, float, float]]]] = {}
    for f in res.findings:
        if f.sop_instance_uid and f.box:
            per_image.setdefault(f.sop_instance_uid, []).append(
                (f.label, f.classification, tuple(f.box)))  # type: ignore[arg-type]
    if per_image:
        uids = sorted(per_image)
        cols = st.columns(min(3, max(1, len(uids))))
        for i, uid in enumerate(uids):
            with cols[i % len(cols)]:
                show_png(_boxes_png(case.run_key, key, seg, uid, tuple(per_image[uid])),
                         f"image {i + 1} of {len(uids)}")
        return
    vol = volume_of(case, files)
    n = len(vol.images)
    if files.seg_path is not None and vol.mask is None:
        st.warning("The AI segmentation could not be read.")
    default = int(np.argmax(vol.mask.reshape(n, -1).sum(axis=1))) if vol.mask is not None \
        and n else 0
    index = st.slider("Slice", 1, n, default + 1, key=f"slice:{case.run_key}") - 1 if n > 1 \
        else 0
    show_png(_slice_png(case.run_key, key, seg, index),
             f"slice {index + 1} of {n}; "
             + ", ".join(f"{lbl} ({c})" for lbl, c in _legend(vol.segment_labels)))


def _legend(labels: dict[int, str] | Any) -> list[tuple[str, str]]:
    names = ("red", "blue", "yellow", "green", "purple")
    return [(lbl, names[(n - 1) % len(names)]) for n, lbl in sorted(labels.items())]


def draw_measurements(case: Case, events: Sequence[Event]) -> None:
    res = case.result
    d = fmt.decimals_to_distinguish(m.value for m in res.measurements)
    rows = [{"measurement": plain(m.name.replace("_", " ")), "label": plain(m.label or ""),
             "value": fmt.quantity(m.value, m.unit, d)} for m in res.measurements]
    if res.findings:
        rows += [{"measurement": plain(f.label), "label": plain(f.classification),
                  "value": fmt.quantity(f.probability, "probability", 3)}
                 for f in sorted(res.findings, key=lambda f: (f.label, -(f.probability or 0)))]
    if rows:
        st.table(pd.DataFrame(rows))
    recomputed = [e for e in events if isinstance(e, MeasurementRecomputed)
                  and e.run_key == case.run_key]
    for ev in recomputed:
        st.markdown("**Recomputed after an edit:** " + ", ".join(
            f"{plain(m.label or m.name)} {m.value:.1f} {plain(m.unit)}" for m in ev.measurements)
            + ("; Dice against the AI: " + ", ".join(f"{plain(k)} {v:.3f}" for k, v in
                                                     sorted(ev.dice.items()))
               if ev.dice else ""))


def draw_priors(case: Case) -> None:
    res = case.result
    if not res.patient_pseudonym or not res.measurements:
        return
    rows = _read_model(RQ.priors, res.patient_pseudonym, case.pipeline,
                       up_to_date=res.study_date)
    if len(rows) < 2 and not any(r.run_key != case.run_key for r in rows):
        return
    st.subheader("Priors")
    d = fmt.decimals_to_distinguish(r.value for r in rows)
    st.table(pd.DataFrame([{
        "study date": fmt.dicom_date(r.study_date), "measurement":
        r.measurement.replace("_", " "), "value": fmt.quantity(r.value, r.unit, d),
        "% vs baseline": fmt.MISSING if r.change_from_baseline_pct is None
        else f"{r.change_from_baseline_pct:+.1f}",
        "% vs previous": fmt.MISSING if r.change_from_previous_pct is None
        else f"{r.change_from_previous_pct:+.1f}",
        "this exam": "◀" if r.run_key == case.run_key else ""} for r in rows]))


def draw_reads(case: Case, user: User) -> None:
    """Everyone's reads, shown only once this reader submitted their own."""
    visible = case.visible_reviews(user.name)
    if not visible:
        return
    st.subheader("Reads of this case")
    st.html(html_table([{  # typed text: escaped HTML, never markdown
        "reader": r.reader,
        "reads": ", ".join(f"{k}: {v}" for k, v in sorted(r.reads.items())),
        "agrees with AI": ", ".join(f"{k}: {'yes' if v else 'no'}"
                                    for k, v in sorted(r.agree.items())),
        "confidence": "" if r.confidence is None else str(r.confidence),
        "comment": r.comment or ""} for r in visible]))


# --------------------------------------------------------------------------- actions


def _opened(run_key: str) -> float:
    """When this session opened the case (server clock): time on case is measured."""
    key = f"opened:{run_key}"
    if key not in st.session_state:
        st.session_state[key] = time.monotonic()
    return float(st.session_state[key])


def viewed(case: Case, user: User, page: str, key: str | None = None) -> None:
    """Record once per page session that ``user`` opened this case (``review.case.viewed``);
    a log that does not answer costs a log line, not the page."""
    marker = f"viewed:{key or case.run_key}"
    if marker in st.session_state:
        return
    st.session_state[marker] = True
    ev = case.result.caused(CaseViewed, actor=user.name, run_key=case.run_key,
                            reader=user.name, page=page)
    try:
        log.publish(_bus(), ev)
    except EventsError as exc:
        logger.warning("case view not recorded: %s", type(exc).__name__)


def _seconds(run_key: str) -> float:
    return time.monotonic() - _opened(run_key)


def _publish(event: Event, done: str) -> None:
    try:
        log.publish(_bus(), event)
    except EventsError as exc:
        st.error(f"Not recorded: the event log did not accept it ({exc}). Try again.")
        return
    st.session_state["lm_flash"] = done
    st.rerun()


def _flash() -> None:
    msg = st.session_state.pop("lm_flash", None)
    if msg:
        st.success(msg)


def review_form(case: Case, user: User) -> None:
    """One button for "agree", the detailed form for anything else."""
    qs = questions(case.result)
    try:
        check_open(case, reader=user.name, qc_pipelines=review_config().qc_pipelines)
    except ReviewRefused as exc:
        st.info(str(exc))
        return
    st.subheader("Your review")
    st.markdown("AI: " + "; ".join(f"**{plain(q.label)}**: {plain(q.ai)}" for q in qs))
    feedback = st.empty()  # refusals show here, above the form, whichever button was used
    if st.button("Agree with AI and submit", type="primary", key="quick_agree"):
        _submit_review(case, user, ReviewForm(quick_agree=True), feedback)
    with st.expander("Disagree, or add confidence and a comment"), st.form("review"):
        agree: dict[str, bool] = {}
        reads: dict[str, str | None] = {}
        for q in qs:
            a, b = st.columns(2)
            agree[q.label] = a.radio(f"{q.label}: AI says {q.ai}", ("agree", "disagree"),
                                     horizontal=True, key=f"agree:{q.label}") == "agree"
            reads[q.label] = b.selectbox(f"Your read of {q.label} (if you disagree)",
                                         q.choices, index=None, key=f"read:{q.label}")
        confidence = st.radio("Confidence (1 = unsure, 5 = certain)", (1, 2, 3, 4, 5),
                              index=None, horizontal=True, key="confidence")
        comment = st.text_area("Comment", key="comment", max_chars=2000)
        if st.form_submit_button("Submit review"):
            _submit_review(case, user, ReviewForm(agree=agree, reads=reads,
                                                  confidence=confidence, comment=comment),
                           feedback)


def _submit_review(case: Case, user: User, form: ReviewForm, feedback: Any) -> None:
    # re-read the log: a newer run, or this reader's review from another tab, wins
    fresh = cases_of_study(study_history(case.study_uid)).get(case.run_key, case)
    try:
        ev = build_review(fresh, user, form, seconds_on_case=_seconds(case.run_key),
                          qc_pipelines=review_config().qc_pipelines)
    except ReviewRefused as exc:
        feedback.error(str(exc))
        return
    _publish(ev, "Review recorded. Thank you.")


def edit_upload(case: Case, user: User, files: StudyFiles, cfg: ReviewConfig) -> None:
    if files.seg_path is None:
        return
    st.subheader("Correct the segmentation")
    st.caption("Upload a corrected DICOM SEG of this study (same series and frames as the "
               "AI's); volumes and Dice against the AI mask are recomputed.")
    up = st.file_uploader("Corrected segmentation (DICOM SEG)", key=f"edit:{case.run_key}",
                          max_upload_size=MAX_UPLOAD_MB)
    if up is not None and st.button("Submit corrected segmentation", key="submit_edit"):
        data = up.getvalue()
        fresh = cases_of_study(study_history(case.study_uid)).get(case.run_key, case)
        try:
            dicom_files.validate_edit(data, ai_seg_path=files.seg_path,
                                      study_uid=case.study_uid,
                                      source_series=case.result.selected_series)
            stored = InstanceStore(cfg.instances_dir).put([data])
            ev = build_edit(fresh, user, store_key=stored.store_key, sha256=stored.sha256)
        except (EditRejected, ReviewRefused) as exc:
            st.error(f"Edit not accepted: {exc}")
            return
        except StoreError as exc:
            st.error(f"Edit not stored: {exc}")
            return
        _publish(ev, "Corrected segmentation recorded; volumes and Dice will be recomputed.")


# --------------------------------------------------------------------------- pages


def worklist_page() -> None:
    user = _user()
    st.title("Worklist")
    require(user, Role.READER, "The worklist")
    cfg = review_config()
    rows = _read_model(RQ.worklist, user.name, list(user.pipelines),
                       sorted(cfg.qc_pipelines))
    blinded = blinded_study()
    if blinded is not None and user.name in blinded.readers:  # read on the blinded page
        rows = [r for r in rows if r.pipeline != blinded.pipeline]
    st.caption(f"{len(rows)} case(s) for {user.name}, newest first.")
    if not rows:
        st.info("Nothing to read. New cases appear here when they are assigned to you.")
    for r in rows:
        flags = "".join((" · PARTIAL study (completed at its maximum wait)" if r.partial
                         else "", " · STALE (pixels changed since)" if r.stale else ""))
        st.page_link(_case_page(), label=f"{plain(r.pipeline.upper())} · "
                     f"{fmt.dicom_date(r.study_date)} · study …{plain(r.study_uid[-12:])} · "
                     f"model {plain(r.model_version or '?')}{flags}",
                     query_params={"study": r.study_uid, "run": r.run_key})
    done = _read_model(RQ.reviewed_runs, user.name)
    if done:
        with st.expander(f"Reviewed by you ({len(done)})"):
            for run_key, study, when in done[:20]:
                st.page_link(_case_page(),
                             label=f"{when:%Y-%m-%d %H:%M} · study …{plain(study[-12:])}",
                             query_params={"study": study, "run": run_key})


def case_page() -> None:
    user = _user()
    cfg = review_config()
    study = st.query_params.get("study")
    st.title("Case")
    require(user, Role.READER, "Reading a case")
    if not study:
        st.caption("Open a case from the worklist or a PACS link (/case?study=UID).")
        return
    events = study_history(study)
    cases = cases_of_study(events)
    current = [c for c in current_cases(cases) if user.reads(c.pipeline)]
    run = st.query_params.get("run")
    if run and run in cases and user.reads(cases[run].pipeline):
        case = cases[run]
    elif len(current) == 1:
        case = current[0]
    elif current:
        st.caption(f"Study …{plain(study[-16:])}: several pipelines ran; choose one.")
        for c in current:
            st.page_link(_case_page(), label=f"{plain(c.pipeline.upper())} · model "
                         f"{plain(c.result.model_version)}",
                         query_params={"study": study, "run": c.run_key})
        return
    else:
        st.caption(f"Study {plain(study)}")
        st.warning("No AI result of this study for your pipelines (yet).")
        return
    blinded = blinded_study()
    if blinded is not None and case.pipeline == blinded.pipeline and \
            user.name in blinded.readers:
        st.caption(f"Study {plain(study)}")
        st.info("This exam is part of a blinded reading study: rate its masks on the "
                "Blinded reading page, where their sources are not shown.")
        st.page_link(_ctx()["pages"]["blinded"], label="Open blinded reading",
                     query_params={"run": case.run_key})
        return
    _opened(case.run_key)
    viewed(case, user, "case")
    res: InferenceCompleted = case.result
    st.caption(f"{plain(case.pipeline.upper())} · model {plain(res.model_name)} "
               f"{plain(res.model_version)} · study date {fmt.dicom_date(res.study_date)} · "
               f"study {plain(study)}")
    _flash()
    if case.superseded_by:
        st.warning("A newer result of this study exists.")
        st.page_link(_case_page(), label="Open the current result",
                     query_params={"study": study, "run": case.superseded_by})
    files = files_of(case, events, cfg)
    left, right = st.columns([3, 2])
    with left:
        draw_result(case, files)
    with right:
        draw_measurements(case, events)
        review_form(case, user)
        draw_reads(case, user)
    draw_priors(case)
    edit_upload(case, user, files, cfg)


def qc_page() -> None:
    user = _user()
    cfg = review_config()
    st.title("QC gate")
    require(user, Role.QC, "The QC gate")
    gated = sorted(p for p in cfg.qc_pipelines if user.reads(p))
    queue = _read_model(RQ.qc_queue, gated)
    st.caption(f"{len(queue)} result(s) waiting for QC ({', '.join(gated) or 'none'}), "
               "oldest first. Accept an exam to release it to readers.")
    _flash()
    if not queue:
        st.info("The QC queue is empty.")
        return
    row = queue[0]
    events = study_history(row.study_uid)
    case = cases_of_study(events).get(row.run_key)
    if case is None:
        st.warning("This result is not in the event log yet; reload in a moment.")
        return
    _opened(case.run_key)
    viewed(case, user, "qc")
    st.markdown(f"**{plain(case.pipeline.upper())}** · study {plain(case.study_uid)} · model "
                f"{plain(case.result.model_version)}")
    if row.partial:
        st.warning("Partial study: it completed at its maximum wait with instances missing "
                   "(an aborted association or missing declared instances).")
    draw_result(case, files_of(case, events, cfg))
    a, b = st.columns([1, 2])
    if a.button("Accept", type="primary", key="qc_accept"):
        _decide(case, user, accept=True, reason=None)
    with b.form("qc_reject"):
        reason = st.text_input("Reason for rejecting (e.g. wrong body part, motion)",
                               key="qc_reason")
        if st.form_submit_button("Reject"):
            _decide(case, user, accept=False, reason=reason)


def _decide(case: Case, user: User, *, accept: bool, reason: str | None) -> None:
    fresh = cases_of_study(study_history(case.study_uid)).get(case.run_key, case)
    try:
        ev = build_qc(fresh, user, accept=accept, reason=reason,
                      seconds_on_case=_seconds(case.run_key))
    except ReviewRefused as exc:
        st.error(str(exc))
        return
    _publish(ev, f"QC {'accepted' if accept else 'rejected'}: study …{case.study_uid[-12:]}.")
