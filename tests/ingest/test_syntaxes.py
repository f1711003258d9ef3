"""Transfer syntaxes end to end (issue 14 item 1): every syntax the receiver accepts is
made by a real dcmtk tool (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle; JPEG 2000 by pydicom's
openjpeg plugin, which dcmtk lacks), sent by dcmsend in that syntax, stored as received, and decodes
through the engine's loader to the sent pixels (exactly, for lossless syntaxes); the
preference for uncompressed over compressed holds for a sender that proposes several;
a syntax without a decoder is refused and dcmsend falls back to sending it decompressed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE

from bench.ingest import ct_instances
from engine.ops.volume import series_to_volume
from engine.worker import read_datasets
from events.catalogue import InstanceStored
from events.jetstream import EventBus
from ingest.syntaxes import LOSSY, PREFERENCE, decodable_syntaxes
from tests.ingest.conftest import StartIngest, needs_dcmtk, run_tool, storescu, wait_for_events

pytestmark = [pytest.mark.server, needs_dcmtk]

#: syntax -> (how the file is made, lossless)
MAKE: dict[str, tuple[tuple[str, ...], bool]] = {
    ImplicitVRLittleEndian: (("dcmconv", "+ti"), True),
    ExplicitVRLittleEndian: (("dcmconv", "+te"), True),
    ExplicitVRBigEndian: (("dcmconv", "+tb"), True),
    DeflatedExplicitVRLittleEndian: (("dcmconv", "+td"), True),
    JPEGLosslessSV1: (("dcmcjpeg", "+e1"), True),
    JPEGLossless: (("dcmcjpeg", "+el"), True),
    JPEGExtended12Bit: (("dcmcjpeg", "+ee"), False),
    JPEGBaseline8Bit: (("dcmcjpeg", "+eb"), False),  # made from an 8-bit copy
    JPEGLSLossless: (("dcmcjpls", "+el"), True),
    JPEGLSNearLossless: (("dcmcjpls", "+en"), False),
    RLELossless: (("dcmcrle",), True),
    JPEG2000Lossless: (("pydicom",), True),
    JPEG2000: (("pydicom",), False),
}


def test_every_syntax_we_prefer_has_a_way_to_be_made_here() -> None:
    assert set(MAKE) == set(PREFERENCE)


def test_preference_is_uncompressed_then_lossless_then_lossy() -> None:
    order = list(PREFERENCE)
    assert order[0] == ExplicitVRLittleEndian
    first_lossy = min(order.index(u) for u in LOSSY)
    assert all(order.index(u) < first_lossy for u in PREFERENCE if u not in LOSSY)
    assert decodable_syntaxes().accepted == PREFERENCE  # the decoders are installed


def test_a_syntax_without_a_decoder_plugin_is_refused_at_start() -> None:
    """In a fresh interpreter where pylibjpeg cannot be imported, pydicom's registry has
    no JPEG Lossless decoder: those syntaxes must not be offered (JPEG-LS still is:
    pyjpegls, which highdicom brings, decodes it)."""
    code = ("import sys; sys.modules['pylibjpeg'] = None; sys.modules['libjpeg'] = None\n"
            "from ingest.syntaxes import decodable_syntaxes\n"
            "s = decodable_syntaxes(); print(' '.join(s.accepted)); print('|'.join(s.refused))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    accepted, refused = out[0].split(), out[1].split("|")
    for uid in (JPEGLossless, JPEGLosslessSV1):
        assert uid in refused and uid not in accepted
    assert JPEGLSLossless in accepted
    assert ExplicitVRLittleEndian in accepted and RLELossless in accepted  # pydicom's own


def _series(out: Path, seed: int) -> list[Path]:
    """Three CT slices (512², 12 bits stored) with the geometry the engine's loader needs."""
    paths = ct_instances(out, 3, seed=seed)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(p, enforce_file_format=True)
    return paths


def _eight_bit(src: Path, out: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.PixelData = (ds.pixel_array >> 4).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.save_as(out, enforce_file_format=True)
    return out


async def _make(uid: str, src: Path, out: Path) -> Path:
    tool, _ = MAKE[uid]
    if uid == JPEGBaseline8Bit:
        src = _eight_bit(src, out.with_suffix(".8bit.dcm"))
    if tool[0] == "pydicom":
        ds = pydicom.dcmread(src)
        if uid == JPEG2000:
            ds.compress(uid, j2k_cr=[10])
        else:
            ds.compress(uid)
        ds.save_as(out, enforce_file_format=True)
    else:
        rc, text = await run_tool(*tool, str(src), str(out))
        assert rc == 0, text
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    return out


async def _send(uid: str, port: int, files: list[Path]) -> None:
    """Send ``files`` proposing only ``uid``: dcmsend -dn proposes each file's own
    compressed syntax (and never converts), storescu -xi Implicit VR alone; for an
    uncompressed file dcmtk always adds the other uncompressed syntaxes (we would choose
    Explicit VR Little Endian), so Big Endian and Deflated are proposed alone by a
    pynetdicom requestor."""
    if uid == ImplicitVRLittleEndian:
        rc, out = await storescu(port, files, called="LM_LTS", extra=("-xi",))
    elif uid in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        def send() -> tuple[int, str]:
            ae = AE(ae_title="SENDER")
            datasets = [pydicom.dcmread(f) for f in files]
            ae.add_requested_context(datasets[0].SOPClassUID, [uid])
            assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
            assert assoc.is_established
            try:
                statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
            finally:
                assoc.release()
            return max(statuses), str(statuses)
        rc, out = await asyncio.to_thread(send)
    else:
        rc, out = await run_tool("dcmsend", "-dn", "-aec", "LM_LTS", "127.0.0.1",
                                 str(port), *[str(p) for p in files])
    assert rc == 0, f"{uid}: {out}"


@pytest.mark.slow
async def test_each_accepted_syntax_is_stored_as_sent_and_decodes_through_the_engine(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest()
    for k, uid in enumerate(PREFERENCE):
        sources = _series(tmp_path / f"src{k}", seed=k)
        sent = [await _make(uid, s, tmp_path / f"{k}-{i}.dcm") for i, s in enumerate(sources)]
        await _send(uid, r.port, sent)
        study = pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID
        stored = [e for e in await wait_for_events(bus, study, "ingest.instance.stored", 3)
                  if isinstance(e, InstanceStored)]
        assert {e.transfer_syntax_uid for e in stored} == {uid}, uid  # never transcoded
        loaded = series_to_volume(read_datasets([r.instances_dir / e.store_key
                                                 for e in stored]))
        # the stored file decodes through the engine to what the sent file decodes to...
        expected = series_to_volume(read_datasets(sent))
        assert np.array_equal(loaded.array, expected.array), uid
        if MAKE[uid][1]:  # ...and, for a lossless syntax, to the original pixels
            original = series_to_volume(read_datasets(sources))
            assert np.array_equal(loaded.array, original.array), uid


async def test_a_sender_offering_uncompressed_and_compressed_gets_uncompressed(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    """storescu -xy proposes JPEG Baseline *and* the uncompressed syntaxes in one
    context, -xs JPEG Lossless SV1 and the uncompressed ones: we choose Explicit VR Little
    Endian both times (main chose the compressed one: the CR-gets-lossy-JPEG case)."""
    r = await start_ingest()
    for option in ("-xy", "-xs"):
        (src,) = ct_instances(tmp_path / option, 1)
        path = _eight_bit(src, tmp_path / f"{option}.dcm")
        rc, out = await storescu(r.port, [path], called="LM_HFD", extra=(option, "-d"))
        assert rc == 0, out
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        (ev,) = await wait_for_events(bus, study, "ingest.instance.stored")
        assert isinstance(ev, InstanceStored)
        assert ev.transfer_syntax_uid == ExplicitVRLittleEndian, (option, out[-3000:])


async def test_a_refused_syntax_makes_dcmsend_decompress(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    """Without a JPEG-LS decoder (its plugins taken out of pydicom's registry for this
    test) the receiver refuses JPEG-LS, and dcmsend (+dls, its default) sends the file
    decompressed: stored with Success in a syntax that decodes, never stored unreadable."""
    decoder = get_decoder(JPEGLSLossless)
    plugins = dict(decoder._available)
    assert plugins
    decoder._available.clear()
    try:
        r = await start_ingest()
    finally:
        decoder._available.update(plugins)
    (src,) = ct_instances(tmp_path / "src", 1)
    path = await _make(JPEGLSLossless, src, tmp_path / "jls.dcm")
    rc, out = await run_tool("dcmsend", "-v", "-aec", "LM_LTS", "127.0.0.1", str(r.port),
                             str(path))
    assert rc == 0, out
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    (ev,) = await wait_for_events(bus, study, "ingest.instance.stored")
    assert isinstance(ev, InstanceStored)
    assert ev.transfer_syntax_uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    (stored,) = read_datasets([r.instances_dir / ev.store_key])
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(src).pixel_array)
