"""A page as a list of blocks -> Markdown or self-contained HTML (the PNGs embedded as base64 data URIs). Used by
the compare, sweep and study reports (imtune.report.write, imtune.experiments.sweep, imtune.experiments.study), so
every report says the same in both files.

Blocks: ("h", level, text) ("p", text) ("headline", text) ("warn", text, [items]) ("ul", [items])
("table", header, rows[, "text"]) ("img", path, alt) ("code", lang, text). Text may use `code`, **bold** and *em*.
A table's cells are right-aligned numbers with a left-aligned first column, or with "text" all left-aligned prose
(newlines kept).

Texts carry values from files that may come from elsewhere (data paths, run directories, model answers, a received
compare.json), so both renderers escape: HTML with html.escape everywhere; Markdown with md_text, which keeps the
code spans CommonMark will see and, outside them, escapes what could start raw HTML, a link or a table cell (a value
cannot end a code span early: the spans are found as CommonMark finds them, after the values are in), turns control
characters into visible escapes (a newline in a file name cannot start a new block), and fences code blocks with more
backticks than their text holds.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BREAK = "\ue000"  # stands for a kept line break (table text cells) until the escaping is done


def _visible(ch: str) -> str:
    return _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def _code_spans(text: str) -> list[tuple[bool, str]]:
    """[(is a code span, text)] as CommonMark pairs backtick strings: one of length n opens a span closed by the next
    one of exactly length n; one without a partner is literal text."""
    runs = [(m.start(), m.end()) for m in re.finditer(r"`+", text)]
    out, last, k = [], 0, 0
    while k < len(runs):
        a, b = runs[k]
        close = next((j for j in range(k + 1, len(runs)) if runs[j][1] - runs[j][0] == b - a), None)
        if close is None:
            k += 1
            continue
        out += [(False, text[last:a]), (True, text[a:runs[close][1]])]
        last, k = runs[close][1], close + 1
    return out + [(False, text[last:])]


def md_text(text: str, breaks: bool = False, cell: bool = False) -> str:
    """`text` (our markup: `code`, **bold**, *em*; values pasted in) as one safe line of inline Markdown: control
    characters as visible escapes (`breaks`: newlines as <br>); outside code spans a < that could open a tag, the
    brackets of a link and a backslash that could escape escaped; in a table `cell`, every | (a cell boundary is found
    before code spans)."""
    text = text.replace("\r\n", "\n").replace(_BREAK, "")
    if breaks:
        text = text.replace("\n", _BREAK)
    text = _CONTROL.sub(lambda m: _visible(m.group()), text)
    out = []
    for code, part in _code_spans(text):
        if not code:  # what could start raw HTML or an autolink, a link, or an escape that moves a code span
            part = re.sub(r"\\(?=[!-/:-@\[-`{-~]|$)|<(?=[A-Za-z/!?])", r"\\\g<0>", part)
            part = part.replace("](", "\\](").replace("][", "\\][")
        if cell:
            part = part.replace("|", "\\|")
        out.append(part)
    return "".join(out).replace(_BREAK, "<br>")


def md_code(value) -> str:
    """`value` as an inline code span nothing in it can end, on one line, with no | that could split a table cell:
    for Markdown assembled line by line (imtune eval, judge and benchmark reports)."""
    t = _CONTROL.sub(lambda m: _visible(m.group()), str(value)).replace("|", "\\|")
    fence = "`" * (1 + max((len(r) for r in re.findall(r"`+", t)), default=0))
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def md_cell(value) -> str:
    """`value` as the text of one Markdown table cell (escaped as md_text escapes; no line break, no |)."""
    return md_text(str(value), cell=True)


def _md_cell(text: str) -> str:
    return md_text(text, breaks=True, cell=True)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text` (which then cannot close it)."""
    return "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))


def to_markdown(blocks_: list[tuple], root: Path) -> str:
    out = []
    for blk in blocks_:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + md_text(blk[2]))
        elif kind == "p":
            out.append(md_text(blk[1]))
        elif kind == "headline":
            out.append(f"**{md_text(blk[1])}**")
        elif kind == "warn":
            out.append("\n>\n".join([f"> ⚠ **Warning:** {md_text(blk[1])}",
                                      "\n".join(f"> - {md_text(x)}" for x in blk[2])]))
        elif kind == "ul":
            out.append("\n".join(f"- {md_text(item)}" for item in blk[1]))
        elif kind == "table":
            header, rows = blk[1], blk[2]
            text = len(blk) > 3 and blk[3] == "text"
            rule = "|---|" + ("---|" if text else "---:|") * (len(header) - 1)  # numbers right-aligned
            out.append("\n".join(["| " + " | ".join(map(_md_cell, header)) + " |", rule]
                                 + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]))
        elif kind == "img":
            out.append(f"![{md_text(blk[2])}](<{Path(blk[1]).relative_to(root).as_posix()}>)")
        elif kind == "code":
            fence = _fence(blk[2])
            out.append(f"{fence}{blk[1]}\n{blk[2]}\n{fence}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", t)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45;"
       "color:#1b1b1b}"
       "h1{font-size:1.6em;margin-bottom:.3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
       ".headline{font-size:1.25em;font-weight:600;background:#eef4ff;border-left:5px solid #3465a4;"
       "padding:.6em .9em;margin:.8em 0}"
       ".warn{background:#fff4e0;border-left:5px solid #d98200;padding:.5em .9em}"
       "table{border-collapse:collapse;margin:1em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .6em}"
       "td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}"
       "table.text td{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:28em}"
       "table.text{font-size:.88em}"
       "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%}"
       "li{margin:.3em 0}")


def _cell(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def to_html(blocks_: list[tuple], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for blk in blocks_:
        kind = blk[0]
        if kind == "h":
            out.append(f"<h{blk[1]}>{_inline(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "headline":
            out.append(f"<p class='headline'>{_inline(blk[1])}</p>")
        elif kind == "warn":
            items = "".join(f"<li>{_inline(x)}</li>" for x in blk[2])
            out.append(f"<div class='warn'>⚠ <strong>Warning:</strong> {_inline(blk[1])}<ul>{items}</ul></div>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in blk[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in blk[2])
            cls = " class='text'" if len(blk) > 3 and blk[3] == "text" else ""
            out.append(f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(blk[1]).read_bytes()).decode("ascii")
            out.append(f"<p><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'></p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(blk[2])}</code></pre>")
    return "\n".join(out) + "\n</body></html>\n"
