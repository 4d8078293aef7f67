"""The pieces of cnnctl's self-contained HTML pages (`cnnctl report`'s run and sweep pages): escaping, tables,
inline pictures, numbers as the pages show them, and the page around its sections. Everything is inline: styles in
a <style> element, pictures as PNG data URIs, no script, no font, no link outside the file."""

from __future__ import annotations

import base64
import html
import math
import time

from cnnctl.version import __version__

# the page needs no script, no font and nothing from elsewhere: a browser is told to run and fetch none (its own
# style element and data: pictures only), so a string that escaped the escaping could still do nothing
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;
color:#1a1a1a;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #bbb;padding-bottom:.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .55em;
text-align:right}th{background:#f1f1f1}td.l,th.l{text-align:left}caption{text-align:left;font-weight:600;
padding:.3em 0}dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1em}dt{font-weight:600}dd{margin:0}
img{max-width:100%;height:auto}figure{margin:.6em 0}figcaption{font-size:.85em;color:#444}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:1em}
.card{border:1px solid #ccc;padding:.5em}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
.note{color:#555;font-style:italic}.status{font-weight:700}
"""


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{escape(alt)}">'


def figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    return f"<figure>{img(png, alt)}<figcaption>{escape(caption)}</figcaption></figure>"


class Html(str):
    """A table cell that is markup already (a link), not text to escape."""


def table(caption: str, header: list[str], rows: list[list], left: int = 1) -> str:
    """A table; the first `left` columns are text (left-aligned), the rest numbers; Html cells go in as they are."""
    head = "".join(f'<th scope="col" class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c if isinstance(c, Html) else escape(c)}'
                                    "</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><caption>{escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pct(v) -> str:
    return num(v, 2, 100, "%")


def num(v, digits=4, scale=1, unit="") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"  # a damaged value in a run file
    return f"{scale * v:.{digits}f}{unit}"


def number(v) -> str:
    """A value from a run file as a number, or n/a when it is none (missing, null, a string, not finite)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return f"{v:.4g}"


def metric(name, v) -> str:
    return pct(v) if "acc" in str(name) else num(v)


def document(title: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{escape(title)}</title><style>{STYLE}</style></head>'
            f'<body>{"".join(sections)}<p class="note">Written by cnnctl {escape(__version__)} on '
            f'{escape(time.strftime("%Y-%m-%d %H:%M"))}. A self-contained page: no script, no link outside it.</p>'
            "</body></html>")
