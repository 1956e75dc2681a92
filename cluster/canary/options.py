"""How people write a canary run's options (`cluster deploy --canary 10,50,100 --step 30s`, the edge's repository
load parameters): durations and step weights, parsed in one place for the command line and the edge."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text) -> float:
    """ "30s", "2m", "500ms", "1h" or plain seconds ("30", "1.5", or a number); ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text >= 0:
        return float(text)
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration: give e.g. 30s, 2m, 500ms or seconds")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_steps(text) -> list[int]:
    """ "10,50,100" (or a list of ints) -> [10, 50, 100]; ValueError for anything but rising percents from 1 to
    100."""
    steps: list = []
    if isinstance(text, list):
        steps = text if all(isinstance(w, int) and not isinstance(w, bool) for w in text) else []
    elif isinstance(text, str):
        try:
            steps = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            steps = []
    if not steps or not all(1 <= w <= 100 for w in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{text!r}: give rising percents from 1 to 100, e.g. 10,50,100")
    return list(steps)
