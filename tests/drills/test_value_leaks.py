"""No DICOM value leaks, log-wide (issue 18 #2): studies whose every text attribute is
malformed around a marker go through a real `lastmile up` (receiver, engine, projector;
sent by `lastmile check` as a modality would); then the JetStream store on disk, every
log line, the DuckDB read model and both exports (`lastmile replay --to parquet`, plain
and de-identified) are searched byte for byte for the marker.

The instance store and the results (DICOM objects, which carry the patient's attributes
by design) are the only places the marker may be.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import duckdb
import pydicom
import pytest

from demo.phantoms import pelvis_study
from events.nats_server import free_port
from tests.drills.procs import LASTMILE, clean_env, lastmile_up
from tests.malformed import MARKER, malformed

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(900)]

#: byte patterns of the marker as values are written: text, lower case (CS), UTF-16
NEEDLES = (MARKER.encode(), MARKER.lower().encode(), MARKER.encode("utf-16-le"))
#: where DICOM objects live by design (the site's own data, not the audit trail)
DICOM_STORES = ("instances", "results")


def _files_with_marker(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in skip:
            continue
        data = path.read_bytes()
        if any(n in data for n in NEEDLES):
            hits.append(str(rel))
    return hits


def test_malformed_values_reach_no_event_log_line_read_model_or_export(
        tmp_path: Path) -> None:
    state, folder = tmp_path / "state", tmp_path / "send"
    studies = []
    with pydicom.config.disable_value_validation():  # the sender's side, not ours
        for seed in (71, 72):
            study = pelvis_study(seed, images=2, size=256)
            for ds in study.datasets:
                malformed(ds)
            study.write(folder / study.study_uid[-8:])
            studies.append(study)
    dicom_port = free_port()
    env = clean_env(state_dir=str(state), nats_port=str(free_port()),
                    dicom_port=str(dicom_port), nats_sync="2m",
                    services='["ingest", "engine", "projector"]')
    subprocess.run([*LASTMILE, "pipelines", "deploy", str(ROOT / "engine" / "pipelines" /
                                                         "hfd.yaml"),
                    "--stage", "validation", "--why", "the value-leak drill"],
                   env=env, check=True, capture_output=True, timeout=120)
    up_log = tmp_path / "up.log"
    with lastmile_up(env, up_log, wait_port=dicom_port):
        check = subprocess.run([*LASTMILE, "check", str(folder), "--ae", "LM_HFD", "--json",
                                "--timeout", "300"], env=env, capture_output=True, text=True,
                               timeout=600)
        report = json.loads(check.stdout)
        assert {s["study_uid"] for s in report["studies"]} == {s.study_uid for s in studies}
        for s in report["studies"]:  # each study reached a final outcome of the pipeline
            assert not s["crashed"] and not s["timed_out"], s
            assert [p["result"] for p in s["pipelines"]] in (["valid"], ["refused"]), s
        exports = {}
        for name, extra in (("plain", ()), ("deidentified", ("--deidentify",))):
            out = tmp_path / f"export-{name}"
            done = subprocess.run([*LASTMILE, "replay", "--to", "parquet", str(out), *extra],
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            exports[name] = (out, done.stdout + done.stderr)
        time.sleep(3.0)  # the projector's last batch
    # the read model holds these studies (so searching it means something)
    with duckdb.connect(str(state / "lastmile.duckdb"), read_only=True) as db:
        pseudonyms = db.execute("SELECT count(DISTINCT patient_pseudonym) FROM instances "
                                "WHERE kind = 'stored'").fetchone()
        completed = db.execute("SELECT count(*) FROM inference WHERE kind = 'completed'"
                               ).fetchone()
    assert pseudonyms is not None and pseudonyms[0] == 2
    assert completed is not None and completed[0] >= 1
    # the marker is in what was sent and in the instance store (the test means something)
    assert _files_with_marker(folder) and _files_with_marker(state / "instances")
    # ... and nowhere else: the JetStream store, DuckDB, state files, logs, exports
    assert _files_with_marker(state, skip=DICOM_STORES) == []
    logs = up_log.read_bytes() + check.stderr.encode() + check.stdout.encode()
    assert logs and not any(n in logs for n in NEEDLES)
    for name, (out, printed) in exports.items():
        assert list(out.rglob("*.parquet")), name
        assert _files_with_marker(out) == [], name
        assert MARKER not in printed and MARKER.lower() not in printed
