"""The pieces every self-contained HTML page of pico-llm is made of (the run and sweep report, the SAE
feature report): escaping, text shown with its control characters visible, figures as data URIs."""

from __future__ import annotations

import base64
import html
import io
import unicodedata
from typing import Callable


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def visible(text: str, newline: str = "\n") -> str:
    """HTML for generated text: control characters and the like shown as escapes, not raw bytes; a
    newline as `newline` (itself, or e.g. '<span class="esc">↵</span>' inside one line of tokens)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append(newline)
        elif ch in "\t " or unicodedata.category(ch)[0] not in "CZ":
            out.append(esc(ch))
        else:
            out.append(f'<span class="esc">{esc(ch.encode("unicode_escape").decode())}</span>')
    return "".join(out)


def png_data_uri(draw: Callable[[io.BytesIO], None]) -> str:
    """A figure drawn into a PNG buffer by draw(buf), as a data: URI for an <img>."""
    buf = io.BytesIO()
    draw(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
