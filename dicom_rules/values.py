"""Reading the values rules test from a pydicom dataset (routing and series selection).

``tag_values`` is the one place a dataset becomes ``TagValues``: the tags a condition
reads (``condition_tags``), as text, absent tags left out.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag


def tag_values(ds: Dataset, tags: frozenset[str]) -> dict[str, tuple[str, ...]]:
    """The values of the tags rules read, as text (absent tags are left out; an empty
    or undecodable-as-text element is present with no value)."""
    out: dict[str, tuple[str, ...]] = {}
    for name in tags:
        try:
            elem = ds.get(Tag(int(name, 16)) if _is_hex(name) else name)
            if elem is None:
                continue
            value = elem.value if hasattr(elem, "value") else elem
        except Exception:  # noqa: BLE001 - undecodable value: treat as absent
            continue
        if isinstance(value, bytes):
            out[name] = ()
        elif isinstance(value, MultiValue | list | tuple):
            out[name] = tuple(str(v).strip() for v in value)
        elif value is None or value == "":
            out[name] = ()
        else:
            out[name] = (str(value).strip(),)
    return out


def _is_hex(name: str) -> bool:
    return len(name) == 8 and all(c in "0123456789ABCDEF" for c in name)
