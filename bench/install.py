"""What each install costs: seconds and megabytes of a fresh virtual environment, per role (issue 24).

    python3 -m bench.install [--only readme,core,edge,agent,full] [--before DIR] [--json]

Each row: a new venv (python3 -m venv, this interpreter), then one `pip install` timed, then the venv's size on disk
(site-packages and all), the number of distributions in it, and whether torch, scikit-learn and scipy are there.
Rows (SRC: this checkout):
  readme  the README's first command: pip install -c constraints.txt SRC
  full    the full install at the lock's versions: pip install -c constraints.lock SRC (what the full image has)
  core    a manager or broker node: pip install -c constraints.lock SRC/slim
  edge    an edge node: pip install -c constraints.lock 'SRC/slim[edge]'
  agent   an agent node: pip install -c constraints.lock 'SRC/slim[agent]'
`--before DIR` adds a `before` row: the README's first command on another checkout (e.g. a worktree of an older
commit), run first, in the same run, as the baseline of `readme`.

pip runs as this machine configures it, with its cache as it is (warm after the first row: every row downloads the
same way, so the rows compare; a fresh machine's first install also downloads). Nothing is asserted here: the figures
go in the issue's note and README's "Install by role".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WATCH = ("torch", "scikit-learn", "scipy", "fastapi", "grpcio", "pillow")


def rows(src: Path) -> dict[str, list[str]]:
    """The pip arguments of each row, for the checkout at `src`."""
    lock = ["-c", str(src / "constraints.lock")]
    return {
        "readme": ["-c", str(src / "constraints.txt"), str(src)],
        "full": [*lock, str(src)],
        "core": [*lock, str(src / "slim")],
        "edge": [*lock, f"{src / 'slim'}[edge]"],
        "agent": [*lock, f"{src / 'slim'}[agent]"],
    }


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure(name: str, pip_args: list[str], cwd: Path) -> dict:
    """One row: a fresh venv, the install timed, what it holds."""
    with tempfile.TemporaryDirectory(prefix=f"bench-install-{name}-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        python = str(venv / "bin" / "python")
        empty = size_bytes(venv)
        before = len(_installed(python))  # pip, and setuptools where the venv module still adds it (3.11 and older)
        started = time.perf_counter()
        done = subprocess.run(
            [python, "-m", "pip", "install", "-q", *pip_args], cwd=cwd, capture_output=True, text=True, timeout=1800
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {"row": name, "error": done.stderr.strip()[-2000:]}
        dists = _installed(python)
        helped = subprocess.run([str(venv / "bin" / "cluster"), "--help"], capture_output=True, timeout=120)
        return {
            "row": name,
            "seconds": round(seconds, 1),
            "mb": round((size_bytes(venv) - empty) / 1e6, 1),
            "distributions": len(dists) - before,
            "has": [w for w in WATCH if w in dists],
            "cluster --help": "ok" if helped.returncode == 0 else f"exit {helped.returncode}",
        }


def _installed(python: str) -> dict[str, str]:
    """{distribution: version} in the venv of `python`."""
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, timeout=120, check=True
    )
    return {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="readme,full,core,edge,agent", help="rows, comma-separated")
    parser.add_argument("--before", type=Path, help="another checkout: its README install is the `before` row")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    args = parser.parse_args()
    plan = []
    if args.before:
        plan.append(("before", ["-c", str(args.before / "constraints.txt"), str(args.before)], args.before))
    table = rows(REPO_ROOT)
    plan += [(name, table[name], REPO_ROOT) for name in args.only.split(",")]
    results = []
    for name, pip_args, cwd in plan:
        print(f"installing {name}: pip install {' '.join(pip_args)}", file=sys.stderr)
        result = measure(name, pip_args, cwd)
        results.append(result)
        print(json.dumps(result) if args.json else _line(result), flush=True)


def _line(result: dict) -> str:
    if "error" in result:
        return f"{result['row']:8} FAILED: {result['error']}"
    return (
        f"{result['row']:8} {result['seconds']:7.1f} s {result['mb']:8.1f} MB {result['distributions']:4d} packages"
        f"  {', '.join(result['has']) or '-'}  (cluster --help: {result['cluster --help']})"
    )


if __name__ == "__main__":
    main()
