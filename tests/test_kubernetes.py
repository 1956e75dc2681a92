"""The Kubernetes manifests (deploy/kubernetes/) and the image (Containerfile), checked offline and in-process:

- every manifest is valid against the Kubernetes API schemas (kubernetes-validate ships them; strict: an unknown
  field is an error), for the newest Kubernetes it knows and an older one still in use;
- every `cluster ROLE --option value` a container runs, and every `cluster health ...` probe, parses with the CLI's
  own typer app (a renamed or misspelt option fails here, not in a crash-looping pod);
- every CLUSTER_* variable a container sets is one the CLI or cluster/config.py reads;
- the ports: the containers' ports, the addresses they bind (0.0.0.0) and the Services' ports are cluster/config.py's
  defaults, the addresses they connect to name a Service and one of its ports, the Containerfile EXPOSEs them;
- every pod has readiness and liveness probes and resource requests; key files lie on mounted Secrets, and the
  README says how to make each Secret.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import typer
import yaml

from cluster import config, settings
from cluster.cli import app
from tests.harness import REPO_ROOT

MANIFESTS = sorted((REPO_ROOT / "deploy" / "kubernetes").rglob("*.yaml"))
CLI = typer.main.get_command(app)


def port_of(address: str) -> int:
    return int(urlparse(address).port)


# the port each role binds, by its option, from cluster/config.py
ROLE_PORTS = {
    "manager": {
        "--heartbeats": port_of(config.MANAGER_HEARTBEAT_ADDR),
        "--events": port_of(config.MANAGER_EVENTS_ADDR),
        "--queries": port_of(config.MANAGER_QUERY_ADDR),
    },
    "broker": {"--clients": port_of(config.BROKER_CLIENT_ADDR), "--agents": port_of(config.BROKER_AGENT_ADDR)},
    "agent": {},
    "edge": {"--port": config.EDGE_PORT, "--grpc-port": config.EDGE_GRPC_PORT},
}


def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in MANIFESTS:
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def workloads() -> list[tuple[Path, dict, dict]]:
    """(file, Deployment, container) for every container of every Deployment."""
    return [
        (path, doc, c)
        for path, doc in documents()
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]


def services() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == "Service"}


def parse(args: list[str]):
    """Parse `cluster ARGS` as the CLI would, without running anything: (command name, click context)."""
    name, rest = args[0], list(args[1:])
    assert name in CLI.commands, f"`cluster {name}` is not a command of the CLI ({sorted(CLI.commands)})"
    command = CLI.commands[name]
    return name, command.make_context(f"cluster {name}", rest)


def options_of(name: str) -> set[str]:
    return {opt for p in CLI.commands[name].params for opt in p.opts if opt.startswith("--")}


def envvars_of(name: str) -> set[str]:
    """The variables a command reads: its options' envvars, and its settings class's (cluster/role_settings.py)."""
    found = set()
    cls = getattr(CLI.commands[name].callback, "settings_class", None)
    if cls is not None:
        found |= {settings.variable(owner, f) for _, owner, f, _ in settings.walk(cls)}
    for p in CLI.commands[name].params:
        envvar = getattr(p, "envvar", None)
        found |= set([envvar] if isinstance(envvar, str) else envvar or [])
    return found


def test_there_are_manifests_for_every_role():
    assert MANIFESTS, "no manifests under deploy/kubernetes/"
    roles = {c["args"][0] for _, _, c in workloads()}
    assert roles == {"manager", "broker", "agent", "edge"}, roles
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Deployment", "Service", "PersistentVolume", "PersistentVolumeClaim"} <= kinds, kinds


def test_manifests_are_valid_kubernetes_offline():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the `test` extra)")
    versions = [kv.latest_version()]
    if "1.28.0" != versions[0]:
        versions.append("1.28.0")  # an older Kubernetes still in use: nothing here may need newer fields
    for path, doc in documents():
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(
                    f"{path.name}: {doc['kind']} {doc['metadata']['name']} is not valid Kubernetes {version}: "
                    f"{exc.message} at {'.'.join(map(str, exc.path))}"
                )
    # the check itself bites: an unknown field (strict) and a wrong type are refused
    service = next(doc for _, doc in documents() if doc["kind"] == "Service")
    for broken in (
        {**service, "spec": {**service["spec"], "selectr": {}}},
        {**service, "spec": {**service["spec"], "ports": [{"port": "http"}]}},
    ):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, versions[0], strict=True)


def test_every_command_and_probe_parses_with_the_cli():
    for path, _, container in workloads():
        assert "command" not in container, f"{path.name}: use args (the image's entrypoint is `cluster`)"
        role, ctx = parse(container["args"])
        used = {a.split("=", 1)[0] for a in container["args"] if a.startswith("--")}
        assert used <= options_of(role), f"{path.name}: unknown options {used - options_of(role)} for {role}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None or "exec" not in probe:
                continue
            command = probe["exec"]["command"]
            assert command[:3] == ["cluster", "health", role], f"{path.name} {kind}: {command}"
            _, health = parse(command[1:])
            assert health.params["role"].value == role


def test_environment_variables_are_ones_the_cli_reads():
    read_by_config = {"CLUSTER_" + f.upper() for f in config.Addresses.__dataclass_fields__}
    for path, _, container in workloads():
        role = container["args"][0]
        known = envvars_of(role) | envvars_of("health") | read_by_config
        for env in container.get("env", []):
            if env["name"].startswith("CLUSTER_"):
                assert env["name"] in known, (
                    f"{path.name}: {env['name']} is read by neither `cluster {role}` nor health"
                )


def test_ports_match_the_cli_defaults_and_the_services():
    svcs = services()
    for path, deployment, container in workloads():
        role, ctx = parse(container["args"])
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert sorted(ports.values()) == sorted(ROLE_PORTS[role].values()), f"{path.name}: container ports {ports}"
        args = container["args"]
        for option, port in ROLE_PORTS[role].items():
            value = args[args.index(option) + 1]
            if option.startswith("--port") or option == "--grpc-port":
                assert int(value) == port, f"{path.name}: {option} {value}"
                assert args[args.index("--host") + 1] == "0.0.0.0", f"{path.name}: the edge must bind 0.0.0.0"
            else:
                assert value == f"tcp://0.0.0.0:{port}", f"{path.name}: {role} {option} {value} (bind 0.0.0.0:{port})"
        # every address it connects to is a Service of these manifests, at one of that Service's ports
        connects = [a for a in args if a.startswith("tcp://") and "0.0.0.0" not in a]
        connects += [e["value"] for e in container.get("env", []) if str(e.get("value", "")).startswith("tcp://")]
        for address in connects:
            host, port = urlparse(address).hostname, urlparse(address).port
            assert host in svcs, f"{path.name}: {address}: no Service {host}"
            assert port in {p["port"] for p in svcs[host]["spec"]["ports"]}, f"{path.name}: {address}: no such port"
        # the Services in front of it: selectors match the pod, target ports are its named ports
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for svc in svcs.values():
            if svc["spec"]["selector"].items() <= labels.items():
                for p in svc["spec"]["ports"]:
                    assert p["targetPort"] in ports and ports[p["targetPort"]] == p["port"], f"{svc['metadata']}"
    assert {s: sorted(p["port"] for p in svcs[s]["spec"]["ports"]) for s in svcs} == {
        "cluster-manager": sorted(ROLE_PORTS["manager"].values()),
        "cluster-broker": sorted(ROLE_PORTS["broker"].values()),
        "cluster-edge": sorted(ROLE_PORTS["edge"].values()),
    }


def test_probes_resources_and_keys():
    readme = (REPO_ROOT / "README.md").read_text()
    for path, deployment, container in workloads():
        role = container["args"][0]
        assert "readinessProbe" in container and "livenessProbe" in container, f"{path.name}: probes"
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys(), f"{path.name}: resource requests {requests}"
        if role == "edge":
            for kind in ("readinessProbe", "livenessProbe"):
                get = container[kind]["httpGet"]
                assert get["path"] in ("/v2/health/ready", "/v2/health/live")
                # the edge refuses Host names it does not know: the kubelet's (the pod's IP) among them
                assert {"name": "Host", "value": "localhost"} in get["httpHeaders"], f"{path.name}: {kind}"
        pod = deployment["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: secrets[m["name"]] for m in container["volumeMounts"] if m["name"] in secrets}
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        key_files = [env[n] for n in ("CLUSTER_KEY", "CLUSTER_HEALTH_KEY") if n in env]
        args = container["args"]
        key_files += [args[i + 1] for i, a in enumerate(args) if a in ("--token-file", "--admin-token-file")]
        assert env.get("CLUSTER_KEY"), f"{path.name}: the bus runs with keys (CLUSTER_KEY)"
        for key_file in key_files:
            folder, name = key_file.rsplit("/", 1)
            assert folder in mounts, f"{path.name}: {key_file} is not on a mounted Secret"
            secret = mounts[folder]
            assert re.search(rf"kubectl create secret generic {secret}\b[^\n]*\n?[^\n]*{re.escape(name)}", readme), (
                f"README: no `kubectl create secret generic {secret}` with {name}"
            )
        if role in ("broker", "agent"):  # the broker answers queries from client keys only: the probe has its own
            assert env.get("CLUSTER_HEALTH_KEY"), f"{path.name}: {role} probes need a client key"
        if role == "agent":
            ids = [e for e in container["env"] if e["name"] == "CLUSTER_AGENT_ID"]
            assert ids and ids[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "agent id = pod name"


def test_containerfile_runs_the_cli():
    text = (REPO_ROOT / "Containerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["cluster"\]$', text, re.M), "the entrypoint is the `cluster` command"
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and yaml.safe_load(cmd.group(1))[0] in CLI.commands
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", text, re.M) for p in line.split()}
    assert exposed == {p for ports in ROLE_PORTS.values() for p in ports.values()}, exposed
    torch_spec = re.search(r'^ARG TORCH_SPEC="(.*)"$', text, re.M).group(1)
    pins = [
        line.strip() for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch")
    ]
    assert torch_spec in pins, f"Containerfile's {torch_spec} is not constraints.txt's {pins}"
    assert "-c constraints.txt" in text


def test_kubernetes_validate_is_in_the_test_extra():
    assert "kubernetes-validate" in (REPO_ROOT / "setup.py").read_text()
