"""Tables that benchmarks regenerate in the docs: the text between a
`<!-- NAME:begin -->` and a `<!-- NAME:end -->` line is theirs, the rest of
the file stays as written."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_block(path: Path, name: str, text: str) -> None:
    """Put `text` between `name`'s markers in `path` (appended with them
    when they are not there yet)."""
    begin, end = markers(name)
    old = path.read_text() if path.is_file() else ""
    if begin not in old:
        old += f"{begin}\n{end}\n"
    head, _, rest = old.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{text}{end}{tail}")
