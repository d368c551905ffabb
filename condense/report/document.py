"""A tiny document model (headings, paragraphs, tables, images) rendered to Markdown or to ONE
self-contained HTML file (inline CSS, images as base64 data URIs, no scripts)."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    """Plain text; ``code`` spans in backticks and **bold** spans are kept in both renderings."""

    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # one letter per column, "l" or "r"; default: first column left, the others right

    def right(self, i: int) -> bool:
        return self.align[i] == "r" if i < len(self.align) else i > 0


@dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""


@dataclass
class Code:
    text: str


@dataclass
class Comment:
    """Markdown/HTML comment (invisible)."""

    text: str


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks: object) -> None:
        self.blocks.extend(blocks)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, base_dir: Path) -> str:
    """Markdown text; image paths are written relative to ``base_dir`` (the Markdown's folder)."""
    out: list[str] = []
    for b in doc.blocks:
        if isinstance(b, Comment):
            out.append(f"<!-- {b.text} -->")
        elif isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Code):
            out.append(f"```\n{b.text}\n```")
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---:" if b.right(i) else "---"
                                    for i in range(len(b.header))) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            rel = Path(os.path.relpath(b.path, base_dir)).as_posix()
            img = f"![{b.alt}]({rel})"
            out.append(f"{img}\n\n*{b.caption}*" if b.caption else img)
    return "\n\n".join(out) + "\n"


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def _inline_html(text: str) -> str:
    parts, last = [], 0
    for m in _INLINE.finditer(text):
        parts.append(html.escape(text[last:m.start()]))
        if m.group(1) is not None:
            parts.append(f"<code>{html.escape(m.group(1))}</code>")
        else:
            parts.append(f"<strong>{html.escape(m.group(2))}</strong>")
        last = m.end()
    parts.append(html.escape(text[last:]))
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em}th{background:#f2f2f2}
td.r{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
code,pre{background:#f4f4f4;border-radius:3px}code{padding:0 .25em}pre{padding:.6em;overflow-x:auto}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{max-width:100%}
"""


def _td(text: str, right: bool) -> str:
    cls = ' class="r"' if right else ""
    return f"<td{cls}>{_inline_html(text)}</td>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_html(doc: Document) -> str:
    """One self-contained HTML page: inline CSS, every image embedded as a data URI, no scripts."""
    body: list[str] = []
    for b in doc.blocks:
        if isinstance(b, Comment):
            body.append(f"<!-- {html.escape(b.text)} -->")
        elif isinstance(b, Heading):
            lv = min(max(b.level, 1), 6)
            body.append(f"<h{lv}>{_inline_html(b.text)}</h{lv}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Code):
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(_td(c, b.right(i)) for i, c in enumerate(row))
                           + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            if not Path(b.path).exists():
                continue
            cap = f"<figcaption>{html.escape(b.caption)}</figcaption>" if b.caption else ""
            body.append(f"<figure><img alt=\"{html.escape(b.alt)}\" src=\"{_data_uri(b.path)}\">{cap}</figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(doc.title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
