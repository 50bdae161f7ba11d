"""A report as a list of blocks, written both as Markdown and as one self-contained HTML page.

Building blocks once and rendering twice keeps report.md and report.html saying the same thing;
the HTML embeds its figures (base64), so it can be mailed or opened from an MLflow artifact.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bnsweep.sweep.table import markdown_table

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.8em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f5f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
code { background: #f5f5f7; padding: 0 3px; border-radius: 3px; }
"""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> None:
        """Columns from ``numeric_from`` on are right-aligned."""
        self.blocks.append(("table", (list(headers), [list(r) for r in rows], numeric_from)))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", (Path(path), caption)))

    # ------------------------------------------------------------------ rendering

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, data in self.blocks:
            if kind == "h":
                level, text = data
                out += ["#" * level + " " + text, ""]
            elif kind == "p":
                out += [data, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in data] + [""]
            elif kind == "table":
                out += [markdown_table(*data), ""]
            elif kind == "fig":
                path, caption = data
                out += [f"![{path.stem}]({path.name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def to_html(self) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, data in self.blocks:
            if kind == "h":
                level, text = data
                body.append(f"<h{level}>{_inline(text)}</h{level}>")
            elif kind == "p":
                body.append(f"<p>{_inline(data)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in data) + "</ul>")
            elif kind == "table":
                headers, rows, k = data
                head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
                body_rows = "".join(
                    "<tr>" + "".join(f"<td{' class=num' if i >= k else ''}>{_inline(c)}</td>"
                                     for i, c in enumerate(r)) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>")
            elif kind == "fig":
                path, caption = data
                src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img src="{src}" alt="{html.escape(path.stem)}">'
                            f"<figcaption>{_inline(caption)}</figcaption></figure>")
        return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Markdown's **bold**, *italic* and `code`, HTML-escaped."""
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", s)
