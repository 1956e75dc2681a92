"""The Kubernetes manifests (deploy/kubernetes/) and the image (Containerfile), checked offline and in-process:

- every manifest is valid against the Kubernetes API schemas (kubernetes-validate ships them; strict: an unknown
  field is an error), for the newest Kubernetes it knows and an older one still in use;
- every `cluster ROLE --option value` a container runs, and every `cluster health ...` probe, parses with the CLI's
  own typer app (a renamed or misspelt option fails here, not in a crash-looping pod);
- every CLUSTER_* variable a container sets is one the CLI or cluster/config.py reads;
- the ports: the containers' ports, the addresses they bind (0.0.0.0) and the Services' ports are cluster/config.py's
  defaults, the addresses they connect to name a Service and one of its ports, the Containerfile EXPOSEs them;
- every pod has readiness and liveness probes and resource requests; key files lie on mounted Secrets, and the
  README says how to make each Secret;
- the brokers are a StatefulSet behind a headless Service and every agent, edge and probe is given each broker pod;
  they survive a node (spread, a disruption budget, tolerations of 10-30 s, as the manager's), serve Prometheus
  metrics, and KEDA scales the agents on them (the ScaledObject and the PodMonitor checked against the CRDs' fields);
- every pod passes Pod Security "restricted"; agents and the edge have disruption budgets;
- the kustomization names the image once (built with `kubectl kustomize` where kubectl is installed);
- the edge admits its Service's names in its namespace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import typer
import yaml

from cluster import config, settings
from cluster.cli import app
from tests.harness import REPO_ROOT

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(KUBERNETES.rglob("kustomization.yaml"))
CLI = typer.main.get_command(app)
WORKLOADS = ("Deployment", "StatefulSet")
CUSTOM_RESOURCES = ("keda.sh/", "monitoring.coreos.com/")  # no schemas in kubernetes-validate: checked below
METRICS_PORT = 9100  # each broker's Prometheus metrics (CLUSTER_METRICS_PORT), as the manifests set it
# Variables the manifests set before the code that reads them is merged (issue 20: the brokers' metrics endpoint,
# their reports to the manager's heartbeat address):
# allowed while the CLI does not know them; once it does, the usual check applies. Empty this after the merge.
PENDING_VARIABLES: dict[str, set[str]] = {}  # variables a manifest sets before the code reads them (none now)


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
    """(file, Deployment or StatefulSet, container) for every container of every workload."""
    return [
        (path, doc, c)
        for path, doc in documents()
        if doc["kind"] in WORKLOADS
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]


def kind(name: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in documents() if doc["kind"] == name]


def role_of(container: dict) -> str:
    return container["args"][0]


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def broker_set() -> dict:
    (_, brokers), *more = [(p, d) for p, d in kind("StatefulSet") if d["metadata"]["name"] == "cluster-broker"]
    assert not more
    return brokers


def broker_pods() -> list[str]:
    """Each broker pod's DNS name within the namespace: cluster-broker-N.cluster-broker."""
    brokers = broker_set()
    return [
        f"{brokers['metadata']['name']}-{i}.{brokers['spec']['serviceName']}"
        for i in range(brokers["spec"]["replicas"])
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
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolume", "PersistentVolumeClaim"} <= kinds, kinds
    assert {"PodDisruptionBudget", "ScaledObject"} <= kinds, kinds


def test_manifests_are_valid_kubernetes_offline():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the `test` extra)")
    versions = [kv.latest_version()]
    if "1.28.0" != versions[0]:
        versions.append("1.28.0")  # an older Kubernetes still in use: nothing here may need newer fields
    for path, doc in documents():
        if doc["apiVersion"].startswith(CUSTOM_RESOURCES):
            continue
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
            if env["name"] in PENDING_VARIABLES.get(role, ()) and env["name"] not in known:
                continue
            if env["name"].startswith("CLUSTER_"):
                assert env["name"] in known, (
                    f"{path.name}: {env['name']} is read by neither `cluster {role}` nor health"
                )


def test_ports_match_the_cli_defaults_and_the_services():
    svcs = services()
    for path, deployment, container in workloads():
        role, ctx = parse(container["args"])
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        expected = sorted([*ROLE_PORTS[role].values(), *([METRICS_PORT] if role == "broker" else [])])
        assert sorted(ports.values()) == expected, f"{path.name}: container ports {ports}"
        args = container["args"]
        for option, port in ROLE_PORTS[role].items():
            value = args[args.index(option) + 1]
            if option.startswith("--port") or option == "--grpc-port":
                assert int(value) == port, f"{path.name}: {option} {value}"
                assert args[args.index("--host") + 1] == "0.0.0.0", f"{path.name}: the edge must bind 0.0.0.0"
            else:
                assert value == f"tcp://0.0.0.0:{port}", f"{path.name}: {role} {option} {value} (bind 0.0.0.0:{port})"
        # every address it connects to is a Service of these manifests (or a pod of a StatefulSet behind a headless
        # one), at one of that Service's ports
        connects = [a for a in args if a.startswith("tcp://") and "0.0.0.0" not in a]
        connects += [e["value"] for e in container.get("env", []) if str(e.get("value", "")).startswith("tcp://")]
        for address in (one for several in connects for one in config.address_list(several)):
            host, port = urlparse(address).hostname, urlparse(address).port
            if host not in svcs and host in broker_pods():
                host = host.split(".", 1)[1]
                assert svcs[host]["spec"].get("clusterIP") == "None", f"{address}: {host} is not headless"
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
        "cluster-broker": sorted([*ROLE_PORTS["broker"].values(), METRICS_PORT]),
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


# ---- several brokers, and surviving a node --------------------------------------------------------------------------


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def test_brokers_are_a_statefulset_of_two_behind_a_headless_service():
    brokers = broker_set()
    spec = brokers["spec"]
    assert spec["replicas"] == 2, "two brokers: either serves while the other is lost"
    service = services()[spec["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "headless: a ClusterIP would pin a connection to one broker pod"
    labels = spec["template"]["metadata"]["labels"]
    assert _matches({"matchLabels": service["spec"]["selector"]}, labels)
    assert spec["updateStrategy"]["type"] == "RollingUpdate" and spec.get("podManagementPolicy") == "Parallel"
    container = spec["template"]["spec"]["containers"][0]
    name = next(e for e in container["env"] if e["name"] == "CLUSTER_BROKER_NAME")
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "each broker is named after its pod"
    assert not [d for _, d in kind("Deployment") if d["metadata"]["name"] == "cluster-broker"], "no broker Deployment"


def test_every_agent_edge_and_probe_is_given_every_broker():
    """Agents register with each broker pod (5556) and ask each for their probes (5555); the edge sends to each."""
    pods = broker_pods()
    wanted = {"agents": [f"tcp://{pod}:5556" for pod in pods], "clients": [f"tcp://{pod}:5555" for pod in pods]}
    seen = 0
    for path, _, container in workloads():
        role, args, env = role_of(container), container["args"], env_of(container)
        lists = {}
        if role == "agent":
            lists = {"agents": env["CLUSTER_BROKER_AGENTS"], "clients": env["CLUSTER_BROKER_CLIENTS"]}
        elif role == "edge":
            lists = {"clients": args[args.index("--broker") + 1]}
        for which, value in lists.items():
            assert config.address_list(value) == wanted[which], f"{path.name}: {role} {which}: {value}"
            seen += 1
    assert seen >= 5, "the agents (CPU and GPU: theirs and their probes') and the edge"


def _tolerations(doc: dict) -> dict[str, dict]:
    return {t["key"]: t for t in doc["spec"]["template"]["spec"].get("tolerations", []) if "key" in t}


def test_broker_and_manager_leave_a_lost_node_within_30_s():
    """The default toleration of an unreachable or not-ready node is 300 s: every request would wait that long for
    the manager, and a broker's place would stay empty."""
    for name in ("cluster-broker", "cluster-manager"):
        (doc,) = [d for _, d in documents() if d["kind"] in WORKLOADS and d["metadata"]["name"] == name]
        tolerations = _tolerations(doc)
        for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"):
            t = tolerations.get(key)
            assert t and t["effect"] == "NoExecute" and t["operator"] == "Exists", f"{name}: {key}: {t}"
            assert 10 <= t["tolerationSeconds"] <= 30, f"{name}: {key} tolerated {t['tolerationSeconds']} s"


def test_brokers_spread_over_nodes_and_every_role_has_a_disruption_budget():
    spread = broker_set()["spec"]["template"]["spec"]["topologySpreadConstraints"]
    labels = broker_set()["spec"]["template"]["metadata"]["labels"]
    assert any(
        c["topologyKey"] == "kubernetes.io/hostname"
        and c["whenUnsatisfiable"] == "DoNotSchedule"
        and c["maxSkew"] == 1
        and _matches(c["labelSelector"], labels)
        for c in spread
    ), spread
    budgets = [d for _, d in kind("PodDisruptionBudget")]
    for path, workload, container in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if _matches(b["spec"]["selector"], labels)]
        if role_of(container) == "manager" or workload["metadata"]["name"] == "cluster-agent-gpu":
            assert not mine, f"{path.name}: one manager (Recreate); GPU agents are an optional extra"
            continue
        assert len(mine) == 1, f"{path.name}: {workload['metadata']['name']} has {len(mine)} disruption budgets"
        if role_of(container) == "broker":
            assert mine[0]["spec"].get("minAvailable") == 1, mine[0]["spec"]
        else:
            assert mine[0]["spec"].get("maxUnavailable") == 1, mine[0]["spec"]
    every = [w["spec"]["template"]["metadata"]["labels"] for _, w, _ in workloads()]
    for budget in budgets:  # and none selects nothing
        assert any(_matches(budget["spec"]["selector"], labels) for labels in every), budget["metadata"]


# volume types Pod Security "restricted" allows
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"}
RESTRICTED_VOLUMES |= {"secret"}


def test_every_pod_meets_pod_security_restricted():
    """A namespace that enforces Pod Security "restricted" admits these pods (its checks, as the admission plugin
    makes them)."""
    for path, workload, _ in workloads():
        pod = workload["spec"]["template"]["spec"]
        what = f"{path.name}: {workload['metadata']['name']}"
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 1) != 0, what
        assert not {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in pod.items() if v}, what
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{what}: volume {volume}"
        for c in pod["containers"] + pod.get("initContainers", []):
            own = c.get("securityContext", {})
            seccomp = own.get("seccompProfile") or security.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, f"{what}: {c['name']}: seccompProfile {seccomp}"
            assert own.get("allowPrivilegeEscalation") is False, f"{what}: {c['name']}"
            assert own.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: {c['name']}"
            assert set(own.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, f"{what}: {c['name']}"
            assert not own.get("privileged") and own.get("runAsUser", 1) != 0, f"{what}: {c['name']}"
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{what}: {c['name']}"


# ---- metrics and autoscaling ----------------------------------------------------------------------------------------


def test_every_broker_serves_prometheus_metrics():
    template = broker_set()["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert env_of(container)["CLUSTER_METRICS_PORT"] == str(METRICS_PORT)
    assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(METRICS_PORT)
    (monitor,) = [d for _, d in kind("PodMonitor")]
    assert _matches(monitor["spec"]["selector"], template["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


# ScaledObject fields (KEDA v2's CRD, keda.sh/v1alpha1) and a prometheus trigger's metadata: an unknown one is a typo
SCALED_OBJECT_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
TRIGGER_FIELDS = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
PROMETHEUS_METADATA = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "authModes",
}


def test_keda_scales_the_agents_on_queue_depth_per_agent():
    (scaled,) = [d for _, d in kind("ScaledObject")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_FIELDS, set(spec) - SCALED_OBJECT_FIELDS
    target = spec["scaleTargetRef"]
    (agents,) = [d for _, d in kind(target.get("kind", "Deployment")) if d["metadata"]["name"] == target["name"]]
    container = agents["spec"]["template"]["spec"]["containers"][0]
    assert role_of(container) == "agent" and target.get("apiVersion", "apps/v1") == agents["apiVersion"]
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "never fewer than 2 agents"
    (trigger,) = spec["triggers"]
    assert set(trigger) <= TRIGGER_FIELDS and trigger["type"] == "prometheus", trigger
    assert trigger.get("metricType", "AverageValue") == "AverageValue", "the threshold is per agent"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_METADATA, set(metadata) - PROMETHEUS_METADATA
    assert all(isinstance(v, str) for v in metadata.values()), f"KEDA's metadata values are strings: {metadata}"
    assert urlparse(metadata["serverAddress"]).scheme in ("http", "https")
    query = metadata["query"]
    assert re.search(r"\bsum\(\s*cluster_broker_queue_depth\b", query), f"the queue summed over brokers: {query}"
    assert query.count("(") == query.count(")"), query
    args = container["args"]
    capacity = int(args[args.index("--capacity") + 1])
    assert 0 < float(metadata["threshold"]) <= capacity, "per agent: at most its slots"
    defined = " ".join(p.read_text() for p in (REPO_ROOT / "cluster").rglob("*.py"))
    if "cluster_broker_" in defined:  # the brokers' metrics are merged (issue 20): the query names real ones
        for metric in set(re.findall(r"\bcluster_broker_\w+", query)):
            assert metric.removeprefix("cluster_broker_") in defined, f"{metric}: no broker metric of that name"


# ---- the kustomization ----------------------------------------------------------------------------------------------


def _images(docs) -> list[str]:
    images = []
    for doc in docs:
        if doc and doc.get("kind") in WORKLOADS:
            pod = doc["spec"]["template"]["spec"]
            images += [c["image"] for c in pod["containers"] + pod.get("initContainers", [])]
    return images


def test_the_kustomizations_name_each_image_once():
    """Each kustomization lists existing files, covers every workload of its folder, and has exactly one `images`
    entry for each image name its containers use (so one edit there changes a role's pods), every entry used; by
    default the entries all give the one full image (build one image, or one per role: README, Install by role)."""
    found = [p.relative_to(KUBERNETES).as_posix() for p in KUSTOMIZATIONS]
    assert found == ["gpu/kustomization.yaml", "kustomization.yaml"], found
    for kustomization in KUSTOMIZATIONS:
        k = yaml.safe_load(kustomization.read_text())
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
        folder = kustomization.parent
        resources = [folder / r for r in k["resources"]]
        assert all(r.is_file() for r in resources), k["resources"]
        workload_files = {
            p
            for p in folder.glob("*.yaml")
            if p.name != "kustomization.yaml" and _images(yaml.safe_load_all(p.read_text()))
        }
        assert workload_files <= set(resources), f"{kustomization}: leaves out {workload_files - set(resources)}"
        entries = [image["name"] for image in k["images"]]
        assert len(entries) == len(set(entries)), f"{kustomization}: an image named twice: {entries}"
        used = {name.rsplit(":", 1)[0] for r in resources for name in _images(yaml.safe_load_all(r.read_text()))}
        assert used == set(entries), f"{kustomization}: images {sorted(used)}, entries {entries}"
        assert len({(image["newName"], image["newTag"]) for image in k["images"]}) == 1, k["images"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
def test_kustomize_builds_and_the_entries_rename_every_image(tmp_path):
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    k = yaml.safe_load((copy / "kustomization.yaml").read_text())
    k["images"] = [{**image, "newName": "registry.example.com/serving", "newTag": "9.9.9"} for image in k["images"]]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(k))
    built = subprocess.run(["kubectl", "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    images = _images(docs)
    assert len(images) == 4 and set(images) == {"registry.example.com/serving:9.9.9"}, images
    expected = sum(len([d for d in yaml.safe_load_all((KUBERNETES / r).read_text()) if d]) for r in k["resources"])
    assert len(docs) == expected, f"kustomize built {len(docs)} objects of {expected}"
    # one role's slim image: only that role's pods change
    k["images"] = [
        {**image, "newName": "registry.example.com/serving-edge"} if image["name"].endswith("-edge") else image
        for image in k["images"]
    ]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(k))
    built = subprocess.run(["kubectl", "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    by_workload = {d["metadata"]["name"]: _images([d]) for d in yaml.safe_load_all(built.stdout) if d and _images([d])}
    edge = {name for name, images in by_workload.items() if images == ["registry.example.com/serving-edge:9.9.9"]}
    assert edge == {"cluster-edge"}, by_workload


# ---- the edge's names, the share's owner ----------------------------------------------------------------------------


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args (of variables defined in the container's env)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_the_edge_admits_its_service_names_in_its_namespace():
    from edge.security import EdgeSecurity

    (path, _, container), *_ = [w for w in workloads() if role_of(w[2]) == "edge"]
    refs = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert refs.get("POD_NAMESPACE") == "metadata.namespace", refs
    args = [_expand(a, {"POD_NAMESPACE": "prod"}) for a in container["args"]]
    assert not any("$(" in a for a in args), f"{path.name}: a variable Kubernetes would not expand: {args}"
    hosts = [args[i + 1] for i, a in enumerate(args) if a == "--allowed-host"]
    security = EdgeSecurity(allowed_hosts=hosts)
    for host in ("cluster-edge", "cluster-edge.prod", "cluster-edge.prod.svc", "cluster-edge.prod.svc:8000"):
        assert security.host_allowed(host), f"{host} refused by {hosts}"
    assert security.host_allowed("cluster-edge.prod.svc.cluster.local:8001")
    for host in ("cluster-edge.other", "evil.example.com", "cluster-edge.prod.evil.example.com"):
        assert not security.host_allowed(host), f"{host} admitted by {hosts}"


def test_the_readme_says_how_the_share_gets_the_pods_owner():
    """The manager (uid 10001) writes to the NFS share; an initContainer that chowns as root is refused by Pod Security
    "restricted", so the export is owned by 10001 on the NFS server: the README says how."""
    readme = (REPO_ROOT / "README.md").read_text()
    uid = {c["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for _, c, _ in workloads()}
    assert uid == {10001}, uid
    assert "chown -R 10001:10001" in readme and "anonuid=10001" in readme, "README: the share's owner for the pods"


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
    assert "PIP_CONSTRAINT=/src/constraints.lock" in text  # every package at the lock's version


def test_kubernetes_validate_is_in_the_test_extra():
    assert "kubernetes-validate" in (REPO_ROOT / "cluster" / "dependencies.py").read_text()
