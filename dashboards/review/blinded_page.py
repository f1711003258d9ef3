"""The blinded reading page (LTS): a reader rates each mask of an exam (AI, expert,
novice) under its salted label, in their own random order, never seeing the source.

Without ``LASTMILE_BLINDED_STUDY`` the page says so. The label -> source key never
reaches the page's output: only labels are drawn, and the ratings go to the log as
``ReviewSubmitted`` with ``blinded_label``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from dashboards.review import dicom_files, render
from dashboards.review import pages as P
from dashboards.review.auth import Role
from dashboards.review.blinded import (
    BlindedMask,
    complete,
    masks_of_run,
    ordered_for,
)
from dashboards.review.policy import (
    MASK_CLASSES,
    ReviewRefused,
    build_blinded_review,
    cases_of_study,
)
from dashboards.review.session import blinded_study, require, review_config
from dashboards.text import plain
from projections import review_queries as RQ


@st.cache_data(max_entries=2048, show_spinner=False)
def _mask_png(run_key: str, images: tuple[tuple[str, str], ...], seg: str, index: int) -> bytes:
    vol = P._volume(run_key, images, seg)
    mask = vol.mask[index] if vol.mask is not None else None
    return render.slice_png(vol.images[index].pixels, mask)


def _seg_path(mask: BlindedMask) -> Path:
    cfg = review_config()
    if mask.result_key:
        return cfg.results_dir / mask.result_key
    return cfg.instances_dir / (mask.store_key or "")


def blinded_page() -> None:
    user = P._user()
    st.title("Blinded reading")
    require(user, Role.READER, "Blinded reading")
    study = blinded_study()
    if study is None:
        st.caption("No blinded study is configured (LASTMILE_BLINDED_STUDY).")
        return
    if user.name not in study.readers and not user.has(Role.ADMIN):
        st.caption(f"{user.name} is not a reader of the blinded {study.pipeline} study.")
        return
    rows = P._read_model(RQ.blinded_worklist, user.name, study.pipeline)
    run = st.query_params.get("run")
    row = next((r for r in rows if r.run_key == run), None) or next(
        (r for r in rows if r.rated < len(study.sources)), None)
    st.caption(f"{len(rows)} exam(s) of {study.pipeline.upper()} assigned to {user.name}; "
               "each mask is shown under a code, in your own order.")
    P._flash()
    if row is None:
        st.info("No exam to rate.")
        return
    events = P.study_history(row.study_uid)
    case = cases_of_study(events).get(row.run_key)
    if case is None:
        st.warning("This exam is not in the event log yet.")
        return
    found = masks_of_run(study, case.result, events)
    if not complete(study, found):  # never a partial set: its size would tell the source
        st.info("The masks of this exam are not all ready yet; it opens here once they are.")
        return
    masks = ordered_for(found, user.name, case.run_key)
    todo = [m for m in masks if not case.reviewed_by(user.name, m.label)]
    st.markdown(f"Exam …{plain(case.study_uid[-12:])}: {len(masks) - len(todo)} of "
                f"{len(masks)} masks rated.")
    if not todo:
        st.success("All masks of this exam are rated.")
        return
    mask = todo[0]
    P._opened(f"{case.run_key}:{mask.label}")
    P.viewed(case, user, "blinded")
    files = P.files_of(case, events, review_config())
    key = tuple(sorted((u, str(p)) for u, p in files.image_paths.items()))
    seg = str(_seg_path(mask))
    try:
        vol = P._volume(case.run_key, key, seg)
    except dicom_files.EditRejected as exc:
        st.error(f"Mask {mask.label} cannot be read: {exc}")
        return
    n = len(vol.images)
    st.subheader(f"Mask {mask.label}")
    start = int(np.argmax(vol.mask.reshape(n, -1).sum(axis=1))) if vol.mask is not None \
        and n else 0  # the slice where the mask is largest
    index = st.slider("Slice", 1, n, start + 1, key=f"bslice:{case.run_key}:{mask.label}") - 1 \
        if n > 1 else 0
    P.show_png(_mask_png(case.run_key, key, seg, index), f"slice {index + 1} of {n}")
    with st.form(f"blind:{mask.label}"):
        read = st.radio("Is this segmentation clinically acceptable?", MASK_CLASSES, index=None,
                        horizontal=True)
        confidence = st.radio("Confidence (1-5)", (1, 2, 3, 4, 5), index=None, horizontal=True)
        comment = st.text_input("Comment")
        if st.form_submit_button("Submit rating", type="primary"):
            fresh = cases_of_study(P.study_history(case.study_uid)).get(case.run_key, case)
            try:
                ev = build_blinded_review(
                    fresh, user, label=mask.label, read=read, confidence=confidence,
                    comment=comment, seconds_on_case=P._seconds(f"{case.run_key}:{mask.label}"),
                    allowed_readers=study.readers)
            except ReviewRefused as exc:
                st.error(str(exc))
                return
            P._publish(ev, f"Rating of mask {mask.label} recorded.")
