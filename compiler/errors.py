"""User-facing errors: each carries every problem found, with the file, line and layer it concerns.

Anything a user can cause (a bad YAML file, a shape mismatch, a corrupt ONNX file) raises `DlcError`; the CLI
prints its diagnostics and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Messages quote the user's values; a 100,000-character layer name must not become a 200 KB message.
MAX_TOKEN = 256  # long enough for any real path
MAX_MESSAGE = 2000
_LONG_TOKEN = re.compile(rf"\S{{{MAX_TOKEN + 1},}}")


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with every run of more than MAX_TOKEN non-blank characters cut in the middle, and at most
    `limit` characters in all; what was cut is counted, so the user sees that it was."""
    text = str(text)

    def cut(m: re.Match) -> str:
        token = m.group(0)
        return f"{token[:100]}…[{len(token) - 140:,} chars]…{token[-40:]}"

    text = _LONG_TOKEN.sub(cut, text)
    if len(text) > limit:
        text = f"{text[:limit - 40]}…[{len(text) - limit + 40:,} more chars]"
    return text


@dataclass(frozen=True)
class Diagnostic:
    message: str
    file: str | None = None
    line: int | None = None
    layer: str | None = None
    hint: str | None = None
    note: str | None = None  # where a block-expanded layer came from

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        layer = f"layer '{self.layer}': " if self.layer else ""
        hint = f" ({self.hint})" if self.hint else ""
        note = f" [{self.note}]" if self.note else ""
        return shorten(f"{where}{layer}{self.message}{hint}{note}")


class DlcError(Exception):
    """One or more user errors. `str()` lists them all, one per line."""

    def __init__(self, diagnostics: Diagnostic | str | Iterable[Diagnostic]):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean 'x'?" hint for a misspelt word, or None when nothing is close."""
    word = str(word)
    if len(word) > MAX_TOKEN:  # difflib is quadratic; nothing that long is a typo of a short name
        return None
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None
