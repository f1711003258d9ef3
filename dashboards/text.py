"""Values from data or the URL shown as literal text inside Streamlit's markdown.

Streamlit renders markdown (GitHub-flavoured, plus its own ``:color[...]`` and
``:material/icon:`` directives and ``$...$`` LaTeX) in ``st.markdown``, ``st.caption``,
``st.info``/``st.warning``/``st.error``, titles, widget labels, page links and table cells.
A reader's comment, a ``?study=`` parameter or a DICOM value put there could become a
live link, an auto-loading external image or styled text. ``plain`` escapes every ASCII
punctuation character with a backslash (CommonMark 0.31, section 2.4: any ASCII
punctuation may be escaped), turns line breaks into spaces, and puts an invisible WORD
JOINER (U+2060) into ``://``, ``www.`` and ``@``: Streamlit still turns bare URLs and
e-mail addresses into links after escapes are read. Free text in a table goes through
``html_table`` instead (escaped HTML, no markdown at all).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence

WJ = "\u2060"  # WORD JOINER: invisible, breaks autolink detection
_AUTOLINK = re.compile(r"(?i)(://|www\.|@)")
_PUNCT = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def plain(value: object) -> str:
    """``value`` as text that markdown shows literally (None -> empty)."""
    if value is None:
        return ""
    text = " ".join(str(value).split())  # no line breaks: a table cell or caption stays one
    text = _AUTOLINK.sub(lambda m: m.group(1)[0] + WJ + m.group(1)[1:], text)
    return _PUNCT.sub(r"\\\1", text)


def html_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows as an HTML table whose every header and cell is escaped text (for
    ``st.html``): what a person typed is shown exactly, never as markup or a link."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '') or ''))}</td>"
                                    for c in cols) + "</tr>" for r in rows)
    return (f'<table class="lm-text-table" style="border-collapse:collapse;width:100%">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
