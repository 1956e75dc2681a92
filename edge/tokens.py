"""Reading a token file: the edge's `--token-file` and `cluster bench --token-file` alike. The standard library
alone, so that a bench machine (`pip install './slim[bench]'`: no FastAPI) reads one too; edge.security re-exports
it."""

from __future__ import annotations

from pathlib import Path


def read_token_file(path: str | Path) -> tuple[str, ...]:
    """The tokens in a file, one a line (blank lines and lines starting with # are skipped). A file without any is an
    error: it would leave the edge open while its operator believes it closed."""
    lines = Path(path).read_text().splitlines()
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ValueError(f"the token file {path} holds no token (one a line)")
    return tokens
