"""Operator-experience checks of deploy/ and the operator docs, used by check_deploy.py (which
owns the report: every finding goes through its `fail`).

What an operator following docs/DEPLOYMENT.md and docs/OPERATIONS.md relies on, kept true here:
image names set in one place and used by the docs, the GPU build and its runtime in step (CUDA
version, compute capability, node affinity, the host's library path), scale-from-zero wiring,
stop budgets, drainable PodDisruptionBudgets, every placeholder in the review list, every node
scraped, alerts with runbooks, dashboards and rules that use only metrics the nodes export, and a
walkthrough whose steps run in order (namespaces, PVCs and variables exist before use, every file
it names exists, every environment variable the binaries read is documented).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import check_deploy as cd

DOCS = cd.ROOT / "docs"
DEPLOYMENT_MD = DOCS / "DEPLOYMENT.md"
OPERATIONS_MD = DOCS / "OPERATIONS.md"
MONITORING = cd.K8S / "monitoring"
BASE_KUSTOMIZATION = cd.K8S / "base" / "kustomization.yaml"
DOCKERFILE_CUDA = cd.DEPLOY / "container" / "Dockerfile.cuda"
CUDA_SCRIPT = cd.DEPLOY / "tools" / "cuda-from-pypi.sh"
COORDINATOR_APP = cd.ROOT / "coordinator" / "src" / "app.rs"
# The runtime's certificate expiry gauge (node-runtime, every node's /metrics in mtls mode).
CERT_EXPIRY_METRIC = "edgespec_tls_cert_expiry_timestamp_seconds"
# Oldest driver (major) that runs each CUDA major's PTX (13.0: driver 580).
MIN_DRIVER = {12: 525, 13: 580}
# GPU feature discovery labels the verify pods' node affinity must pin.
GFD_MAJOR = "nvidia.com/gpu.compute.major"
GFD_MINOR = "nvidia.com/gpu.compute.minor"
GFD_DRIVER = "nvidia.com/cuda.driver.major"
# Alerts the issue asks for (docs/OPERATIONS.md has one runbook section per alert).
REQUIRED_ALERTS = {
    "EdgespecNoVerifyCapacity", "EdgespecAcceptanceCollapse", "EdgespecLinkRttSpike",
    "EdgespecCertificateExpiringSoon", "EdgespecResyncStorm",
}
# What an operator of this system watches: (figure, metrics one panel must read together).
REQUIRED_FIGURES = [
    ("tokens/s per site", ["edgespec_draft_emitted_tokens_total"], r"by \(site"),
    ("acceptance per draft node", ["edgespec_draft_accepted_tokens_total",
                                   "edgespec_draft_drafted_tokens_total"], r"by \([^)]*instance"),
    ("mean γ per draft node", ["edgespec_draft_drafted_tokens_total",
                               "edgespec_draft_rounds_total"], r"by \([^)]*instance"),
    ("round trip per draft node", ["edgespec_draft_round_trip_seconds_bucket"], r"instance"),
    ("target forwards per committed token", ["edgespec_draft_rounds_total",
                                             "edgespec_draft_emitted_tokens_total"], None),
    ("verify queue delay", ["edgespec_coordinator_queue_delay_seconds_bucket"], None),
    ("KV use", ["edgespec_coordinator_pool_sessions", "edgespec_verify_evictions_total"], None),
    ("resyncs and failovers", ["edgespec_draft_resyncs_total",
                               "edgespec_coordinator_verify_failures_total"], None),
    ("cloud demand vs replicas", ["edgespec_coordinator_cloud_demand",
                                  "edgespec_coordinator_pool_verifiers_up"], r'pool="cloud"'),
    ("certificate expiry", [CERT_EXPIRY_METRIC], None),
]
# Every node role's metrics prefix: each must be scraped and on the dashboard.
ROLE_PREFIXES = {"draft node": "edgespec_draft_", "verify node": "edgespec_verify_",
                 "coordinator": "edgespec_coordinator_", "TLS (every node)": "edgespec_tls_"}
# Environment variables every program reads that are nobody's business to document.
GENERIC_ENV = {"HOME", "PATH", "TMPDIR", "PYTHONPATH", "OUT_DIR", "USER"}
# Crates whose binaries (or libraries in them) run on deployed hosts.
DEPLOYED_CRATES = ["coordinator", "draft-node", "verify-node", "model", "node-runtime", "proto"]
# Rust crate paths that look like metric names.
NOT_METRICS = {"edgespec_draft_node", "edgespec_verify_node"}
# Paths ProtectHome= / PrivateTmp= hide from a unit.
HIDDEN_PREFIXES = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")


def fail(msg: str) -> None:
    cd.fail(msg)


def read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError as e:
        fail(f"{cd.rel(p)}: {e}")
        return ""


def yaml_file(p: Path) -> dict:
    import yaml

    return yaml.safe_load(read(p)) or {}


def kustomizations() -> dict:
    return {k: yaml_file(k) for k in sorted(cd.K8S.rglob("kustomization.yaml"))}


def base_images() -> dict:
    return {e.get("name"): e for e in yaml_file(BASE_KUSTOMIZATION).get("images") or []}


def workloads(by_kind: dict) -> list:
    return [x for k in ("Deployment", "StatefulSet", "DaemonSet", "Job")
            for x in by_kind.get(k, {}).values()]


def containers(d: dict) -> list:
    spec = cd.pod_spec(d) or {}
    return (spec.get("containers") or []) + (spec.get("initContainers") or [])


def section(text: str, start: str) -> str:
    """The text from the line holding `start` to the next markdown heading (of the same or a
    higher level when `start` is a heading itself)."""
    i = text.find(start)
    if i < 0:
        return ""
    level = len(start) - len(start.lstrip("#"))
    stop = r"^#{1,%d} " % (level if level else 6)
    m = re.search(stop, text[i + len(start):], re.M)
    return text[i:i + len(start) + (m.start() if m else len(text))]


def code_blocks(text: str) -> list:
    """[(offset, language, body)] of the fenced code blocks."""
    return [(m.start(), m.group(1), m.group(2))
            for m in re.finditer(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", text, re.M | re.S)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(text: str) -> set:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


# ---------------------------------------------------------------------------------------------
# Kubernetes (called from check_deploy.check_cross_refs)


def check_k8s(by_kind: dict, coord, verify) -> None:
    check_images(by_kind)
    check_gpu(by_kind)
    check_coordinator(coord)
    check_pdbs(by_kind)
    check_autoscaling(by_kind)
    check_review_list(by_kind)
    check_verify_metrics_port(by_kind, verify)


def check_images(by_kind: dict) -> None:
    """One name per image, set in one place: the manifests name bare images, base/kustomization
    `images:` maps each to registry/name:tag, and the docs build and push exactly those."""
    for path, d in kustomizations().items():
        if d.get("images") and path != BASE_KUSTOMIZATION:
            fail(f"{cd.rel(path)}: sets `images:`; image names and tags are set once, in "
                 f"{cd.rel(BASE_KUSTOMIZATION)} (the KEDA and the HPA variant both build on it)")
    images = base_images()
    used = set()
    for w in workloads(by_kind):
        for c in containers(w[2]):
            img = c.get("image", "")
            used.add(img)
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", img):
                fail(f"{cd.where(*w)} container {c.get('name')}: image {img!r} must be a bare name "
                     f"(registry and tag come from `images:` in {cd.rel(BASE_KUSTOMIZATION)})")
            elif img not in images:
                fail(f"{cd.where(*w)} container {c.get('name')}: image {img!r} has no `images:` "
                     f"entry in {cd.rel(BASE_KUSTOMIZATION)}")
    for name, e in images.items():
        if not e.get("newName") or not e.get("newTag"):
            fail(f"{cd.rel(BASE_KUSTOMIZATION)}: image {name} needs newName (registry/name) and "
                 f"newTag (the release; never latest)")
        elif e.get("newTag") == "latest":
            fail(f"{cd.rel(BASE_KUSTOMIZATION)}: image {name}: tag a release, not latest")
        if name not in used:
            fail(f"{cd.rel(BASE_KUSTOMIZATION)}: image {name} is used by no container")
    names = {n: e.get("newName") for n, e in images.items()}
    ref = re.compile(r"([a-z0-9][a-z0-9.-]*\.[a-z]{2,}(?::\d+)?(?:/[a-z0-9._-]+)*/"
                     r"(edgespec(?:-cuda)?))(?::[A-Za-z0-9._-]+)?(?=[\s`'\"\\),]|$)")
    docs = [DEPLOYMENT_MD, cd.ROOT / "README.md", cd.DEPLOY / "container" / "README.md",
            cd.DEPLOY / "container" / "Dockerfile.cpu", DOCKERFILE_CUDA]
    for doc in docs:
        for m in ref.finditer(read(doc)):
            full, short = m.group(1), m.group(2)
            if short in names and full != names[short]:
                fail(f"{cd.rel(doc)}: names image {full}, but the manifests deploy {names[short]} "
                     f"({cd.rel(BASE_KUSTOMIZATION)}); use one name per image")
    text = read(DEPLOYMENT_MD)
    for n, e in images.items():
        want = f"{e.get('newName')}:{e.get('newTag')}"
        if want not in text:
            fail(f"docs/DEPLOYMENT.md: never builds/pushes {want}, the image {n} the manifests "
                 f"deploy ({cd.rel(BASE_KUSTOMIZATION)})")


def check_gpu(by_kind: dict) -> None:
    """CUDA version, compute capability, node affinity and image tag agree."""
    df = read(DOCKERFILE_CUDA)
    script = read(CUDA_SCRIPT)
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+)\.(\d+)\.", df, re.M)
    cap = re.search(r"^ARG CUDA_COMPUTE_CAP=(\d+)\s*$", df, re.M)
    wheel = re.search(r"nvidia-cuda-runtime==(\d+)\.(\d+)\.", script)
    script_cap = re.search(r"CUDA_COMPUTE_CAP:-(\d+)", script)
    if not (cuda and cap and wheel and script_cap):
        fail(f"{cd.rel(DOCKERFILE_CUDA)} / {cd.rel(CUDA_SCRIPT)}: cannot find ARG CUDA_VERSION, "
             f"ARG CUDA_COMPUTE_CAP, the nvidia-cuda-runtime pin or the CUDA_COMPUTE_CAP default")
        return
    if cuda.groups() != wheel.groups():
        fail(f"{cd.rel(DOCKERFILE_CUDA)}: CUDA_VERSION {'.'.join(cuda.groups())} differs from the "
             f"host build's CUDA {'.'.join(wheel.groups())} ({cd.rel(CUDA_SCRIPT)}): one toolkit "
             f"for both, or the image and the hosts need different drivers and libraries")
    if cap.group(1) != script_cap.group(1):
        fail(f"{cd.rel(DOCKERFILE_CUDA)}: default CUDA_COMPUTE_CAP {cap.group(1)} differs from the "
             f"host build's {script_cap.group(1)} ({cd.rel(CUDA_SCRIPT)})")
    cc = int(cap.group(1))
    tag = (base_images().get("edgespec-cuda") or {}).get("newTag", "")
    if not str(tag).endswith(f"-sm{cc}"):
        fail(f"{cd.rel(BASE_KUSTOMIZATION)}: edgespec-cuda tag {tag!r} must end in -sm{cc}, the "
             f"compute capability its kernels are built for (Dockerfile.cuda CUDA_COMPUTE_CAP)")
    driver = MIN_DRIVER.get(int(cuda.group(1)))
    for w in workloads(by_kind):
        if not any(c.get("image") == "edgespec-cuda" for c in containers(w[2])):
            continue
        node = ((cd.pod_spec(w[2]).get("affinity") or {}).get("nodeAffinity") or {})
        terms = ((node.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
                 .get("nodeSelectorTerms") or [])
        if not terms:
            fail(f"{cd.where(*w)}: no required node affinity: the pods would land on GPUs of any "
                 f"compute capability, but the image's kernels run on {cc // 10}.{cc % 10} only")
        for t in terms:
            exprs = {e.get("key"): e for e in t.get("matchExpressions") or []}

            def pinned(key: str, value: int) -> bool:
                e = exprs.get(key) or {}
                return e.get("operator") == "In" and e.get("values") == [str(value)]

            if not (pinned(GFD_MAJOR, cc // 10) and pinned(GFD_MINOR, cc % 10)):
                fail(f"{cd.where(*w)}: node affinity must pin {GFD_MAJOR} In [{cc // 10}] and "
                     f"{GFD_MINOR} In [{cc % 10}] (the image's CUDA_COMPUTE_CAP {cc})")
            d = exprs.get(GFD_DRIVER) or {}
            ok = (d.get("operator") == "Gt" and len(d.get("values") or []) == 1
                  and str(d["values"][0]).isdigit() and driver is not None
                  and int(d["values"][0]) >= driver - 1)
            if not ok:
                fail(f"{cd.where(*w)}: node affinity must require {GFD_DRIVER} Gt {driver - 1 if driver else '?'}"
                     f" (CUDA {'.'.join(cuda.groups())} needs driver {driver} or newer)")
    text = read(DEPLOYMENT_MD)
    if f"CUDA_COMPUTE_CAP={cc}" not in text or "GPU generations" not in text:
        fail(f"docs/DEPLOYMENT.md: no \"GPU generations\" section with the build for "
             f"CUDA_COMPUTE_CAP={cc}")


def coordinator_stop_budget() -> float | None:
    """verify.timeout + the coordinator's server grace + margin: what its SIGTERM path takes."""
    eff = cd.effective("coordinator", cd.load_overlay("coordinator.toml") or {})
    vt = cd.seconds((eff.get("verify") or {}).get("timeout", ""))
    m = re.search(r"const SERVER_GRACE: Duration = Duration::from_secs\((\d+)\)",
                  read(COORDINATOR_APP))
    if vt is None or m is None:
        fail(f"cannot work out the coordinator's stop budget (verify.timeout of "
             f"deploy/config/coordinator.toml, SERVER_GRACE in {cd.rel(COORDINATOR_APP)})")
        return None
    return vt + int(m.group(1)) + cd.STOP_MARGIN_S


def check_coordinator(coord) -> None:
    need = coordinator_stop_budget()
    grace = (cd.pod_spec(coord[2]) or {}).get("terminationGracePeriodSeconds", 30)
    if need is not None and grace < need:
        fail(f"{cd.where(*coord)}: terminationGracePeriodSeconds {grace} is shorter than the "
             f"coordinator's stop path: verify.timeout + server grace + {cd.STOP_MARGIN_S}s = "
             f"{need:g}s (in-flight Verify calls are cut off)")


def check_pdbs(by_kind: dict) -> None:
    for p in by_kind.get("PodDisruptionBudget", {}).values():
        if (p[2].get("spec") or {}).get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
            fail(f"{cd.where(*p)}: set unhealthyPodEvictionPolicy: AlwaysAllow; with the default "
                 f"`kubectl drain` hangs while the budget's pods are unready (e.g. no coordinator "
                 f"healthy)")


def keda_triggers(by_kind: dict) -> list:
    return [(so, t) for so in by_kind.get("ScaledObject", {}).values()
            for t in (so[2].get("spec") or {}).get("triggers") or [] if t.get("type") == "prometheus"]


def check_autoscaling(by_kind: dict) -> None:
    """Scale from zero works without an on-prem verify node, and the docs quote the queries."""
    for so in by_kind.get("ScaledObject", {}).values():
        spec = so[2].get("spec") or {}
        if spec.get("minReplicaCount", 0) != 0:
            continue
        queries = [(t.get("metadata") or {}).get("query", "") for t in spec.get("triggers") or []]
        if not any("edgespec_coordinator_session_errors_total" in q and "unavailable" in q
                   for q in queries):
            fail(f"{cd.where(*so)}: minReplicaCount 0 but no trigger wakes the pool from zero: "
                 f"with no verify node the coordinators place no session, so "
                 f"edgespec_coordinator_cloud_demand stays 0; add a trigger on the UNAVAILABLE "
                 f"refusals (edgespec_coordinator_session_errors_total{{code=\"unavailable\"}})")
    trig = keda_triggers(by_kind)
    addresses = {(t.get("metadata") or {}).get("serverAddress") for _so, t in trig}
    if len(addresses) > 1:
        fail(f"deploy/k8s/keda-scaledobject.yaml: the triggers read different Prometheus servers "
             f"({sorted(map(str, addresses))})")
    queries = {(t.get("metadata") or {}).get("query") for _so, t in trig}
    for doc in (OPERATIONS_MD, DEPLOYMENT_MD):
        text = read(doc)
        for m in re.finditer(r"^\s*query:\s*(.+?)\s*$", text, re.M):
            if m.group(1) not in queries:
                fail(f"{cd.rel(doc)}: quotes the KEDA query `{m.group(1)}`, which is not one of "
                     f"deploy/k8s/keda-scaledobject.yaml's ({sorted(map(str, queries))})")
        for m in re.finditer(r"^\s*serverAddress:\s*(\S+)", text, re.M):
            if m.group(1) not in addresses:
                fail(f"{cd.rel(doc)}: quotes serverAddress {m.group(1)}, but the ScaledObject reads "
                     f"{sorted(map(str, addresses))}")
    text = read(OPERATIONS_MD)
    for q in queries:
        if q and q not in text:
            fail(f"docs/OPERATIONS.md: does not quote the KEDA query `{q}` "
                 f"(deploy/k8s/keda-scaledobject.yaml)")


def check_review_list(by_kind: dict) -> None:
    """Every value that depends on the operator's environment is in DEPLOYMENT.md's list."""
    review = section(read(DEPLOYMENT_MD), "**Review before applying**")
    if not review:
        fail("docs/DEPLOYMENT.md: no \"**Review before applying**\" list in §4")
        return
    want = []  # (value, where it is set)
    for n, e in base_images().items():
        want.append((str(e.get("newName")), f"image {n}, {cd.rel(BASE_KUSTOMIZATION)}"))
    for _so, t in keda_triggers(by_kind):
        want.append((str((t.get("metadata") or {}).get("serverAddress")),
                     "serverAddress, deploy/k8s/keda-scaledobject.yaml"))
    mk = yaml_file(MONITORING / "kustomization.yaml")
    for lab in mk.get("labels") or []:
        for k, v in (lab.get("pairs") or {}).items():
            want.append((f"{k}: {v}", "labels, deploy/k8s/monitoring/kustomization.yaml"))
    for np in by_kind.get("NetworkPolicy", {}).values():
        for rule in (np[2].get("spec") or {}).get("ingress") or []:
            for peer in rule.get("from") or []:
                cidr = (peer.get("ipBlock") or {}).get("cidr")
                ns = (((peer.get("namespaceSelector") or {}).get("matchLabels") or {})
                      .get("kubernetes.io/metadata.name"))
                for v in (cidr, ns):
                    if v:
                        want.append((str(v), f"{cd.where(*np)}"))
    for r in prometheus_rules(by_kind):
        url = (r.get("annotations") or {}).get("runbook_url", "")
        m = re.match(r"(https?://[^/]+)", url)
        if m:
            want.append((m.group(1), "runbook_url, deploy/k8s/monitoring/prometheusrule.yaml"))
    want.append(("scrapeconfig-onprem.yaml", "on-prem scrape targets"))
    want.append(("tls-certificate.yaml", "the coordinators' DNS names"))
    want.append(("storageClassName", "deploy/k8s/base/models-pvc.yaml"))
    for value, origin in dict(want).items():
        if value not in review:
            fail(f"docs/DEPLOYMENT.md: \"Review before applying\" does not list `{value}` "
                 f"({origin})")


def check_verify_metrics_port(by_kind: dict, verify) -> None:
    """The verify pods' metrics port is a container port, open to Prometheus only."""
    port = verify_metrics_port()
    c = next((c for c in containers(verify[2]) if c.get("name") == "verify-node"), {})
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if ports.get("metrics") != port:
        fail(f"{cd.where(*verify)}: needs container port `metrics` = {port} (metrics.listen) for "
             f"Prometheus; has {ports}")
        return
    peers = cd.ingress_peers(by_kind, cd.pod_labels(verify[2]), port, "metrics")
    if not peers:
        fail(f"{cd.where(*verify)}: no NetworkPolicy admits Prometheus to the metrics port {port}")
    for np, peer in peers:
        if cd.peer_kind(peer) != "namespace":
            fail(f"{cd.where(*np)}: admits {peer or 'anyone'} to the verify pods' metrics port "
                 f"{port}; only Prometheus' namespace may")


def verify_metrics_port() -> int:
    """metrics.listen of the verify node (its default.toml), or 9102 until the key exists."""
    listen = (cd.defaults("verify-node").get("metrics") or {}).get("listen")
    if isinstance(listen, str) and re.fullmatch(r".+:\d+", listen):
        return int(listen.rsplit(":", 1)[1])
    print("NOTE verify-node/default.toml has no [metrics] listen yet: assuming port 9102")
    return 9102


# ---------------------------------------------------------------------------------------------
# systemd (called from check_deploy.cmd_config)


def check_units() -> None:
    units = cd.DEPLOY / "systemd"
    coord = units / "edgespec-coordinator.service"
    if not coord.exists():
        fail("deploy/systemd/edgespec-coordinator.service is missing (docs/DEPLOYMENT.md offers an "
             "on-prem coordinator)")
    else:
        need = coordinator_stop_budget()
        stop = unit_value(coord, "TimeoutStopSec")
        secs = cd.seconds(stop + ("s" if stop and stop.isdigit() else "")) if stop else None
        if need is not None and (secs is None or secs < need):
            fail(f"{cd.rel(coord)}: TimeoutStopSec={stop} is shorter than the coordinator's stop "
                 f"path ({need:g}s: verify.timeout + server grace + margin)")
    verify = units / "edgespec-verify-node.service"
    env = dict(unit_env(verify))
    lib = env.get("LD_LIBRARY_PATH")
    if not lib:
        fail(f"{cd.rel(verify)}: no Environment=LD_LIBRARY_PATH: a CUDA build cannot find "
             f"libcudart/libcublas/libcurand 13 (deploy/tools/cuda-from-pypi.sh runtime)")
    else:
        for d in lib.split(":"):
            if d.startswith(HIDDEN_PREFIXES):
                fail(f"{cd.rel(verify)}: LD_LIBRARY_PATH entry {d} is hidden from the unit "
                     f"(ProtectHome= / PrivateTmp=)")
        dest = lib.split(":")[0].removesuffix("/lib")
        if f"cuda-from-pypi.sh runtime {dest}" not in read(DEPLOYMENT_MD):
            fail(f"docs/DEPLOYMENT.md: does not install the CUDA runtime libraries where the unit "
                 f"looks (`deploy/tools/cuda-from-pypi.sh runtime {dest}`)")
    cache = env.get("CUDA_CACHE_PATH", "")
    writable = [f"/var/cache/{v}" for v in unit_values(verify, "CacheDirectory")] + \
        [f"/var/lib/{v}" for v in unit_values(verify, "StateDirectory")] + \
        unit_values(verify, "ReadWritePaths")
    if not any(cache == w or cache.startswith(w.rstrip("/") + "/") for w in writable):
        fail(f"{cd.rel(verify)}: CUDA_CACHE_PATH={cache!r} must be inside a directory the unit may "
             f"write ({writable}): the driver caches its JIT-compiled kernels there")


def unit_values(unit: Path, key: str) -> list:
    out = []
    for line in read(unit).splitlines():
        line = line.strip()
        if line.startswith(key + "="):
            out.extend(line.split("=", 1)[1].split())
    return out


def unit_value(unit: Path, key: str) -> str | None:
    vals = unit_values(unit, key)
    return vals[-1] if vals else None


def unit_env(unit: Path) -> list:
    return [tuple(v.split("=", 1)) for v in unit_values(unit, "Environment") if "=" in v]


# ---------------------------------------------------------------------------------------------
# Monitoring: `check_deploy.py monitoring --metrics FILE`


def exported_series(exposition: str) -> set:
    """Series names a node's /metrics can show, from the `# TYPE` lines of its exposition."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                                                                "_created"],
                "gauge": [""], "info": ["_info"], "summary": ["", "_sum", "_count"],
                "unknown": [""], "stateset": [""], "gaugehistogram": ["_bucket", "_gcount",
                                                                      "_gsum"]}
    out = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)", exposition, re.M):
        name, kind = m.group(1), m.group(2)
        out.update(name + s for s in suffixes.get(kind, [""]))
    return out


def metric_names(promql: str) -> set:
    return {n for n in re.findall(r"\bedgespec_[a-z0-9_]*[a-z0-9]\b", promql) if n not in NOT_METRICS}


def prometheus_rules(by_kind: dict) -> list:
    return [r for pr in by_kind.get("PrometheusRule", {}).values()
            for g in (pr[2].get("spec") or {}).get("groups") or [] for r in g.get("rules") or []]


def dashboard_panels(dash: dict) -> list:
    out = []
    for p in dash.get("panels") or []:
        out.append(p)
        out.extend(p.get("panels") or [])
    return out


def cmd_monitoring(metrics_file: str | None) -> None:
    if not metrics_file:
        fail("monitoring: needs --metrics FILE, the /metrics text of every node kind (the "
             "deploy_manifests test renders it from the crates' metrics modules)")
        return
    exposition = Path(metrics_file).read_text()
    known = exported_series(exposition)
    # Prose may name a family (a histogram by its name); queries must name a series.
    families = set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))
    files, docs = cd.load_docs()
    by_kind: dict = {}
    for path, i, d in docs:
        by_kind.setdefault(d.get("kind"), {})[(d.get("metadata") or {}).get("name")] = (path, i, d)
    check_scraping(by_kind)
    check_rules(by_kind, known)
    check_dashboard(known)
    # Every metric name the operator docs and the autoscaler quote exists.
    for _so, t in keda_triggers(by_kind):
        for n in metric_names((t.get("metadata") or {}).get("query", "")) - known:
            fail(f"deploy/k8s/keda-scaledobject.yaml: the query reads {n}, which no node exports")
    for doc in (DEPLOYMENT_MD, OPERATIONS_MD, cd.ROOT / "README.md"):
        for n in sorted(metric_names(read(doc)) - known - families):
            fail(f"{cd.rel(doc)}: names metric {n}, which no node exports")
    if not cd.errors:
        print(f"ok   monitoring: {len(known)} exported series names checked against the rules, "
              f"the dashboard, the KEDA queries and the docs")


def check_scraping(by_kind: dict) -> None:
    """Coordinators, cloud verify pods and every on-prem role are scraped."""
    coord = by_kind.get("StatefulSet", {}).get("edgespec-coordinator")
    verify = by_kind.get("Deployment", {}).get("edgespec-verify-node")
    if coord is None or verify is None:
        fail("the coordinator StatefulSet and the verify Deployment must exist")
        return
    services = [s for s in by_kind.get("Service", {}).values()
                if cd.matches((s[2].get("spec") or {}).get("selector") or {},
                              cd.pod_labels(coord[2]))]
    sm_ok = any(
        any(cd.matches(((sm[2].get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                       (s[2].get("metadata") or {}).get("labels") or {}) for s in services)
        and any(e.get("port") == "admin" for e in (sm[2].get("spec") or {}).get("endpoints") or [])
        for sm in by_kind.get("ServiceMonitor", {}).values())
    if not sm_ok:
        fail("deploy/k8s/monitoring: no ServiceMonitor scrapes the coordinators' admin port")
    pm_ok = any(
        cd.matches(((pm[2].get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                   cd.pod_labels(verify[2]))
        and any(e.get("port") == "metrics"
                for e in (pm[2].get("spec") or {}).get("podMetricsEndpoints") or [])
        for pm in by_kind.get("PodMonitor", {}).values())
    if not pm_ok:
        fail("deploy/k8s/monitoring: no PodMonitor scrapes the verify pods' `metrics` port")
    draft_port = int(str(cd.effective("draft-node", cd.load_overlay("onprem-draft.toml") or {})
                         ["http"]["listen"]).rsplit(":", 1)[1])
    admin_port = int(str(cd.effective("coordinator", cd.load_overlay("coordinator.toml") or {})
                         ["admin"]["listen"]).rsplit(":", 1)[1])
    want = {"draft": draft_port, "verify": verify_metrics_port(), "coordinator": admin_port}
    seen = set()
    for sc in by_kind.get("ScrapeConfig", {}).values():
        spec = sc[2].get("spec") or {}
        for st in spec.get("staticConfigs") or []:
            labels = st.get("labels") or {}
            role = labels.get("role")
            if not labels.get("site") or role not in want:
                fail(f"{cd.where(*sc)}: every static config needs labels site and role "
                     f"({'/'.join(want)}); has {labels}")
                continue
            seen.add(role)
            scheme = str(spec.get("scheme", "HTTP")).upper()
            if (role == "coordinator") != (scheme == "HTTPS"):
                fail(f"{cd.where(*sc)}: role {role} is scraped over "
                     f"{'HTTPS' if role == 'coordinator' else 'HTTP'}, not {scheme}")
            for t in st.get("targets") or []:
                if not re.fullmatch(r".+:(\d+)", str(t)) or int(str(t).rsplit(":", 1)[1]) != want[role]:
                    fail(f"{cd.where(*sc)}: target {t} of role {role} must be host:{want[role]}")
    for role in want:
        if role not in seen:
            fail(f"deploy/k8s/monitoring: no ScrapeConfig scrapes on-prem {role} nodes")


def check_rules(by_kind: dict, known: set) -> None:
    rules = prometheus_rules(by_kind)
    ops = read(OPERATIONS_MD)
    runbooks = section(ops, "## Alerts and runbooks")
    if not runbooks:
        fail("docs/OPERATIONS.md: no \"## Alerts and runbooks\" section")
    names = set()
    for r in rules:
        a = r.get("alert")
        if not a:
            continue
        names.add(a)
        w = f"deploy/k8s/monitoring/prometheusrule.yaml alert {a}"
        for n in sorted(metric_names(str(r.get("expr", ""))) - known):
            fail(f"{w}: expr reads {n}, which no node exports")
        if not r.get("for"):
            fail(f"{w}: set `for:` so one bad scrape does not page")
        if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
            fail(f"{w}: labels.severity must be warning or critical")
        ann = r.get("annotations") or {}
        if not ann.get("summary"):
            fail(f"{w}: annotations.summary is missing")
        m = re.fullmatch(r"https?://\S+/docs/OPERATIONS\.md#([\w-]+)", ann.get("runbook_url", ""))
        if not m:
            fail(f"{w}: annotations.runbook_url must link docs/OPERATIONS.md#<its runbook>")
        elif m.group(1) != slug(a) or not re.search(rf"^#+ {re.escape(a)}\s*$", runbooks, re.M):
            fail(f"{w}: runbook_url #{m.group(1)} must be #{slug(a)}, a \"### {a}\" runbook under "
                 f"\"## Alerts and runbooks\" in docs/OPERATIONS.md")
    for a in sorted(REQUIRED_ALERTS - names):
        fail(f"deploy/k8s/monitoring/prometheusrule.yaml: alert {a} is missing")
    for m in re.finditer(r"^### (Edgespec\w+)\s*$", runbooks, re.M):
        if m.group(1) not in names:
            fail(f"docs/OPERATIONS.md: runbook {m.group(1)} has no alert")


def check_dashboard(known: set) -> None:
    mk = yaml_file(MONITORING / "kustomization.yaml")
    gens = [g for g in mk.get("configMapGenerator") or []
            if ((g.get("options") or {}).get("labels") or {}).get("grafana_dashboard")]
    files = [MONITORING / f.split("=")[-1] for g in gens for f in g.get("files") or []]
    if not files:
        fail("deploy/k8s/monitoring/kustomization.yaml: no configMapGenerator with label "
             "grafana_dashboard provisions a dashboard")
        return
    for f in files:
        try:
            dash = json.loads(read(f))
        except json.JSONDecodeError as e:
            fail(f"{cd.rel(f)}: not JSON: {e}")
            continue
        panels = dashboard_panels(dash)
        exprs = []
        for p in panels:
            e = "\n".join(str(t.get("expr", "")) for t in p.get("targets") or [])
            exprs.append((p.get("title", "?"), e))
            for n in sorted(metric_names(e) - known):
                fail(f"{cd.rel(f)} panel {p.get('title')!r}: reads {n}, which no node exports")
            if p.get("type") != "row" and not p.get("targets"):
                fail(f"{cd.rel(f)} panel {p.get('title')!r}: no query")
        for v in (dash.get("templating") or {}).get("list") or []:
            for n in sorted(metric_names(json.dumps(v.get("query", ""))) - known):
                fail(f"{cd.rel(f)} variable {v.get('name')}: reads {n}, which no node exports")
        every = "\n".join(e for _t, e in exprs)
        for role, prefix in ROLE_PREFIXES.items():
            if prefix not in every:
                fail(f"{cd.rel(f)}: no panel shows a {role} metric ({prefix}*)")
        for figure, metrics, pattern in REQUIRED_FIGURES:
            if not any(all(m in e for m in metrics) and (pattern is None or re.search(pattern, e))
                       for _t, e in exprs):
                fail(f"{cd.rel(f)}: no panel shows {figure} ({' and '.join(metrics)}"
                     f"{', ' + pattern if pattern else ''})")


# ---------------------------------------------------------------------------------------------
# The walkthrough: `check_deploy.py docs`

OWN_DOCS = [DEPLOYMENT_MD, OPERATIONS_MD, cd.DEPLOY / "README.md",
            cd.DEPLOY / "config" / "README.md", cd.DEPLOY / "systemd" / "README.md",
            cd.DEPLOY / "container" / "README.md"]
REPO_DIRS = ("deploy", "docs", "coordinator", "draft-node", "verify-node", "model", "proto",
             "specdec", "edgespec", "tests", "node-runtime", "testkit", "bench")


def cmd_docs() -> None:
    for doc in OWN_DOCS:
        check_paths(doc)
    text = read(DEPLOYMENT_MD)
    check_variables(DEPLOYMENT_MD)
    check_variables(OPERATIONS_MD)
    check_order(text)
    check_env_documented(text)
    if not cd.errors:
        print("ok   docs: paths, shell variables, step order and environment variables checked")


def check_paths(doc: Path) -> None:
    """Every repository file a document names exists."""
    text = read(doc)
    path_re = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*[\w-])" % "|".join(REPO_DIRS))
    for m in path_re.finditer(text):
        p = m.group(1)
        if any(ch in p for ch in "<>*…") or "example" in p:
            continue
        target = cd.ROOT / p
        if not target.exists():
            fail(f"{cd.rel(doc)}: names {p}, which does not exist in the repository")
    for m in re.finditer(r"(?<![\w/.-])([A-Z][A-Z0-9_-]+\.md)\b", text):
        name = m.group(1)
        if not any((d / name).exists() for d in (cd.ROOT, DOCS, doc.parent)):
            fail(f"{cd.rel(doc)}: refers to {name}, which is not in the repository")
    for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", text):
        link = m.group(1)
        if re.match(r"[a-z]+:", link):
            continue
        if not (doc.parent / link).exists():
            fail(f"{cd.rel(doc)}: link {link} does not resolve")


_DEFINED = re.compile(r"(?:^|[\s;&|(])(?:export\s+|local\s+)?([A-Za-z_]\w*)=")
_FOR = re.compile(r"\bfor\s+([A-Za-z_]\w*)\s+in\b")
_USE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(:?-[^}]*)?\}|([A-Za-z_]\w*))")


def check_variables(doc: Path) -> None:
    """Every shell variable a command uses is set by an earlier command of the document (or is
    a function argument, a loop variable, or set by the environment of any shell)."""
    defined = {"HOME", "PWD", "USER", "PATH"}
    for _off, lang, body in code_blocks(read(doc)):
        if lang not in ("", "sh", "bash", "shell", "console"):
            continue
        heredoc = None
        for line in body.splitlines():
            if heredoc:
                if line.strip() == heredoc:
                    heredoc = None
                continue
            h = re.search(r"<<-?\s*'?\"?(\w+)", line)
            code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
            defined.update(_DEFINED.findall(code))
            defined.update(_FOR.findall(code))
            for m in _USE.finditer(code):
                name = m.group(1) or m.group(3)
                if name and name not in defined and not m.group(2) and not name.isdigit():
                    fail(f"{cd.rel(doc)}: `{line.strip()}` uses ${name}, which no earlier command "
                         f"sets")
            if h:
                heredoc = h.group(1)


def check_order(text: str) -> None:
    """Namespaces and PVCs exist before a command uses them; pods are ready before `kubectl cp`."""
    lines = []  # commands in document order, continuation lines joined
    for _off, _lang, body in code_blocks(text):
        for line in body.replace("\\\n", " ").splitlines():
            lines.append(line)
    ns_made = False
    applied: list[str] = []
    waited: set = set()
    pvc_files = pvc_definitions()
    for line in lines:
        s = line.strip()
        if re.search(r"kubectl (create namespace|apply -f deploy/k8s/base/namespace\.yaml)", s) \
                or re.search(r"kubectl apply -k deploy/k8s(/hpa)?\s*$", s):
            ns_made = True
        uses_ns = re.search(r"kubectl\b.*\s-n\s+edgespec\b", s) or \
            re.search(r"kubectl (apply|create) -f deploy/k8s/secrets/", s)
        if uses_ns and not ns_made and "create namespace" not in s:
            fail(f"docs/DEPLOYMENT.md: `{s}` runs before namespace edgespec is created")
        for m in re.finditer(r"-(?:f|k)\s+(deploy/k8s/\S+)", s):
            applied.append(m.group(1))
        m = re.search(r"claimName:\s*([\w-]+)", s)
        if m:
            src = pvc_files.get(m.group(1))
            if src and not any(src == a or src.startswith(a.rstrip("/") + "/")
                               or (a.rstrip("/") in ("deploy/k8s", "deploy/k8s/hpa")
                                   and src.startswith("deploy/k8s/base/")) for a in applied):
                fail(f"docs/DEPLOYMENT.md: a pod mounts PVC {m.group(1)} before any step creates it "
                     f"({src})")
        m = re.search(r"kubectl\b.*\bwait\b.*\bpod/([\w-]+)", s)
        if m:
            waited.add(m.group(1))
        m = re.search(r"kubectl\b.*\bcp\b.*\s([\w-]+):/", s)
        if m and m.group(1) not in waited:
            fail(f"docs/DEPLOYMENT.md: `kubectl cp` into pod {m.group(1)} without a `kubectl wait` "
                 f"for it to be Ready first")


def pvc_definitions() -> dict:
    out = {}
    _files, docs = cd.load_docs()
    for path, _i, d in docs:
        if d.get("kind") == "PersistentVolumeClaim":
            out[(d.get("metadata") or {}).get("name")] = cd.rel(path)
    return out


def env_vars_read() -> dict:
    """Environment variables the deployed binaries read: name -> files reading it."""
    pats = [r'env\s*=\s*"([A-Z][A-Z0-9_]+)"', r'const \w*ENV\w*: &str = "([A-Z][A-Z0-9_]+)"',
            r'var(?:_os)?\(\s*"([A-Z][A-Z0-9_]+)"\s*\)']
    out: dict = {}
    for crate in DEPLOYED_CRATES:
        for f in sorted((cd.ROOT / crate / "src").rglob("*.rs")):
            if "test" in f.name or "gpu_check" in f.parts:
                continue
            text = f.read_text().split("#[cfg(test)]")[0]
            for p in pats:
                for name in re.findall(p, text):
                    # EDGESPEC__<SECTION>__<KEY> (and its prefix) is documented as a family.
                    if name not in GENERIC_ENV and not name.startswith("EDGESPEC__") \
                            and name != "EDGESPEC":
                        out.setdefault(name, set()).add(cd.rel(f))
    return out


def check_env_documented(text: str) -> None:
    table = section(text, "### Environment variables")
    if not table:
        fail("docs/DEPLOYMENT.md: no \"### Environment variables\" table in §0")
        return
    for name, files in sorted(env_vars_read().items()):
        row = next((l for l in table.splitlines() if l.startswith("|") and f"`{name}`" in l), None)
        if row is None:
            fail(f"docs/DEPLOYMENT.md: environment variable {name} (read in {sorted(files)}) is "
                 f"not in the \"Environment variables\" table")
            continue
        if name == "EDGESPEC_CONFIG":
            for binary in ("edgespec-coordinator", "edgespec-verify-node", "edgespec-draft-node"):
                if binary not in row:
                    fail(f"docs/DEPLOYMENT.md: the EDGESPEC_CONFIG row must name {binary} (every "
                         f"node binary reads it)")
