"""`cluster canary`, `promote`, `abort` and `rollouts`: canary and shadow runs, judged by the manager on live traffic
(cluster/manager/canaries.py), and the flags `cluster deploy --canary` shares with them.

A run is answered at once with its status; `--wait` (and `rollouts --watch`) then follow it by asking the manager's
`rollouts` about every half second, printing one line each time the judge's look changes."""

from __future__ import annotations

import time
from datetime import datetime

import typer

from cluster import config
from cluster.canary.judge import Criteria
from cluster.options import settings_command
from cluster.protocol import What
from cluster.role_settings import ManagerQuerySettings

POLL_S = 0.5  # how often --watch and --wait ask the manager
WAIT_TIMEOUT_S = 3600.0  # --wait gives up after this long (the run goes on at the manager)


def parse_duration(text: str) -> float:
    """ "30s", "2m", "500ms", "1h" or plain seconds ("30", "1.5"); typer.BadParameter otherwise."""
    from cluster.canary.options import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_steps(text: str) -> list[int]:
    """ "10,50,100" -> [10, 50, 100]; typer.BadParameter for anything but rising percents from 1 to 100."""
    from cluster.canary.options import parse_steps

    try:
        return parse_steps(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# The run's flags, shared by `cluster canary` and `cluster deploy --canary` (typer reads these defaults)
STEP = typer.Option(None, "--step", help="Least time per step: 30s, 2m, 500ms or seconds (default 30s).")
SHADOW = typer.Option(None, "--shadow", help="Fraction of requests also mirrored to the new version (0..1).")
SHADOW_ONLY = typer.Option(False, "--shadow-only", help="Mirror only (no live traffic): report drift, never promote.")
NO_RETRY = typer.Option(False, "--no-retry", help="A canary request that fails is not re-run on the stable version.")
ALPHA = typer.Option(None, "--alpha", help="The error test's false-rollback bound (default 0.01).")
MIN_REQUESTS = typer.Option(None, "--min-requests", help="Canary answers a step needs to pass (default 100).")
LATENCY_RATIO = typer.Option(None, "--latency-ratio", help="Slowdown (median or p99) that rolls back (default 1.5).")
CRITERION = typer.Option(
    None, "--criterion", help="Any criterion of the judge as NAME=VALUE, repeatable (e.g. latency_floor_ms=0)."
)
WAIT = typer.Option(
    False, "--wait", help="Follow the run until it is over: exit 0 when promoted (or no drift), else 1."
)


def run_fields(
    steps: str | None,
    step: str | None,
    shadow: float | None,
    shadow_only: bool,
    no_retry: bool,
    alpha: float | None,
    min_requests: int | None,
    latency_ratio: float | None,
    more: list[str] | None = None,
) -> dict:
    """The fields of QUERY canary (and of a publish's "canary" map) from the flags; None: the manager's default.
    `more`: --criterion NAME=VALUE pairs (checked against Criteria here, so a typo fails before anything is sent)."""
    if shadow is not None and not 0 <= shadow <= 1:
        raise typer.BadParameter(f"--shadow {shadow}: give a fraction from 0 to 1")
    criteria = {
        k: v
        for k, v in (("alpha", alpha), ("min_requests", min_requests), ("latency_ratio", latency_ratio))
        if v is not None
    }
    for pair in more or []:
        key, sep, value = pair.partition("=")
        try:
            number = float(value)
            criteria[key.strip()] = int(number) if number.is_integer() else number
            Criteria.from_wire(criteria)
        except ValueError as exc:
            why = exc if sep else "give NAME=VALUE"
            raise typer.BadParameter(f"--criterion {pair}: {why}") from None
    fields = {
        "steps": parse_steps(steps) if steps is not None else None,
        "step_seconds": parse_duration(step) if step is not None else None,
        "shadow": shadow,
        "shadow_only": shadow_only,
        "retry": not no_retry,
        "criteria": criteria or None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _number(value, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def look_line(status: dict) -> str:
    """One line for one look: time, model, step/weight, per version requests, error rate and p99, the tests'
    statistics, shadow agreement, the decision and its reason."""
    look = status.get("look") or {}
    figures = look.get("figures") or {}
    weight = f"shadow {status.get('shadow', 0):g}" if status.get("shadow_only") else f"{status.get('weight', 0)}%"
    steps = status.get("steps") or []
    parts = [
        datetime.now().strftime("%H:%M:%S"),
        f"{status['model']} v{status.get('version')} vs v{status.get('stable')}",
        f"step {status.get('step', 0) + 1}/{len(steps)} {weight} {status.get('phase', '')}".rstrip(),
    ]
    for version, v in sorted((figures.get("versions") or {}).items()):
        parts.append(
            f"v{version}: {v.get('requests', 0)} req, {_number(v.get('error_rate'), '{:.2%}')} err, "
            f"p99 {_number(v.get('p99_ms'), '{:.1f}')} ms"
        )
    errors, latency, shadow = figures.get("errors"), figures.get("latency"), figures.get("shadow")
    if errors:
        parts.append(f"log BF {_number(errors.get('log_bf'), '{:.2f}')}/{_number(errors.get('threshold'), '{:.2f}')}")
    if latency:
        parts.append(
            f"U({latency.get('basis', '?')}) z {_number(latency.get('z'), '{:.2f}')} p {_number(latency.get('p'))}"
            f" ratio {_number(latency.get('median_ratio'), '{:.2f}')}/{_number(latency.get('p99_ratio'), '{:.2f}')}"
        )
    if shadow:
        agree = shadow.get("top1_agreement")
        parts.append(
            f"shadow {shadow.get('pairs', 0)} pairs, drift {_number(shadow.get('drift_rate'), '{:.2%}')}"
            + (f", top-1 {agree:.2%}" if isinstance(agree, (int, float)) else "")
        )
    if status.get("done"):
        reason = (status.get("decisions") or [{}])[-1].get("reason") or status.get("reason", "")
        parts.append(f"{status.get('outcome', 'over').upper()}: {reason}")
    elif look:
        parts.append(f"{look.get('decision')}: {look.get('reason')}")
    return " | ".join(parts)


def _succeeded(status: dict) -> bool:
    return status.get("outcome") in ("promoted", "no drift")


def follow(manager: str, key: str | None, name: str | None, run_id: str | None, timeout: float | None) -> dict | None:
    """Print a line each time a run's look changes, until the followed run is over (`run_id`; None: every run
    shown, or `name`'s), `timeout` passes (None: until Ctrl-C), or Ctrl-C. Returns the followed run's last status."""
    from cluster.cli.deploy import _manager_call

    deadline = None if timeout is None else time.monotonic() + timeout
    shown: dict[str, tuple] = {}
    last = None
    try:
        while True:
            answer = _manager_call(manager, What.ROLLOUTS, config.DEPLOY_CHECK_TIMEOUT_S, key, name=name)
            followed = {
                model: status
                for model, status in sorted((answer.get("canaries") or {}).items())
                if run_id is None or status.get("id") == run_id
            }
            for model, status in followed.items():
                seen = (status.get("id"), status.get("phase"), status.get("step"), status.get("done"))
                if shown.get(model) != (*seen, repr(status.get("look"))):
                    typer.echo(look_line(status))
                shown[model] = (*seen, repr(status.get("look")))
                last = status
            if not followed:
                if run_id is None:
                    typer.echo(f"no canary run{f' of {name}' if name else ''} to watch")
                return last
            if all(status.get("done") for status in followed.values()):
                return last
            if deadline is not None and time.monotonic() > deadline:
                typer.echo(f"still running after {timeout:g} s; it goes on (cluster rollouts --watch)", err=True)
                return last
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        return last


def started(manager: str, key: str | None, status: dict, wait: bool) -> None:
    """Say that a run started (the manager's answer), follow it with --wait, and exit with its outcome."""
    what = "shadow run" if status.get("shadow_only") else "canary"
    typer.echo(
        f"{what} {status['id']} of {status['model']} v{status['version']} beside v{status['stable']}: "
        f"{status['phase']} (steps {','.join(map(str, status['steps']))}, {status['step_seconds']:g} s each, "
        f"shadow {status['shadow']:g}, retry {'on' if status['retry'] else 'off'}); "
        f"follow it with: cluster rollouts {status['model']} --watch"
    )
    if not wait:
        raise typer.Exit(0)
    last = follow(manager, key, status["model"], status["id"], WAIT_TIMEOUT_S)
    raise typer.Exit(0 if last is not None and _succeeded(last) else 1)


@settings_command(ManagerQuerySettings)
def canary(
    settings: ManagerQuerySettings,
    name: str = typer.Argument(..., help="Model name."),
    version: int | None = typer.Option(None, "--version", help="The version to judge (default the newest)."),
    steps: str | None = typer.Option(
        None, "--canary", "--steps", help="Live weights in percent, one step after another (default 10,50,100)."
    ),
    step: str | None = STEP,
    shadow: float | None = SHADOW,
    shadow_only: bool = SHADOW_ONLY,
    no_retry: bool = NO_RETRY,
    alpha: float | None = ALPHA,
    min_requests: int | None = MIN_REQUESTS,
    latency_ratio: float | None = LATENCY_RATIO,
    criterion: list[str] | None = CRITERION,
    wait: bool = WAIT,
):
    """Start a canary of a published version beside the stable one: it gets a growing share of the unpinned
    requests, step by step, judged on errors, latency (and shadow drift) as it goes; promoted when every step
    passes, rolled back at the first regression."""
    from cluster.cli.deploy import _manager_call

    manager, key = settings.addresses.manager_queries, settings.key
    fields = run_fields(steps, step, shadow, shadow_only, no_retry, alpha, min_requests, latency_ratio, criterion)
    status = _manager_call(manager, What.CANARY, 10, key, name=name, version=version, **fields)
    started(manager, key, status, wait)


@settings_command(ManagerQuerySettings)
def promote(settings: ManagerQuerySettings, name: str = typer.Argument(..., help="Model name.")):
    """Make the running canary the stable version now (agents switch to it and unload the old one)."""
    from cluster.cli.deploy import _manager_call

    status = _manager_call(settings.addresses.manager_queries, What.PROMOTE, 10, settings.key, name=name)
    typer.echo(f"promoted {name} v{status['version']} (was v{status['stable']})")


@settings_command(ManagerQuerySettings)
def abort(settings: ManagerQuerySettings, name: str = typer.Argument(..., help="Model name.")):
    """End the running canary now: the stable version serves everything (agents unload the canary)."""
    from cluster.cli.deploy import _manager_call

    status = _manager_call(settings.addresses.manager_queries, What.ABORT, 10, settings.key, name=name)
    typer.echo(f"aborted the canary of {name} v{status['version']}; v{status['stable']} serves everything")


@settings_command(ManagerQuerySettings)
def rollouts(
    settings: ManagerQuerySettings,
    name: str | None = typer.Argument(None, help="Only this model."),
    watch: bool = typer.Option(False, "--watch", help="Print a line at each new look until the runs are over."),
):
    """Canary runs (the one in progress or the last one, per model): a line per look, and each run's decisions."""
    from cluster.cli.deploy import _deploy_check, _manager_call

    manager, key = settings.addresses.manager_queries, settings.key
    if watch:
        _deploy_check(manager, key, What.ROLLOUTS, "watch")
        follow(manager, key, name, None, None)
        raise typer.Exit(0)
    answer = _manager_call(manager, What.ROLLOUTS, 10, key, name=name)
    typer.echo(
        f"rollouts since the manager started: {answer.get('ok', 0)} ok, {answer.get('failed', 0)} failed, "
        f"{answer.get('in_progress', 0)} in progress"
    )
    canaries = answer.get("canaries") or {}
    if not canaries:
        typer.echo(f"no canary runs{f' of {name}' if name else ''}")
    for status in canaries.values():
        typer.echo(look_line(status))
        for d in status.get("decisions") or []:
            at = datetime.fromtimestamp(d.get("at", 0)).strftime("%H:%M:%S")
            typer.echo(f"  {at} step {d.get('step', 0) + 1} {d.get('weight')}% {d.get('decision')}: {d.get('reason')}")
