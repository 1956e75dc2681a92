"""`cluster deploy`, `rollback`, `undeploy` and `models`: versions published on the share and rolled out
by the manager."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from cluster import config
from cluster.cli.canary import (
    ALPHA,
    CRITERION,
    LATENCY_RATIO,
    MIN_REQUESTS,
    NO_RETRY,
    SHADOW,
    SHADOW_ONLY,
    STEP,
    WAIT,
)
from cluster.cli.common import _table
from cluster.options import need_role, settings_command
from cluster.protocol import What
from cluster.role_settings import DeploySettings, ManagerQuerySettings
from cluster.sizes import format_bytes


def _print_rollout(report: dict, what: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    table = _table(
        f"{what} {report['model']} v{report['version']}"
        + (f" (was v{report['previous']})" if report.get("previous") else ""),
        "agent",
        "outcome",
    )
    first_with: dict[str, str] = {}  # a reason every agent gives (a model that cannot load) is printed once
    for agent_id, outcome in report["agents"].items():
        if outcome == "ok":
            table.add_row(agent_id, "[green]ok[/green]")
        elif outcome in first_with:
            table.add_row(agent_id, f"[red]failed: the same as {first_with[outcome]}[/red]")
        else:
            first_with[outcome] = agent_id
            table.add_row(agent_id, f"[red]failed: {escape(outcome)}[/red]")
    Console().print(table)
    for agent_id, why in (report.get("left_out") or {}).items():
        typer.echo(f"not waited for: {agent_id} ({why})")
    if report.get("note"):
        typer.echo(report["note"])
    head = f"{what} of {report['model']} v{report['version']}"
    agents = f"{len(report['agents'])} agent{'s' if len(report['agents']) != 1 else ''}"
    if report["ok"]:
        typer.echo(f"{head} done in {report['seconds']:.2f} s on {agents}")
        return
    kept = (
        f"every agent keeps serving v{report['previous']}"
        if report.get("previous") is not None
        else f"{report['model']} stays undeployed (it had no earlier version)"
    )
    removed = f"; v{report['version']} was taken off the share" if report.get("removed") else ""
    typer.echo(f"{head} FAILED after {report['seconds']:.2f} s on {agents}: {kept}{removed}")


def _manager_call(
    manager: str, what: What, wait: float, key: str | None = None, data: bytes | list | None = None, **fields
):
    from cluster import ClusterError
    from cluster.manager.client import ManagerClient

    try:
        return ManagerClient(manager, key=key).call(what, timeout=wait, data=data, **fields)
    except ClusterError as exc:
        typer.echo(f"{what} failed: {exc}", err=True)
        raise typer.Exit(2) from None


def _deploy_check(manager: str, key: str | None, what: What, doing: str = "deploy", **fields) -> None:
    """Before a deploy sends or publishes anything (or a rollback waits for its rollout): the manager answers `what`
    within seconds, or the command ends here (a wrong --manager, a manager that is down, a key it refuses, a config
    or name it refuses)."""
    from cluster import ClusterError, InferenceTimeoutError
    from cluster.manager.client import ManagerClient

    try:
        ManagerClient(manager, key=key).call(what, timeout=config.DEPLOY_CHECK_TIMEOUT_S, **fields)
    except InferenceTimeoutError:
        typer.echo(
            f"cannot {doing}: no answer from the manager at {manager} within {config.DEPLOY_CHECK_TIMEOUT_S:g} s; "
            "is it running, and is that its query address (--manager-queries, CLUSTER_MANAGER_QUERIES)?",
            err=True,
        )
        raise typer.Exit(2) from None
    except ClusterError as exc:
        typer.echo(f"cannot {doing}: {exc}", err=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _publish_progress(path: Path):
    """publish_version's progress callback: a bar on a terminal; None elsewhere (scripts, CI), where the transient bar
    would show nothing and importing rich would still cost a fresh process ~0.2 s."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"publishing {path.name}", total=path.stat().st_size)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@settings_command(DeploySettings)
def deploy(
    settings: DeploySettings,
    path: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="The model file: .pt (TorchScript) or .pt2 (torch.export)."
    ),
    name: str = typer.Option(..., "--name", help="Model name."),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help="config.json (inputs, outputs, serving settings; ours or Triton's, as JSON or config.pbtxt); "
        "required for a new model.",
    ),
    timeout: float = typer.Option(
        config.ROLLOUT_TIMEOUT_S, help="Seconds to wait for every agent to load and warm up the new version."
    ),
    preprocess: Path | None = typer.Option(
        None,
        "--preprocess",
        exists=True,
        dir_okay=False,
        help="An exported program (.pt2) run before the model on each decoded image (e.g. resize and normalise); "
        "published as preprocess.pt2.",
    ),
    postprocess: Path | None = typer.Option(
        None,
        "--postprocess",
        exists=True,
        dir_okay=False,
        help="An exported program (.pt2) run on the model's outputs (e.g. softmax and top-k); published as "
        "postprocess.pt2.",
    ),
    canary_steps: str | None = typer.Option(
        None, "--canary", help="Roll out as a canary judged on live traffic, with these weights (e.g. 10,50,100)."
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
    compile_package: bool = typer.Option(
        False,
        "--compile",
        help="Compile the .pt2 into an AOTInductor package before publishing (here with --share, else on the "
        "manager's host); agents that match run it.",
    ),
    compile_device: str = typer.Option("cpu", "--compile-device", help="The device kind to compile for: cpu or cuda."),
):
    """Publish a new version atomically on the share, roll it out to every agent, print each agent's outcome.
    The name and config are checked here, and the manager asked whether it is there (and takes them), within
    seconds, before any model file is sent or published. With --canary (or --shadow-only), a model that has a
    stable version gets a canary run of the new one instead (`cluster rollouts` follows it). With --compile, the
    exported program is compiled (AOTInductor) first and the package published beside it."""
    share, manager, key = settings.share, settings.addresses.manager_queries, settings.key
    if compile_package and path.suffix.lower() != ".pt2":
        typer.echo(f"cannot compile {path}: --compile takes an exported program (.pt2), not TorchScript", err=True)
        raise typer.Exit(2)
    if compile_device not in ("cpu", "cuda"):
        typer.echo(f"--compile-device must be cpu or cuda, got {compile_device!r}", err=True)
        raise typer.Exit(2)
    from cluster.cli.canary import run_fields, started

    run = None
    if canary_steps is not None or shadow_only:
        run = run_fields(
            canary_steps, step, shadow, shadow_only, no_retry, alpha, min_requests, latency_ratio, criterion
        )
    elif (
        no_retry or wait or criterion or any(v is not None for v in (step, shadow, alpha, min_requests, latency_ratio))
    ):
        typer.echo("--step, --shadow, --no-retry, --alpha, --min-requests, --latency-ratio and --wait are a canary's: "
                   "give --canary 10,50,100 (or --shadow-only)", err=True)  # fmt: skip
        raise typer.Exit(2)

    from cluster.model_config import ModelConfig, RepositoryError, read_config_file
    from cluster.publish import publish_version
    from cluster.repository import MODEL_FILES, PREPROCESS_FILE, PROGRAM_FILES, ModelRepository, check_name

    model_config = None
    programs = {f: p for f, p in zip(PROGRAM_FILES, (preprocess, postprocess)) if p is not None}
    try:
        check_name(name)
    except RepositoryError as exc:
        typer.echo(f"cannot deploy: {exc}", err=True)
        raise typer.Exit(2) from None
    if config_file is not None:
        try:
            model_config = read_config_file(config_file, name)  # ours or Triton's, JSON or config.pbtxt
            ModelConfig.from_dict(model_config, name=name)  # names, shapes, datatypes: refused before any upload
        except (ValueError, RepositoryError) as exc:
            typer.echo(f"{config_file} is not a model config: {exc}", err=True)
            raise typer.Exit(2) from None
    if share is None:  # no share here: the manager publishes on its own
        file_name = {".pt": "model.pt", ".pt2": "model.pt2"}.get(path.suffix.lower())
        size = path.stat().st_size + sum(p.stat().st_size for p in programs.values())
        if file_name not in MODEL_FILES:
            typer.echo(f"cannot publish {path}: expected a .pt (TorchScript) or .pt2 (torch.export) file", err=True)
            raise typer.Exit(2)
        if size > config.limits().max_upload_bytes:
            typer.echo(
                f"cannot send {path} ({size} bytes) over the bus: the limit is "
                f"{config.limits().max_upload_bytes} bytes "
                "(CLUSTER_MAX_UPLOAD_BYTES, on the manager too); or give --share to publish into the share directly",
                err=True,
            )
            raise typer.Exit(2)
        more = {} if run is None else {"canary": run}
        if compile_package:  # the manager compiles (in a child process), or says why it cannot
            more["compile"] = compile_device
        _deploy_check(manager, key, What.PUBLISH_CHECK, name=name, file=file_name, config=model_config, **more)
        typer.echo(f"sending {path.name} ({size / 2**20:.1f} MiB) to the manager at {manager} ...")
        sent = {"programs": list(programs)} if programs else {}
        report = _manager_call(
            manager,
            What.PUBLISH,
            timeout + 120 + (config.COMPILE_TIMEOUT_S if compile_package else 0),
            key,
            data=[path.read_bytes(), *(p.read_bytes() for p in programs.values())] if programs else path.read_bytes(),
            name=name,
            file=file_name,
            config=model_config,
            rollout_timeout=timeout,
            **more,
            **sent,
        )
        if "outcome" in report:  # a canary run started (the model has a stable version)
            typer.echo(f"the manager published {name} version {report['version']}")
            started(manager, key, report, wait)
        typer.echo(f"the manager published {name} version {report['version']}; rolled out:")
        _print_rollout(report, "deploy")
        raise typer.Exit(0 if report["ok"] else 1)
    _deploy_check(manager, key, What.ROLLOUTS)  # it must be there to roll out what is published next
    share_dir = Path(share)
    new_model = not ModelRepository(share_dir).versions(name)
    stable = None
    if run is not None:  # a canary needs a stable version; one running already refuses a new one (before publishing)
        stable = (_manager_call(manager, What.DEPLOYMENTS, 10, key).get(name) or {}).get("version")
        running = (_manager_call(manager, What.ROLLOUTS, 10, key, name=name)["canaries"] or {}).get(name)
        if running is not None and not running.get("done"):
            typer.echo(f"cannot deploy: a canary of '{name}' (v{running['version']}) is running; promote or abort it")
            raise typer.Exit(2)
    with contextlib.ExitStack() as stack:
        pre = PREPROCESS_FILE in programs
        extra = _compile(stack, path, name, model_config, share_dir, compile_device, pre) if compile_package else None
        with _publish_progress(path) as progress:
            try:
                version = publish_version(
                    share_dir, name, path, model_config, progress=progress, programs=programs, extra=extra
                )
            except RepositoryError as exc:
                typer.echo(f"cannot publish: {exc}", err=True)
                raise typer.Exit(2) from None
    if run is not None and stable is not None and not new_model:
        typer.echo(f"published {name} version {version} to {share_dir}; starting a canary ...")
        started(manager, key, _manager_call(manager, What.CANARY, 10, key, name=name, version=version, **run), wait)
    typer.echo(f"published {name} version {version} to {share_dir}; rolling out ...")
    report = _manager_call(
        manager,
        What.DEPLOY,
        timeout + 30,
        key,
        name=name,
        version=version,
        rollout_timeout=timeout,
        discard_on_failure="model" if new_model else "version",  # a rejected version does not stay on the share
    )
    _print_rollout(report, "deploy")
    raise typer.Exit(0 if report["ok"] else 1)


def _compile(
    stack: contextlib.ExitStack,
    path: Path,
    name: str,
    model_config: dict | None,
    share_dir: Path,
    device: str,
    preprocess: bool = False,
) -> dict[str, Path]:
    """The package and compiled.json, in a temporary folder (removed with `stack`), to publish beside the program."""
    import tempfile

    need_role("agent", what="cluster deploy --compile")  # torch.export and AOTInductor, here
    from cluster.compile import compile_program, compiled_json
    from cluster.model_check import COMPILED_FILE
    from cluster.model_config import ModelConfig, RepositoryError
    from cluster.repository import ModelRepository

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cluster-compile-")))
    typer.echo(f"compiling {path.name} for {device} (AOTInductor) ...")
    try:
        if model_config is not None:
            parsed = ModelConfig.from_dict(model_config, name=name)
        else:
            parsed = ModelRepository(share_dir).read_config(name)
        package, entry = compile_program(path, parsed, folder, device, preprocess)
    except RepositoryError as exc:
        typer.echo(f"cannot compile: {exc}", err=True)
        raise typer.Exit(2) from None
    (folder / COMPILED_FILE).write_bytes(compiled_json({package.name: entry}))
    typer.echo(f"compiled {package.name} in {entry['seconds']:.1f} s (batch {entry['batch'][0]}..{entry['batch'][1]})")
    return {package.name: package, COMPILED_FILE: folder / COMPILED_FILE}


@settings_command(ManagerQuerySettings)
def rollback(
    settings: ManagerQuerySettings,
    name: str = typer.Argument(..., help="Model name."),
    to: int | None = typer.Option(None, "--to", help="Version to go back to (default: the one served before)."),
    timeout: float = typer.Option(config.ROLLOUT_TIMEOUT_S, help="Seconds to wait for every agent."),
):
    """Roll a model back to an earlier version, with the same zero-drop rollout as deploy."""
    manager, key = settings.addresses.manager_queries, settings.key
    _deploy_check(manager, key, What.ROLLOUTS, "roll back")  # there at all: in seconds, not after --timeout + 30 s
    report = _manager_call(manager, What.ROLLBACK, timeout + 30, key, name=name, to=to, rollout_timeout=timeout)
    _print_rollout(report, "rollback")
    raise typer.Exit(0 if report["ok"] else 1)


@settings_command(ManagerQuerySettings)
def undeploy(settings: ManagerQuerySettings, name: str = typer.Argument(..., help="Model name.")):
    """Stop serving a model everywhere (agents finish what is in flight, then unload it). The share keeps its files."""
    manager, key = settings.addresses.manager_queries, settings.key
    _manager_call(manager, What.UNDEPLOY, 10, key, name=name)
    typer.echo(f"undeployed {name}")


@settings_command(ManagerQuerySettings)
def models(settings: ManagerQuerySettings):
    """What is deployed, at which version, on which agents."""
    manager, key = settings.addresses.manager_queries, settings.key
    from rich.console import Console

    deployments = _manager_call(manager, What.DEPLOYMENTS, 5, key)
    table = _table(
        "Deployments", "model", "version", "staged", "history", "copies", "memory", "agents (versions served)"
    )
    for name, d in sorted(deployments.items()):
        agents = ", ".join(f"{a} (v{','.join(map(str, vs))})" for a, vs in sorted(d["agents"].items())) or "none"
        table.add_row(
            name,
            str(d["version"] or "-"),
            str(d["staged"] or "-"),
            ", ".join(map(str, d["history"])) or "-",
            _copies(d),
            format_bytes(d["memory"]) + f" ({d['memory_from']})" if d.get("memory") else "-",
            agents,
        )
    Console().print(table)
    for _, d in sorted(deployments.items()):
        if d.get("short"):
            typer.echo(f"short of copies: {d['short']}")


def _copies(d: dict) -> str:
    """Copies placed / wanted, and where ("all": every agent holds it, as without `replicas`)."""
    if d.get("replicas") is None:
        return "all" if d.get("version") is not None else "-"
    placed = d.get("placed") or []
    return f"{len(placed)}/{d['replicas']} on {', '.join(placed) or 'none'}"
