"""Contact sheets of search results (`reid-gallery search --sheet`): a PNG or an HTML page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from ..data.loader import read_image
from .querying import SearchHit

__all__ = ["write_sheet"]


def write_sheet(path: str | Path, queries: Sequence[str], results: Sequence[Sequence[SearchHit]],
                thumb: tuple[int, int] = (128, 64)) -> None:
    """Contact sheet: one row per query (query first, then its ranked crops with score and camera).
    `.html` writes a page of <img> links; anything else a PNG."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        rows = []
        for q, hits in zip(queries, results):
            cells = [f'<td><img src="{html.escape(Path(q).resolve().as_uri())}" height="{thumb[0]}"><br>query</td>']
            cells += [f'<td><img src="{html.escape(Path(h.path).as_uri())}" height="{thumb[0]}"><br>'
                      f"#{h.rank} {h.score:.3f}<br>cam {h.camid}</td>" for h in hits]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        path.write_text("<!doctype html><meta charset=utf-8><title>reid-gallery</title>"
                        "<table style='font:12px monospace;text-align:center'>" + "".join(rows) + "</table>")
        return
    from PIL import Image, ImageDraw

    h, w = thumb
    label = 24
    cols = 1 + max((len(r) for r in results), default=0)
    sheet = Image.new("RGB", (cols * (w + 4), len(queries) * (h + label + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (q, hits) in enumerate(zip(queries, results)):
        y = row * (h + label + 4)
        tiles = [(q, "query", (0, 0, 255))] + [(x.path, f"{x.score:.3f} c{x.camid}", (0, 0, 0)) for x in hits]
        for col, (p, text, color) in enumerate(tiles):
            x0 = col * (w + 4)
            try:
                sheet.paste(read_image(p).resize((w, h)), (x0, y))
            except OSError:
                draw.rectangle((x0, y, x0 + w, y + h), outline="red")
            draw.text((x0 + 2, y + h + 2), text, fill=color)
    sheet.save(path)
