"""The cluster manifests, checked without a cluster and without Ray (issue #24).

`cluster/kuberay-rayservice.yaml` is validated against the RayService CRD's
openAPIV3Schema of KubeRay v1.7.0 (tests/data/, vendored verbatim), made as
strict as the API server's field validation: an unknown field is an error,
not silently pruned. The Kubernetes extensions are translated for
`jsonschema`: `x-kubernetes-preserve-unknown-fields` keeps an object open,
`x-kubernetes-list-type: set|map` becomes uniqueness of items|keys,
`nullable` admits null, int32/int64 formats are range-checked, and
`x-kubernetes-int-or-string` is the `anyOf` the CRD already carries. The
CRD's three CEL rules (`x-kubernetes-validations`, on `managedBy` and
`gcsFaultToleranceOptions.backend`, neither used here) are not evaluated;
`test_operator_side_rules` checks the operator's own validation rules
(ray-operator/controllers/ray/utils/validation.go) that the schema cannot.
The embedded serveConfigV2 is validated against Ray Serve's own schema.

The other tests hold the manifest to what issue #24 asks: pinned images,
probes that work with the image, /dev/shm, head sizing, a dashboard that is
not open, NetworkPolicies, GCS fault tolerance on Redis, two GPU replicas
at least with DIGLETT_DEVICE=cuda, and the Ingress and sessions on the CPU
workers.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "cluster" / "kuberay-rayservice.yaml"
SERVE_CLUSTER = ROOT / "cluster" / "serve-cluster.yaml"
RAY_CLUSTER = ROOT / "cluster" / "ray-cluster.yaml"
CRD = ROOT / "tests" / "data" / "kuberay-v1.7.0-ray.io_rayservices.yaml"

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVE_PORT = 8000
AGENT_PORT = 52365  # KubeRay's and Ray's default dashboard-agent-listen-port
DASHBOARD_PORT = 8265
GPU = "nvidia.com/gpu"


# ------------------------------------------------------------------ loading
def load_yaml(path: Path, all_docs: bool = False):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    text = path.read_text()
    if all_docs:
        return [d for d in yaml.load_all(text, Loader=loader) if d]
    return yaml.load(text, Loader=loader)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return load_yaml(MANIFEST, all_docs=True)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


@pytest.fixture(scope="module")
def svc(docs) -> dict:
    [rayservice] = of_kind(docs, "RayService")
    return rayservice


@pytest.fixture(scope="module")
def serve_cfg(svc) -> dict:
    return yaml.safe_load(svc["spec"]["serveConfigV2"])


def groups(svc: dict) -> dict[str, dict]:
    """Head and worker groups by name ("head" for the head group)."""
    cfg = svc["spec"]["rayClusterConfig"]
    out = {"head": cfg["headGroupSpec"]}
    out.update({g["groupName"]: g for g in cfg.get("workerGroupSpecs", [])})
    return out


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's RayContainerIndex


def is_gpu(group: dict) -> bool:
    res = ray_container(group).get("resources", {})
    return any(GPU in res.get(k, {}) for k in ("limits", "requests"))


def pod_labels(name: str, group: dict) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod: the template's plus its own."""
    labels = dict(group["template"].get("metadata", {}).get("labels", {}))
    labels.update(
        {
            "ray.io/is-ray-node": "yes",
            "ray.io/node-type": "head" if name == "head" else "worker",
            "ray.io/group": "headgroup" if name == "head" else name,
        }
    )
    return labels


def advertised(group: dict) -> dict[str, float]:
    """The custom resources a group's `ray start --resources` advertises;
    KubeRay takes the value shell-quoted: '"{\\"name\\": 1}"'."""
    raw = group.get("rayStartParams", {}).get("resources")
    if not raw:
        return {}
    return json.loads(raw.strip().strip("'").strip('"').replace('\\"', '"'))


def deployment(serve_cfg: dict, name: str) -> dict:
    [app] = serve_cfg["applications"]
    [dep] = [d for d in app["deployments"] if d["name"] == name]
    return dep


def app_env(serve_cfg: dict) -> dict:
    [app] = serve_cfg["applications"]
    return (app.get("runtime_env") or {}).get("env_vars") or {}


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
UNITS.update({"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12})


def quantity(q) -> float:
    """A Kubernetes quantity ("16Gi", "250m", 4) as a number."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m and (not m[2] or m[2] in UNITS), f"unparsed quantity {q!r}"
    return float(m[1]) * UNITS.get(m[2], 1)


# --------------------------------------------------------------- the schema
def _strict(node):
    """The CRD schema as the API server applies it, for `jsonschema`."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in ("enum", "required", "x-kubernetes-list-map-keys"):
            out[key] = value
        else:
            out[key] = _strict(value)
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # unknown field: an error
    if out.get("x-kubernetes-int-or-string"):
        assert "anyOf" in out, "int-or-string without its anyOf"
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: a set's items, a map's keys are unique."""
    if not isinstance(instance, list) or list_type == "atomic":
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:  # map
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [json.dumps([item.get(k) for k in names]) for item in instance]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        yield jsonschema.ValidationError(f"duplicate {list_type} entries {dupes}")


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)


@pytest.fixture(scope="module")
def crd_validator():
    crd = load_yaml(CRD)
    assert crd["spec"]["names"]["kind"] == "RayService"
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return K8sValidator(schema, format_checker=FORMATS)


def schema_errors(validator, obj) -> list[str]:
    return [
        "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validator.iter_errors(obj)
    ]


def test_every_document_is_a_kubernetes_object(docs):
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert d["metadata"].get("name"), d
    assert len(of_kind(docs, "RayService")) == 1


def test_rayservice_matches_the_kuberay_crd_schema(svc, crd_validator):
    assert svc["apiVersion"] == "ray.io/v1"
    assert schema_errors(crd_validator, svc) == []


def test_the_crd_schema_check_is_strict(svc, crd_validator):
    """The validator is not vacuous: a misspelt field, a wrong type, a
    duplicate container port and an out-of-range port are all caught."""
    bad = copy.deepcopy(svc)
    cfg = bad["spec"]["rayClusterConfig"]
    cfg["authOption"] = {"mode": "token"}
    cfg["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"containerPort": DASHBOARD_PORT, "name": "again"}
    )
    cfg["workerGroupSpecs"][0]["replicas"] = "two"
    cfg["workerGroupSpecs"][0]["minReplicas"] = 2**40
    errors = "\n".join(schema_errors(crd_validator, bad))
    assert re.search(r"'authOption'.* unexpected", errors)
    assert "duplicate map entries" in errors
    assert "'two' is not of type 'integer'" in errors
    assert "is not a 'int32'" in errors


def test_operator_side_rules(svc):
    """Rules the KubeRay operator enforces beyond the schema
    (utils/validation.go, v1.7.0), for the options this manifest uses."""
    cfg = svc["spec"]["rayClusterConfig"]
    head = cfg["headGroupSpec"]
    env = container_env(ray_container(head))
    if cfg.get("gcsFaultToleranceOptions"):
        annotations = svc["metadata"].get("annotations", {})
        assert "ray.io/ft-enabled" not in annotations
        assert "redis-password" not in head["rayStartParams"]
        assert "redis-username" not in head["rayStartParams"]
        assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"} & set(env)
    if (cfg.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(x) for x in cfg["rayVersion"].split("."))
        assert version >= (2, 52, 0), "Ray token auth needs Ray >= 2.52"
    for name, group in groups(svc).items():
        assert ray_container(group)["name"].startswith("ray-"), name
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# -------------------------------------------------------- the Serve config
def test_serve_config_is_a_valid_serve_config_and_the_cluster_one(svc, serve_cfg):
    from ray.serve.schema import ServeDeploySchema  # pydantic only; no Ray start

    ServeDeploySchema.model_validate(serve_cfg)
    assert svc["spec"]["serveConfigV2"] == SERVE_CLUSTER.read_text()  # verbatim


def test_kuberay_version_matches_the_image(svc):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [ray] = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert ray.endswith("==" + svc["spec"]["rayClusterConfig"]["rayVersion"])


# ------------------------------------------------------------- the rules
def all_containers(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] == "RayService":
            for name, group in groups(d).items():
                out += [(name, c) for c in group["template"]["spec"]["containers"]]
        elif d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            spec = d["spec"]["template"]["spec"]
            out += [(d["metadata"]["name"], c) for c in spec["containers"]]
    return out


def test_images_are_pinned(docs, svc):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    containers = all_containers(docs)
    assert containers
    for where, c in containers:
        image = c["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "")
        assert "@sha256:" in image or (tag and "/" not in tag), f"{where}: {image}"
        assert tag != "latest", f"{where}: {image}"
        if name.endswith("/diglett"):
            # The Dockerfile's image, tagged with this release and variant.
            want = {version, f"{version}-cpu", f"{version}-cuda"}
            assert tag in want, f"{where}: {image} is not one of {sorted(want)}"
    for name, group in groups(svc).items():
        if is_gpu(group):
            assert not ray_container(group)["image"].endswith("-cpu"), name


def test_pods_run_as_a_numeric_non_root_user(svc):
    """The image's USER is a name, which runAsNonRoot alone cannot verify:
    the kubelet would refuse to start the container."""
    for name, group in groups(svc).items():
        ctx = group["template"]["spec"].get("securityContext", {})
        if ctx.get("runAsNonRoot"):
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0


def probes(container: dict) -> dict[str, dict]:
    return {
        kind: container[kind]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
        if kind in container
    }


def test_probes_are_explicit_and_need_nothing_the_image_lacks(svc):
    """KubeRay's default probes `wget` (a RayService worker's readiness even
    for Ray >= 2.53); the image (python:3.11-slim) has no wget. Each Ray
    container brings its own, and liveness never asks the Diglett app,
    whose /healthz is 503 while the embedding tier is down or loading."""
    for name, group in groups(svc).items():
        c = ray_container(group)
        agent = int(group["rayStartParams"].get("dashboard-agent-listen-port", 52365))
        found = probes(c)
        assert {"livenessProbe", "readinessProbe"} <= found.keys(), name
        for kind, probe in found.items():
            handlers = {"exec", "httpGet", "tcpSocket", "grpc"} & probe.keys()
            assert len(handlers) == 1, (name, kind)
            if "exec" in probe:
                cmd = " ".join(probe["exec"]["command"])
                assert not re.search(r"\b(wget|curl)\b", cmd), (name, kind, cmd)
            if "httpGet" in probe:
                get = probe["httpGet"]
                port, path = get["port"], get["path"]
                assert port in (agent, SERVE_PORT), (name, kind, port)
                if port == agent:
                    assert path in ("/api/healthz", "/api/local_raylet_healthz")
                else:  # the Serve port: Serve's proxy, never the app
                    assert path == "/-/healthz", (name, kind, path)
                    assert kind != "livenessProbe", (name, "liveness on Serve")


def serving_groups(docs: list[dict], svc: dict) -> list[str]:
    """The worker groups the client Service sends traffic to."""
    services = [
        s
        for s in of_kind(docs, "Service")
        if any(p["port"] == SERVE_PORT for p in s["spec"]["ports"])
    ]
    assert len(services) == 1, f"want one Service for port {SERVE_PORT}"
    [service] = services
    selector = {"matchLabels": service["spec"]["selector"]}
    return [n for n, g in groups(svc).items() if selects(selector, pod_labels(n, g))]


def test_serving_pods_are_ready_only_with_a_serve_proxy(docs, svc):
    names = serving_groups(docs, svc)
    assert names
    for name in names:
        ready = ray_container(groups(svc)[name])["readinessProbe"]
        assert ready.get("httpGet", {}).get("path") == "/-/healthz", name
        assert ready["httpGet"]["port"] == SERVE_PORT


def test_dev_shm_is_memory_backed_and_bounded(svc):
    """Ray's object store lives in /dev/shm (a container's own is 64 MiB);
    memory-backed, it counts against the memory limit, so it is capped, and
    the object store fits inside it (else Ray falls back to disk)."""
    for name, group in groups(svc).items():
        spec = group["template"]["spec"]
        c = ray_container(group)
        [mount] = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        [vol] = [v for v in spec.get("volumes", []) if v["name"] == mount["name"]]
        assert vol["emptyDir"]["medium"] == "Memory", name
        size = quantity(vol["emptyDir"]["sizeLimit"])
        assert size < quantity(c["resources"]["limits"]["memory"]), name
        store = group["rayStartParams"].get("object-store-memory")
        assert store and int(store) <= size, name


def test_head_is_sized_for_gcs_serve_controller_and_dashboard(svc):
    head = groups(svc)["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no sessions, no Ingress
    res = ray_container(head)["resources"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS
    assert quantity(res["limits"]["cpu"]) >= 4
    assert quantity(res["limits"]["memory"]) >= quantity("16Gi")


def test_unused_unhealthy_thresholds_are_gone(svc):
    """Deprecated and ignored since KubeRay 1.1 (kuberay#1685): they only
    suggested a protection that does not exist."""
    assert "serviceUnhealthySecondThreshold" not in svc["spec"]
    assert "deploymentUnhealthySecondThreshold" not in svc["spec"]


def test_no_pod_gets_service_link_variables(docs, svc):
    """Service links would put DIGLETT_PORT=tcp://... in every process's
    environment if the namespace had a Service named `diglett`."""
    from diglett.settings import Settings

    with pytest.raises(ValueError, match="DIGLETT_PORT"):
        Settings.from_env({"DIGLETT_PORT": "tcp://10.0.0.1:8000"})
    for name, group in groups(svc).items():
        assert group["template"]["spec"].get("enableServiceLinks") is False, name


# ------------------------------------------------------ network and auth
def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector applied to `labels`."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def all_pods(docs: list[dict], svc: dict) -> dict[str, dict[str, str]]:
    """Pod labels by name: the Ray groups and the workloads beside them."""
    pods = {n: pod_labels(n, g) for n, g in groups(svc).items()}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            pods[d["metadata"]["name"]] = d["spec"]["template"]["metadata"]["labels"]
    return pods


def admitting_rules(docs: list[dict], labels: dict, port: int) -> list[dict]:
    """The ingress rules of the policies selecting a pod that admit `port`."""
    rules = []
    for pol in of_kind(docs, "NetworkPolicy"):
        spec = pol["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
            continue
        if not selects(spec["podSelector"], labels):
            continue
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if not ports or any(p.get("port") == port for p in ports):
                rules.append(rule)
    return rules


def test_network_policies_admit_only_what_is_needed(docs, svc):
    pods = all_pods(docs, svc)
    ray_pods = {n: pod_labels(n, g) for n, g in groups(svc).items()}
    serving = set(serving_groups(docs, svc))
    assert of_kind(docs, "NetworkPolicy"), "no NetworkPolicy"
    for name, labels in pods.items():
        # Each pod is under some policy, so what none admits is refused.
        assert any(
            selects(p["spec"]["podSelector"], labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            for p in of_kind(docs, "NetworkPolicy")
        ), f"{name}: no NetworkPolicy selects it"
        for port in (6379, DASHBOARD_PORT, SERVE_PORT, 8080, 10001, AGENT_PORT):
            world = [
                r for r in admitting_rules(docs, labels, port) if not r.get("from")
            ]
            if world:  # from anywhere: only the Serve port of the serving pods
                assert (name, port) in {(s, SERVE_PORT) for s in serving}, (name, port)
    for name, labels in ray_pods.items():
        # Ray's own ports (e.g. a worker's 10002) from the other Ray pods.
        peers = [
            peer
            for r in admitting_rules(docs, labels, 10002)
            for peer in r.get("from", [])
        ]
        for other in ray_pods.values():
            assert any(
                "podSelector" in p
                and "namespaceSelector" not in p
                and selects(p["podSelector"], other)
                for p in peers
            ), name


def test_dashboard_is_on_localhost_or_behind_auth(docs, svc):
    """The dashboard takes job submissions: code execution. Under a
    RayService the operator deploys serveConfigV2 through it (the head
    Service's port 8265), so it cannot listen on 127.0.0.1 there; then Ray
    token auth must be on and only the operator's pods may reach it."""
    cfg = svc["spec"]["rayClusterConfig"]
    head = groups(svc)["head"]
    host = head["rayStartParams"].get("dashboard-host", "0.0.0.0")  # KubeRay's
    if host in LOOPBACK:
        return
    assert (cfg.get("authOptions") or {}).get("mode") == "token"
    rules = admitting_rules(docs, pod_labels("head", head), DASHBOARD_PORT)
    assert rules, "no policy admits the operator to the dashboard"
    for rule in rules:
        assert rule.get("from"), "dashboard open to every source"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert "podSelector" in peer, peer  # pods, not whole namespaces
            sel = peer["podSelector"]
            operator = {"app.kubernetes.io/name": "kuberay-operator"}
            ray_pod = "ray.io/is-ray-node" in (sel.get("matchLabels") or {})
            assert ray_pod or selects(sel, operator), peer


def test_ray_cluster_launcher_keeps_the_dashboard_local():
    head = " ".join(load_yaml(RAY_CLUSTER)["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_gcs_fault_tolerance_on_redis(docs, svc):
    """Without GCS FT a head restart loses the cluster's state and with it
    every SessionActor, so every resumable session."""
    opts = svc["spec"]["rayClusterConfig"].get("gcsFaultToleranceOptions")
    assert opts, "no gcsFaultToleranceOptions"
    assert opts.get("backend", "redis") == "redis"
    address = opts["redisAddress"]
    assert address
    password = opts["redisPassword"]
    assert "value" not in password, "Redis password in the manifest"
    ref = password["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    host = re.sub(r"^rediss?://", "", address).split(":")[0]
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    if host not in services:  # an external Redis: fine, nothing more to check
        return
    # The Redis in this manifest: behind that Service, password from the
    # same Secret, reachable from the head (the GCS) only.
    sel = {"matchLabels": services[host]["spec"]["selector"]}
    [redis] = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and selects(sel, d["spec"]["template"]["metadata"]["labels"])
    ]
    [c] = redis["spec"]["template"]["spec"]["containers"]
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert ref in refs
    assert "--requirepass" in " ".join(c.get("command", []) + c.get("args", []))
    assert "appendonly yes" in " ".join(c.get("args", [])), "Redis without AOF"
    labels = redis["spec"]["template"]["metadata"]["labels"]
    rules = admitting_rules(docs, labels, 6379)
    assert rules
    ray_pods = {n: pod_labels(n, g) for n, g in groups(svc).items()}
    for rule in rules:
        assert rule.get("from"), "Redis open to every source"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, peer
            allowed = {
                n for n, lab in ray_pods.items() if selects(peer["podSelector"], lab)
            }
            assert allowed == {"head"}, allowed


def test_session_port_needs_the_api_token(docs, svc):
    """Port 8000 of the serving pods is open to clients; the Ingress
    replicas there read DIGLETT_API_TOKEN from the pod (a Secret)."""
    for name in serving_groups(docs, svc):
        env = container_env(ray_container(groups(svc)[name]))
        assert "secretKeyRef" in env["DIGLETT_API_TOKEN"]["valueFrom"], name


# ------------------------------------------------------------- placement
def test_embedding_tier_has_two_gpu_replicas_on_cuda(svc, serve_cfg):
    emb = deployment(serve_cfg, "EmbeddingDeployment")
    auto = emb["autoscaling_config"]
    assert auto["min_replicas"] >= 2
    opts = emb["ray_actor_options"]
    assert opts["num_gpus"] >= 1
    env = {**app_env(serve_cfg), **opts["runtime_env"]["env_vars"]}
    assert env["DIGLETT_DEVICE"] == "cuda"  # no silent CPU fallback
    gpu_groups = [g for g in groups(svc).values() if is_gpu(g)]
    assert gpu_groups
    wanted = set(opts.get("resources", {}))
    hosts = [g for g in groups(svc).values() if wanted <= advertised(g).keys()]
    assert hosts and all(is_gpu(g) for g in hosts)
    assert sum(g["minReplicas"] for g in hosts) >= auto["min_replicas"]
    assert sum(g["maxReplicas"] for g in hosts) >= auto["max_replicas"]
    for g in gpu_groups:
        env = container_env(ray_container(g))
        assert env["DIGLETT_DEVICE"]["value"] == "cuda"


def test_ingress_and_sessions_are_pinned_to_cpu_workers(docs, svc, serve_cfg):
    all_groups = groups(svc)
    ingress = deployment(serve_cfg, "Ingress")["ray_actor_options"]
    wanted = {
        "Ingress": set(ingress.get("resources") or {}),
        "SessionActor": {app_env(serve_cfg).get("DIGLETT_SESSION_RESOURCE", "")} - {""},
    }
    for who, resources in wanted.items():
        assert resources, f"{who} asks for no custom resource: it may land anywhere"
        hosts = [n for n, g in all_groups.items() if resources <= advertised(g).keys()]
        assert hosts, f"no group advertises {resources}"
        for name in hosts:
            assert name != "head" and not is_gpu(all_groups[name]), (who, name)
    for name in serving_groups(docs, svc):
        group = all_groups[name]
        assert name != "head" and not is_gpu(group)
        assert wanted["Ingress"] <= advertised(group).keys()
        spec = group["template"]["spec"]
        assert not any(t.get("key") == GPU for t in spec.get("tolerations", []))
        # And off GPU nodes in Kubernetes as well (GPU feature discovery's label).
        terms = spec["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert all(
            {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}
            in t["matchExpressions"]
            for t in terms
        )


def test_ray_cluster_launcher_config_can_place_the_cluster_serve_config():
    """cluster/serve-cluster.yaml also runs on cluster/ray-cluster.yaml."""
    cluster = load_yaml(RAY_CLUSTER)
    serve_cfg = load_yaml(SERVE_CLUSTER)
    assert not cluster["docker"]["image"].endswith(":latest")
    types = cluster["available_node_types"]
    embed_types = [t for t in types.values() if "diglett_embed" in t["resources"]]
    ingress = set(deployment(serve_cfg, "Ingress")["ray_actor_options"]["resources"])
    hosts = [t for t in types.values() if ingress <= t["resources"].keys()]
    assert hosts and not any(t in embed_types for t in hosts)
    emb = deployment(serve_cfg, "EmbeddingDeployment")["autoscaling_config"]
    assert sum(t["min_workers"] for t in embed_types) >= emb["min_replicas"]
