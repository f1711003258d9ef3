"""Retired SOP Classes (issue 14): every proposed context is answered, none is left hanging.

pydicom-data's ``color-pl.dcm`` and ``color-px.dcm`` are real ultrasound images of the
retired Ultrasound Image Storage SOP Class. The receiver once accepted that context and
then found no service class, so the C-STORE got no answer and no event was written.
"""

from __future__ import annotations

import asyncio

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification, uid_to_service_class

from events.catalogue import AssociationOpened, InstanceStored
from events.jetstream import EventBus
from events.subjects import type_filter
from ingest.sop_classes import RETIRED_IMAGE_STORAGE, offered_storage_classes
from tests.ingest.conftest import StartIngest, needs_dcmtk, storescu, wait_for_events

pytestmark = pytest.mark.server

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"
STANDALONE_OVERLAY = "1.2.840.10008.5.1.4.1.1.8"


def test_every_offered_class_has_a_storage_service() -> None:
    from pynetdicom.service_class import StorageServiceClass

    offered = offered_storage_classes()
    assert RETIRED_US in offered and set(RETIRED_IMAGE_STORAGE) <= set(offered)
    assert STANDALONE_OVERLAY not in offered
    for uid in offered:
        assert issubclass(uid_to_service_class(uid), StorageServiceClass), uid


@needs_dcmtk
@pytest.mark.parametrize("name", ["color-pl.dcm", "color-px.dcm"])
async def test_a_retired_ultrasound_image_is_stored_and_answered(
        start_ingest: StartIngest, bus: EventBus, name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == RETIRED_US  # the real file is what this test is about
    r = await start_ingest()
    # -R: propose exactly the files' SOP Classes (dcmtk leaves retired ones out otherwise)
    rc, out = await asyncio.wait_for(storescu(r.port, [path], extra=("-R",)), 60)
    assert rc == 0, out
    stored = await wait_for_events(bus, ds.StudyInstanceUID, "ingest.instance.stored")
    assert isinstance(stored[0], InstanceStored)
    assert stored[0].sop_class_uid == RETIRED_US
    assert stored[0].sop_instance_uid == ds.SOPInstanceUID


async def test_a_retired_non_image_context_is_refused_and_named(
        start_ingest: StartIngest, bus: EventBus) -> None:
    r = await start_ingest()
    ae = AE(ae_title="OLDMODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(STANDALONE_OVERLAY)

    def associate() -> tuple[bool, list[str]]:
        assoc = ae.associate("127.0.0.1", r.port, ae_title="LASTMILE")
        try:
            rejected = [str(cx.abstract_syntax) for cx in assoc.rejected_contexts]
            ok = assoc.is_established and assoc.send_c_echo().Status == 0
            return ok, rejected
        finally:
            if assoc.is_established:
                assoc.release()

    ok, rejected = await asyncio.to_thread(associate)
    assert ok and rejected == [STANDALONE_OVERLAY]
    found = await wait_for_events(bus, None, "ingest.association.opened",
                                  subject=type_filter(AssociationOpened.type_name()))
    mine = [e for e in found if isinstance(e, AssociationOpened)
            and e.calling_ae == "OLDMODALITY"]
    assert mine and mine[0].refused_contexts == (
        "Standalone Overlay Storage: abstract syntax not supported",)
