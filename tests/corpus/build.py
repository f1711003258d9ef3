"""The corpus: every real DICOM file the packages offer, plus generated variants of each
kind of issue 14, laid out as ``OUT/<called AE>/<case>/`` for ``lastmile check``.

Real files are sent as the packages ship them. Where several files of a package share a
Study or SOP Instance UID (one image in several transfer syntaxes), each becomes a case
of its own with its UIDs remapped deterministically (header only, pixels untouched), so
no case disturbs another. Routing: brain MR to ``LM_BTS``, CT to ``LM_LTS``, CR/DX to
``LM_HFD``, everything else to the general AE, whose routing rules decide.

Variants are made from the project's phantoms (whose truth is known and whose control
cases must be valid) and from real files, with dcmtk's encoders for the compressed
syntaxes (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv``).

``python -m tests.corpus.build OUT [--full]`` writes it and prints the ``check``
commands. Without ``--full`` it is the sample CI runs (every source and every variant,
but the two real MR studies cut to a contiguous slab per series and the largest cine
loops left out: see ``SAMPLE``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from demo import phantoms
from tests.corpus import sources

GENERAL = "LASTMILE"
VALID = frozenset({"valid"})
REFUSED = frozenset({"refused"})
VALID_OR_REFUSED = frozenset({"valid", "refused"})
NOT_ROUTED = frozenset({"no pipeline", "refused"})  # refused: at the receiver, named
NOT_SENT = frozenset({"not sent"})  # not a DICOM instance: check skips it, with the reason

#: what the CI sample leaves out or cuts (README says so)
SAMPLE = {
    "xnat ANONYMIZ": "24 contiguous FLAIR slices + 3 PD + 3 T1 of 346 files",
    "xnat Case001": "series 3 (T2/PD, 20) and 2 (T1 SE, 20) of 10 series, 324 files",
    "deid-data cines": "GREYSCALE_CINE (13 MB) and RGB_CINE (104 MB) left out",
}


@dataclass(frozen=True)
class Case:
    """One study of the corpus: where it goes, what may come back, and what is known."""

    name: str
    ae: str
    source: str
    kind: str  # "real" or the kind of variant
    expect: frozenset[str]
    make: Callable[[Path], None] = field(compare=False, repr=False)
    full_only: bool = False
    #: 16-bit variants: the findings must equal the control's
    same_findings_as: str | None = None
    #: a refusal must name this (lower case), e.g. "colour"
    reason_contains: str | None = None

    @property
    def folder(self) -> str:
        return self.name.replace("/", "_").replace(" ", "_")


# --------------------------------------------------------------------------- helpers


def _remap(ds: Dataset, case: str) -> Dataset:
    """New Study/Series/SOP Instance UIDs, derived from the case and the old UIDs."""
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if kw in ds:
            setattr(ds, kw, generate_uid(entropy_srcs=[case, kw, str(getattr(ds, kw))]))
    if ds.file_meta and "MediaStorageSOPInstanceUID" in ds.file_meta and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _copy(files: Iterable[Path], remap: str | None = None) -> Callable[[Path], None]:
    files = list(files)

    def make(out: Path) -> None:
        for i, f in enumerate(files):
            target = out / f"{i:04d}_{f.name}"
            if remap is None:
                shutil.copyfile(f, target)
            else:
                ds = pydicom.dcmread(f, force=True)
                _remap(ds, remap).save_as(target, enforce_file_format=False)
    return make


def _write(datasets: Iterable[Dataset], out: Path) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _dcmtk(tool: str, *args: str, files: list[Path]) -> None:
    """Re-encode each file in place with a dcmtk tool (``dcmcjpeg +e1`` ...)."""
    for f in files:
        tmp = f.with_suffix(".tmp")
        subprocess.run([tool, *args, str(f), str(tmp)], check=True, capture_output=True,
                       timeout=120)
        tmp.replace(f)


def _as_pelvis(ds: Dataset) -> Dataset:
    """Labelled as a pelvis AP view, with the detector spacing the file lacks (a CR
    without any pixel spacing is outside every pipeline's input contract)."""
    ds.BodyPartExamined = "PELVIS"
    ds.SeriesDescription = ds.StudyDescription = "PELVIS AP"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    return ds


def _pelvis_real(out: Path) -> list[Path]:
    """A real CR (pydicom-data RG3, 1760², 10 bit, MONOCHROME1) as a pelvis AP view."""
    ds = pydicom.dcmread(sources.pydicom_data_files() / "RG3_UNCR.dcm")
    return _write([_as_pelvis(_remap(ds, "real-cr-as-pelvis"))], out)


def _pelvis_real_case(out: Path) -> None:
    _pelvis_real(out)


def _pelvis_real_encoded(tool: str, *args: str) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        files = _pelvis_real(out)
        for f in files:  # each encoding its own study
            ds = pydicom.dcmread(f)
            _remap(ds, f"{tool}{args}").save_as(f, enforce_file_format=True)
        _dcmtk(tool, *args, files=files)
    return make


def _pelvis_real_j2k(out: Path) -> None:
    ds = pydicom.dcmread(sources.pydicom_data_files() / "RG3_J2KR.dcm")
    _write([_as_pelvis(_remap(ds, "real-cr-as-pelvis-j2k"))], out)


def _phantom(kind: str, seed: int) -> phantoms.PhantomStudy:
    if kind == "bts":
        return phantoms.brain_mr_study(seed)
    if kind == "lts":
        return phantoms.abdomen_ct_study(seed)
    return phantoms.pelvis_study(seed, images=2, size=512)


def _phantom_case(kind: str, seed: int, alter: Callable[[list[Dataset]], list[Dataset]] | None
                  = None) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        datasets = _phantom(kind, seed).datasets
        _write(alter(datasets) if alter else datasets, out)
    return make


def _phantom_ct_jpeg_lossless(out: Path) -> None:
    _dcmtk("dcmcjpeg", "+e1", files=_write(_phantom("lts", 104).datasets, out))


def _drop(*keywords: str) -> Callable[[list[Dataset]], list[Dataset]]:
    def alter(datasets: list[Dataset]) -> list[Dataset]:
        for ds in datasets:
            for kw in keywords:
                if kw in ds:
                    delattr(ds, kw)
        return datasets
    return alter


def _set(**values: str) -> Callable[[list[Dataset]], list[Dataset]]:
    def alter(datasets: list[Dataset]) -> list[Dataset]:
        for ds in datasets:
            for kw, value in values.items():
                setattr(ds, kw, value)
        return datasets
    return alter


def _sixteen_bit_dx(datasets: list[Dataset]) -> list[Dataset]:
    """The 12-bit phantom radiograph as a 16-bit DX (values x16, Bits Stored 16)."""
    for ds in datasets:
        ds.PixelData = (ds.pixel_array.astype(np.uint16) << 4).tobytes()
        ds.BitsStored, ds.HighBit = 16, 15
    return datasets


def _colour(datasets: list[Dataset]) -> list[Dataset]:
    """The radiograph as an 8-bit RGB image (a screenshot a PACS forwards as CR)."""
    for ds in datasets:
        grey = (ds.pixel_array >> 4).astype(np.uint8)
        ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return datasets


def _duplicate_sop_in_other_series(datasets: list[Dataset]) -> list[Dataset]:
    """The second image keeps the first's SOP Instance UID but sits in another series."""
    second = datasets[1]
    second.SOPInstanceUID = datasets[0].SOPInstanceUID
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    second.SeriesInstanceUID = generate_uid(entropy_srcs=["dup-series",
                                                          str(second.StudyInstanceUID)])
    second.SeriesNumber = 2
    return datasets


def _enhanced_mr(datasets: list[Dataset]) -> list[Dataset]:
    """The FLAIR series as one Legacy Converted Enhanced MR (PS3.3 A.71; highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    flair = [ds for ds in datasets if "FLAIR" in str(ds.SeriesDescription)]
    uid = str(flair[0].StudyInstanceUID)
    enhanced = LegacyConvertedEnhancedMRImage(
        flair, series_instance_uid=generate_uid(entropy_srcs=["enh-series", uid]),
        series_number=3, sop_instance_uid=generate_uid(entropy_srcs=["enh-sop", uid]),
        instance_number=1)
    enhanced.SeriesDescription = "AX T2 FLAIR"
    return [enhanced]


def _anonymiz(full: bool) -> Callable[[Path], None]:
    root = sources.xnat_files() / "ANONYMIZ" / "scans"

    def make(out: Path) -> None:
        series = sorted(p for p in root.iterdir() if p.is_dir())
        for s in series:
            files = sorted((s / "DICOM").glob("*.dcm"),
                           key=lambda f: int(f.name.split("-")[2]))
            if not full:
                files = files[20:44] if "FLAIR" in s.name else files[40:43]
            target = out / s.name.split("_")[0]
            target.mkdir()
            _copy(files)(target)
    return make


def _case001(full: bool) -> Callable[[Path], None]:
    root = sources.xnat_files() / "Case001" / "scans"

    def make(out: Path) -> None:
        for s in sorted(p for p in root.iterdir() if p.is_dir()):
            if not full and s.name.split("_")[0] not in ("2", "3"):
                continue
            target = out / s.name.split("_")[0]
            target.mkdir()
            _copy(sorted((s / "DICOM").glob("*.dcm")))(target)
    return make


# --------------------------------------------------------------------------- the cases


def _real_cases(full: bool) -> list[Case]:
    pdd, pnd = sources.pydicom_data_files(), sources.pynetdicom_files()
    nib = sources.nibabel_files() / "nibabel" / "nicom" / "tests" / "data"
    deid = next(sources.deid_files().rglob("deid_data")) / "data"
    cases = [
        Case("xnat ANONYMIZ GE brain MR", "LM_BTS", "xnat 0.8.1 sdist", "real", VALID,
             _anonymiz(full)),
        Case("xnat Case001 GE MR", "LM_BTS", "xnat 0.8.1 sdist", "real", VALID_OR_REFUSED,
             _case001(full)),
        Case("nibabel CBU DTI + mosaic", "LM_BTS", "nibabel", "real", REFUSED,
             _copy([nib / "0.dcm", nib / "1.dcm", nib / "siemens_dwi_0.dcm",
                    nib / "siemens_dwi_1000.dcm"])),
    ]
    for name in ("csa_slice_norm", "slicethickness_empty_string", "philips_mprage"):
        cases.append(Case(f"nibabel {name}", "LM_BTS", "nibabel", "real", REFUSED,
                          _copy([nib / f"{name}.dcm"])))
    # no SOP Class UID: no C-STORE can name it; check says so and sends nothing
    cases.append(Case("nibabel decimal_rescale", "LM_BTS", "nibabel", "real", NOT_SENT,
                      _copy([nib / "decimal_rescale.dcm"])))
    for name in ("emri_small", "emri_small_RLE", "emri_small_big_endian",
                 "emri_small_jpeg_2k_lossless", "emri_small_jpeg_ls_lossless"):
        cases.append(Case(f"pydicom-data {name}", "LM_BTS", "pydicom-data", "real", REFUSED,
                          _copy([pdd / f"{name}.dcm"], remap=name)))
    # truncated pixel data: sent as shipped (the only case left with the original UIDs)
    cases.append(Case("pydicom-data emri_small_jpeg_2k_lossless_too_short", "LM_BTS",
                      "pydicom-data", "real", NOT_SENT,
                      _copy([pdd / "emri_small_jpeg_2k_lossless_too_short.dcm"])))
    for name in ("693_UNCI", "693_UNCR", "693_J2KR", "bad_sequence", "explicit_VR-UN",
                 "eCT_Supplemental"):
        cases.append(Case(f"pydicom-data {name}", "LM_LTS", "pydicom-data", "real", REFUSED,
                          _copy([pdd / f"{name}.dcm"], remap=name)))
    cases.append(Case("pynetdicom CTImageStorage", "LM_LTS", "pynetdicom", "real", REFUSED,
                      _copy([pnd / "CTImageStorage.dcm"], remap="pnd-ct")))
    cases.append(Case("deid-data ctbrain", "LM_LTS", "deid-data", "real", REFUSED,
                      _copy(sorted((deid / "humans").glob("ctbrain*.dcm")))))
    for name in ("RG1_UNCI", "RG1_UNCR", "RG1_J2KI", "RG1_J2KR", "RG3_UNCI", "RG3_UNCR",
                 "RG3_J2KI", "RG3_J2KR"):
        cases.append(Case(f"pydicom-data {name}", "LM_HFD", "pydicom-data", "real", REFUSED,
                          _copy([pdd / f"{name}.dcm"], remap=name)))
    cases.append(Case("deid-data cat DX", "LM_HFD", "deid-data", "real", REFUSED,
                      _copy([deid / "animals" / "cat.dcm"])))
    routed = {"emri_small", "emri_small_RLE", "emri_small_big_endian",
              "emri_small_jpeg_2k_lossless", "emri_small_jpeg_ls_lossless",
              "emri_small_jpeg_2k_lossless_too_short", "693_UNCI", "693_UNCR", "693_J2KR",
              "bad_sequence", "explicit_VR-UN", "eCT_Supplemental", "RG1_UNCI", "RG1_UNCR",
              "RG1_J2KI", "RG1_J2KR", "RG3_UNCI", "RG3_UNCR", "RG3_J2KI", "RG3_J2KR"}
    for f in sorted(pdd.glob("*.dcm")):
        if f.stem not in routed:
            cases.append(Case(f"pydicom-data {f.stem}", GENERAL, "pydicom-data", "real",
                              NOT_ROUTED, _copy([f], remap=f.stem)))
    for f in sorted(pnd.glob("*.dcm")):
        if f.stem != "CTImageStorage":
            cases.append(Case(f"pynetdicom {f.stem}", GENERAL, "pynetdicom", "real",
                              NOT_ROUTED, _copy([f], remap=f"pnd-{f.stem}")))
    cases.append(Case("deid-data dicom-cookies", GENERAL, "deid-data", "real", NOT_ROUTED,
                      _copy(sorted((deid / "dicom-cookies").glob("*.dcm")))))
    for name in ("GREYSCALE_IMAGE", "RGB_IMAGE", "ultrasound-multiframe"):
        cases.append(Case(f"deid-data {name}", GENERAL, "deid-data", "real", NOT_ROUTED,
                          _copy([deid / "ultrasounds" / f"{name}.dcm"])))
    for name in ("GREYSCALE_CINE", "RGB_CINE"):
        cases.append(Case(f"deid-data {name}", GENERAL, "deid-data", "real", NOT_ROUTED,
                          _copy([deid / "ultrasounds" / f"{name}.dcm"]), full_only=True))
    return cases


def _variant_cases() -> list[Case]:
    return [
        # controls: the phantoms as generated must give a valid result
        Case("phantom BTS control", "LM_BTS", "phantom", "control", VALID,
             _phantom_case("bts", 101)),
        Case("phantom LTS control", "LM_LTS", "phantom", "control", VALID,
             _phantom_case("lts", 102)),
        Case("phantom HFD control", "LM_HFD", "phantom", "control", VALID,
             _phantom_case("hfd", 103)),
        # 1. transfer syntaxes, from dcmtk's encoders, on a real CR labelled pelvis
        Case("real CR pelvis uncompressed", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_case),
        Case("real CR pelvis JPEG lossless SV1", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_encoded("dcmcjpeg", "+e1")),
        Case("real CR pelvis JPEG extended lossy", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_encoded("dcmcjpeg", "+ee")),
        Case("real CR pelvis JPEG-LS lossless", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_encoded("dcmcjpls", "+el")),
        Case("real CR pelvis RLE", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_encoded("dcmcrle")),
        Case("real CR pelvis deflated", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_encoded("dcmconv", "+td")),
        Case("real CR pelvis big endian", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_encoded("dcmconv", "+tb")),
        Case("real CR pelvis JPEG 2000 lossless", "LM_HFD", "pydicom-data", "syntax", VALID,
             _pelvis_real_j2k),
        Case("phantom CT JPEG lossless", "LM_LTS", "phantom", "syntax", VALID,
             _phantom_ct_jpeg_lossless),
        # 2./3. input problems that must not fail (nor retry, nor give an invalid SEG)
        Case("phantom BTS no SliceThickness", "LM_BTS", "phantom", "slice thickness", VALID,
             _phantom_case("bts", 105, _drop("SliceThickness"))),
        Case("phantom BTS empty SliceThickness", "LM_BTS", "phantom", "slice thickness",
             VALID, _phantom_case("bts", 106, _set(SliceThickness=""))),
        Case("phantom BTS no Type 2 attributes", "LM_BTS", "phantom", "type 2", VALID,
             _phantom_case("bts", 107, _drop("PatientBirthDate", "PatientSex",
                                             "AccessionNumber", "StudyDate", "StudyTime"))),
        Case("phantom BTS malformed dates and sex", "LM_BTS", "phantom", "malformed values",
             VALID, _phantom_case("bts", 108, _set(PatientBirthDate="1990/01/",
                                                   PatientSex="N/A", StudyDate="2015.01.01"))),
        Case("phantom BTS enhanced multi-frame", "LM_BTS", "phantom", "multi-frame", VALID,
             _phantom_case("bts", 109, _enhanced_mr)),
        # 4. intensity and input contracts
        Case("phantom HFD 16-bit DX", "LM_HFD", "phantom", "intensity", VALID_OR_REFUSED,
             _phantom_case("hfd", 103, _sixteen_bit_dx_dx), same_findings_as="phantom HFD control"),
        Case("phantom HFD colour", "LM_HFD", "phantom", "contract", REFUSED,
             _phantom_case("hfd", 110, _colour), reason_contains="colour"),
        # 6. identity
        # the second object refused at the receiver (named), the result over the first:
        # partial is a right ending too; replacing the first object is not
        Case("phantom HFD duplicate SOP UID in another series", "LM_HFD", "phantom",
             "identity", VALID_OR_REFUSED | {"partial"},
             _phantom_case("hfd", 111, _duplicate_sop_in_other_series)),
    ]


def _sixteen_bit_dx_dx(datasets: list[Dataset]) -> list[Dataset]:
    """The same exam as the HFD control (same seed), made DX and 16 bit: a new study."""
    out = _sixteen_bit_dx(datasets)
    study = generate_uid(entropy_srcs=["16-bit", str(out[0].StudyInstanceUID)])
    for ds in out:
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["16-bit", str(ds.SeriesInstanceUID)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["16-bit", str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "DX"
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return out


def cases(full: bool = False) -> list[Case]:
    """Every case of the corpus (``full``: the real studies whole, the cines included)."""
    return [c for c in [*_variant_cases(), *_real_cases(full)] if full or not c.full_only]


def build(out: Path, full: bool = False) -> list[Case]:
    """Write every case under ``out/<AE>/<case>/`` (a case already written is kept) and
    ``out/cases.json`` (case, AE, source, kind, expected results)."""
    built = cases(full)
    for case in built:
        folder = out / case.ae / case.folder
        if folder.is_dir():
            continue
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        case.make(tmp)
        tmp.replace(folder)
    (out / "cases.json").write_text(json.dumps(
        [{"case": c.name, "folder": f"{c.ae}/{c.folder}", "ae": c.ae, "source": c.source,
          "kind": c.kind, "expect": sorted(c.expect)} for c in built], indent=1) + "\n")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--full", action="store_true", help="the whole corpus, not the sample")
    args = parser.parse_args()
    built = build(args.out, args.full)
    print(f"{len(built)} cases under {args.out}; with `lastmile up` running and the reference "
          f"pipelines deployed:")
    for ae in sorted({c.ae for c in built}):
        print(f"  lastmile check {args.out / ae} --ae {ae} --json")


if __name__ == "__main__":
    main()
