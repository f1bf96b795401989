#!/usr/bin/env python3
"""Static checks of deploy/ (run by tests/tests/deploy_manifests.rs; usable on its own).

    python3 deploy/tools/check_deploy.py config   # TOML overlays + EDGESPEC__ env keys vs default.toml,
                                                  # trust domain, systemd stop timeout vs drain
    python3 deploy/tools/check_deploy.py k8s      # every deploy/k8s YAML (needs kubernetes-validate),
                                                  # per-role certificates, admin HTTPS, verify
                                                  # self-drain wiring, network policies
    python3 deploy/tools/check_deploy.py sync     # rewrite the ConfigMaps from deploy/config
    python3 deploy/tools/check_deploy.py monitoring --metrics FILE
                                                  # alerts, runbooks, dashboard, scrape configs;
                                                  # FILE: the nodes' /metrics text (the
                                                  # deploy_manifests test writes it)
    python3 deploy/tools/check_deploy.py docs     # the DEPLOYMENT.md walkthrough: files, variables,
                                                  # step order, environment variables

Exit status 0 when every check passes, 1 with one "FAIL: ..." line per problem otherwise.
Needs Python >= 3.11 (tomllib); `k8s`, `monitoring` and `docs` also need PyYAML (`k8s`:
kubernetes-validate, which brings it: pip install kubernetes-validate). The operator-experience
checks (images, GPU build, autoscaling, monitoring, docs) live in check_ops.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# Overlay file -> crate whose default.toml defines its keys.
OVERLAYS = {
    "onprem-draft.toml": "draft-node",
    "onprem-verify.toml": "verify-node",
    "cloud-verify.toml": "verify-node",
    "coordinator.toml": "coordinator",
}
# systemd environment file -> crate.
ENV_FILES = {
    "edgespec-draft-node.env.example": "draft-node",
    "edgespec-verify-node.env.example": "verify-node",
}
# Kubernetes container name -> crate.
CONTAINERS = {"coordinator": "coordinator", "verify-node": "verify-node", "draft-node": "draft-node"}
# Kinds without a schema in kubernetes-validate, checked structurally below.
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "ClusterIssuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "CertificateRequest"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"),
}
# Where every node finds its TLS material (systemd hosts: installed files; coordinator pods:
# Secret edgespec-coordinator-tls; verify pods: a csi.cert-manager.io volume of their own), and
# which file each [tls] key names.
TLS_DIR = "/etc/edgespec/tls"
TLS_FILES = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
COORDINATOR_TLS_SECRET = "edgespec-coordinator-tls"
ADMIN_TOKEN_SECRET = "edgespec-admin-token"
# The cert-manager csi-driver: one certificate per verify pod, made when the pod starts.
CSI_DRIVER = "csi.cert-manager.io"
# csi-driver attribute -> the file it names (and its default).
CSI_FILES = {"csi.cert-manager.io/ca-file": "ca.crt",
             "csi.cert-manager.io/certificate-file": "tls.crt",
             "csi.cert-manager.io/privatekey-file": "tls.key"}
# Each crate's role in the URI SAN spiffe://<trust-domain>/<role>/<node-id> of its certificate.
ROLES = {"coordinator": "coordinator", "verify-node": "verify", "draft-node": "draft"}
# tls.trust_domain when an overlay does not set it (proto/src/tls.rs DEFAULT_TRUST_DOMAIN).
DEFAULT_TRUST_DOMAIN = "edgespec"
# Node ids in certificates: proto/src/auth.rs parse_spiffe.
NODE_ID_RE = r"[A-Za-z0-9._-]{1,128}"
# Seconds a stopping verify node needs beyond drain_timeout + 2 x shutdown_grace (model teardown).
STOP_MARGIN_S = 10
# Settings that hold gRPC addresses of other nodes (dialled with TLS: must say https://).
ADDRESS_KEYS = {("coordinator", "address"), ("coordinator", "addresses"),
                ("server", "advertise_addr")}
# The gRPC service the verify node's health probes ask about.
VERIFIER_SERVICE = "edgespec.v1.Verifier"
# Names the cert-manager Certificate usages must include: every node serves and dials.
TLS_USAGES = {"server auth", "client auth"}
# YAML files applied by hand (templates with placeholders), not listed in any kustomization.
TEMPLATE_DIRS = {K8S / "secrets"}

errors: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------
# settings keys


def defaults(crate: str) -> dict:
    path = ROOT / crate / "default.toml"
    with open(path, "rb") as f:
        return tomllib.load(f)


def type_ok(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list) and all(
            not default or type_ok(default[0], v) for v in value
        )
    return type(default) is type(value)


def check_toml_keys(where: str, crate: str, data: dict) -> int:
    """Every section and key in `data` must exist in the crate's default.toml, same type."""
    d = defaults(crate)
    n = 0
    for section, table in data.items():
        if section not in d or not isinstance(d[section], dict):
            fail(f"{where}: section [{section}] does not exist in {crate}/default.toml "
                 f"(sections: {', '.join(sorted(k for k in d if isinstance(d[k], dict)))})")
            continue
        if not isinstance(table, dict):
            fail(f"{where}: `{section}` must be a table")
            continue
        for key, value in table.items():
            n += 1
            if key not in d[section]:
                fail(f"{where}: key {section}.{key} does not exist in {crate}/default.toml "
                     f"([{section}] has: {', '.join(d[section])})")
            elif not type_ok(d[section][key], value):
                fail(f"{where}: {section}.{key} = {value!r} has type {type(value).__name__}, "
                     f"the default {d[section][key]!r} is {type(d[section][key]).__name__}")
    return n


def check_env_key(where: str, crate: str, name: str) -> None:
    """EDGESPEC__SECTION__KEY must name an existing key (the config crate lower-cases it)."""
    parts = name.split("__")
    if len(parts) != 3 or parts[0] != "EDGESPEC" or not parts[1] or not parts[2]:
        fail(f"{where}: `{name}` is not of the form EDGESPEC__<SECTION>__<KEY>")
        return
    section, key = parts[1].lower(), parts[2].lower()
    d = defaults(crate)
    if section not in d or key not in d.get(section, {}):
        fail(f"{where}: `{name}` sets {section}.{key}, which does not exist in {crate}/default.toml")


def effective(crate: str, data: dict) -> dict:
    """The crate's defaults with `data` (an overlay) applied, section by section."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in defaults(crate).items()}
    for section, table in data.items():
        if isinstance(table, dict) and isinstance(merged.get(section), dict):
            merged[section].update(table)
    return merged


def load_overlay(name: str) -> dict | None:
    try:
        with open(DEPLOY / "config" / name, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None


_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def seconds(value) -> float | None:
    """A humantime duration ("30s", "2m", "1m30s", "250ms") in seconds; None if unparsable."""
    text = re.sub(r"\s", "", str(value))
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    total = 0.0
    for n, u in parts:
        if u not in _UNITS:
            return None
        total += float(n) * _UNITS[u]
    return total


def trust_domain(crate: str, data: dict) -> str:
    return (effective(crate, data).get("tls") or {}).get("trust_domain", DEFAULT_TRUST_DOMAIN)


def spiffe_ids(uris, td: str, role: str | None = None) -> list:
    """(role, node id) of every spiffe:// URI of trust domain `td` (and `role`, when given)."""
    out = []
    for u in uris or []:
        m = re.fullmatch(r"spiffe://([^/]+)/([^/]+)/(.+)", str(u))
        if m and m.group(1) == td and (role is None or m.group(2) == role):
            out.append((m.group(2), m.group(3)))
    return out


def stop_budget(where: str, data: dict) -> float | None:
    """drain_timeout + 2 x shutdown_grace + margin of a verify overlay: what SIGTERM needs."""
    server = effective("verify-node", data).get("server") or {}
    drain = server.get("drain_timeout", "20s")
    grace = server.get("shutdown_grace", "30s")
    d, g = seconds(drain), seconds(grace)
    if d is None or g is None:
        fail(f"{where}: server.drain_timeout {drain!r} / server.shutdown_grace {grace!r} are not "
             f"durations like \"30s\"")
        return None
    return d + 2 * g + STOP_MARGIN_S


def check_tls_overlay(where: str, crate: str, data: dict) -> None:
    """A deployed node runs mutual TLS with the files of TLS_DIR and dials https:// addresses."""
    eff = effective(crate, data)
    tls = eff.get("tls") or {}
    if tls.get("mode") != "mtls":
        fail(f"{where}: tls.mode is {tls.get('mode')!r}; deployed nodes run \"mtls\" "
             f"(plaintext is for the local demo only)")
    for key, file in TLS_FILES.items():
        want = f"{TLS_DIR}/{file}"
        if tls.get(key) != want:
            fail(f"{where}: tls.{key} is {tls.get(key)!r}, expected {want!r} (systemd hosts "
                 f"install the files there, pods mount their certificate volume there)")
    for section, key in sorted(ADDRESS_KEYS):
        value = (eff.get(section) or {}).get(key)
        for addr in value if isinstance(value, list) else [value]:
            if isinstance(addr, str) and addr and not addr.startswith("https://"):
                fail(f"{where}: {section}.{key} `{addr}` must start with https:// "
                     f"(the link is mutual TLS)")


def check_env_value(where: str, name: str, value: str) -> None:
    """Addresses in env files say https://; TLS settings are paths, never key material."""
    parts = name.lower().split("__")
    if len(parts) != 3:
        return
    _, section, key = parts
    if (section, key) in ADDRESS_KEYS:
        for addr in value.split(","):
            if addr and not addr.startswith("https://"):
                fail(f"{where}: {name} `{addr}` must start with https:// (the link is mutual TLS)")
    if section == "tls" and key in TLS_FILES and not value.startswith("/"):
        fail(f"{where}: {name} must be the absolute path of a PEM file, not its content")


def cmd_config() -> None:
    cfg = DEPLOY / "config"
    present = {p.name for p in cfg.glob("*.toml")}
    for missing in sorted(set(OVERLAYS) - present):
        fail(f"deploy/config/{missing} is missing")
    for extra in sorted(present - set(OVERLAYS)):
        fail(f"deploy/config/{extra}: unknown overlay (add it to OVERLAYS in {rel(Path(__file__))})")
    domains: dict[str, list] = {}
    for name, crate in OVERLAYS.items():
        path = cfg / name
        if not path.exists():
            continue
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            fail(f"{rel(path)}: not valid TOML: {e}")
            continue
        n = check_toml_keys(rel(path), crate, data)
        if n == 0:
            fail(f"{rel(path)}: sets no key at all")
        check_tls_overlay(rel(path), crate, data)
        td = trust_domain(crate, data)
        domains.setdefault(td, []).append(name)
        if not re.fullmatch(r"[a-z0-9._-]+", td):
            fail(f"{rel(path)}: tls.trust_domain {td!r} must be lower-case letters, digits, '.', "
                 f"'-' or '_' (the host part of spiffe://{td}/{ROLES[crate]}/<node-id>)")
        if crate == "verify-node":
            if "drain_timeout" not in (data.get("server") or {}):
                fail(f"{rel(path)}: set server.drain_timeout (how long a stopping node waits for "
                     f"its sessions to move) so the stop timeouts can be checked against it")
            stop_budget(rel(path), data)
        print(f"ok   {rel(path)}: {n} keys, all in {crate}/default.toml; mtls, https addresses, "
              f"trust domain {td}")
    for name, crate in ENV_FILES.items():
        path = DEPLOY / "systemd" / name
        if not path.exists():
            fail(f"{rel(path)} is missing")
            continue
        n = 0
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "-----BEGIN" in line:
                fail(f"{rel(path)}:{lineno}: PEM material in an environment file; the [tls] "
                     f"keys name files under {TLS_DIR}")
            m = re.match(r"^\s*#?\s*(EDGESPEC__[A-Za-z0-9_]+)=(.*)$", line)
            if m:
                n += 1
                check_env_key(f"{rel(path)}:{lineno}", crate, m.group(1))
                check_env_value(f"{rel(path)}:{lineno}", m.group(1), m.group(2).strip())
            elif line.strip() and not line.lstrip().startswith("#") and "=" not in line:
                fail(f"{rel(path)}:{lineno}: not KEY=value")
        print(f"ok   {rel(path)}: {n} EDGESPEC__ variables checked against {crate}/default.toml")
    if len(domains) > 1:
        fail(f"deploy/config: the overlays disagree on tls.trust_domain ({domains}); every node "
             f"of a fleet must use the trust domain its certificates name")
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        crate = unit.stem.removeprefix("edgespec-")
        stop_timeout = None
        for lineno, line in enumerate(unit.read_text().splitlines(), 1):
            for m in re.finditer(r"\b(EDGESPEC__[A-Za-z0-9_]+)=(\S*)", line):
                if line.lstrip().startswith("Environment="):
                    check_env_key(f"{rel(unit)}:{lineno}", crate, m.group(1))
                    check_env_value(f"{rel(unit)}:{lineno}", m.group(1), m.group(2))
            stripped = line.strip()
            if stripped.startswith("#"):
                continue
            if crate == "verify-node" and re.match(r"ExecStop(Post)?=", stripped):
                fail(f"{rel(unit)}:{lineno}: no {stripped.split('=')[0]}= on the verify node: "
                     f"SIGTERM makes it drain itself over its own certificate (a curl to the "
                     f"admin API would need the fleet-wide admin token on the host)")
            if stripped.startswith("TimeoutStopSec="):
                value = stripped.split("=", 1)[1].strip()
                stop_timeout = float(value) if value.isdigit() else seconds(value)
        if crate == "verify-node":
            data = load_overlay("onprem-verify.toml")
            need = stop_budget("deploy/config/onprem-verify.toml", data) if data is not None else None
            if need is not None and (stop_timeout is None or stop_timeout < need):
                fail(f"{rel(unit)}: TimeoutStopSec= is {stop_timeout}s; a stopping verify node "
                     f"needs server.drain_timeout + 2 x server.shutdown_grace + {STOP_MARGIN_S}s "
                     f"= {need:g}s (deploy/config/onprem-verify.toml)")
            elif need is not None:
                print(f"ok   {rel(unit)}: TimeoutStopSec {stop_timeout:g}s >= drain + 2 x grace "
                      f"+ margin ({need:g}s); no ExecStop drain")
    check_ops.check_units()


# ---------------------------------------------------------------------------------------------
# ConfigMaps mirrored from deploy/config


def configmap_text(doc_name: str, component: str, source: str, key: str) -> str:
    body = (ROOT / source).read_text()
    return (
        f"# Generated from {source}; edit that file and run "
        f"`python3 deploy/tools/check_deploy.py sync`.\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
        f"  name: {doc_name}\n  labels:\n    app.kubernetes.io/name: edgespec\n"
        f"    app.kubernetes.io/component: {component}\n  annotations:\n"
        f"    # The data below is {source} verbatim (checked by tests/tests/deploy_manifests.rs).\n"
        f"    edgespec.dev/source: {source}\ndata:\n  {key}: |\n"
        + textwrap.indent(body, "    ")
    )


CONFIGMAPS = [
    # (file, name, component, source, key)
    ("base/coordinator-config.yaml", "edgespec-coordinator-config", "coordinator",
     "deploy/config/coordinator.toml", "coordinator.toml"),
    ("base/verify-node-config.yaml", "edgespec-verify-node-config", "verify-node",
     "deploy/config/cloud-verify.toml", "verify-node.toml"),
]


def cmd_sync() -> None:
    for f, name, comp, src, key in CONFIGMAPS:
        (K8S / f).write_text(configmap_text(name, comp, src, key))
        print(f"wrote deploy/k8s/{f} from {src}")


# ---------------------------------------------------------------------------------------------
# Kubernetes


def load_docs():
    import yaml

    docs = []  # (path, index, doc)
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))
    if not files:
        fail("deploy/k8s holds no YAML file")
    for path in files:
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{rel(path)}: not valid YAML: {e}")
            continue
        if not loaded:
            fail(f"{rel(path)}: holds no document")
        for i, d in enumerate(loaded):
            if not isinstance(d, dict):
                fail(f"{rel(path)}#{i}: not a mapping")
                continue
            docs.append((path, i, d))
    return files, docs


def where(path: Path, i: int, d: dict) -> str:
    return f"{rel(path)}#{i} ({d.get('kind')}/{(d.get('metadata') or {}).get('name')})"


def require(w: str, d: dict, dotted: str, types=None):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            fail(f"{w}: missing `{dotted}`")
            return None
        cur = cur[part]
    if types is not None and not isinstance(cur, types):
        fail(f"{w}: `{dotted}` must be {types}")
        return None
    return cur


def check_crd(w: str, api: str, kind: str, d: dict) -> None:
    if kind == "Kustomization":
        for field in d:
            if field not in {"apiVersion", "kind", "namespace", "resources", "images", "labels",
                             "commonLabels", "patches", "configMapGenerator", "secretGenerator",
                             "components", "namePrefix", "nameSuffix", "replicas"}:
                fail(f"{w}: unexpected Kustomization field `{field}`")
        return
    require(w, d, "metadata.name", str)
    if kind == "ScaledObject":
        spec = require(w, d, "spec", dict) or {}
        ref = require(w, d, "spec.scaleTargetRef.name", str)
        for k in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            if k in spec and not (isinstance(spec[k], int) and spec[k] >= 0):
                fail(f"{w}: spec.{k} must be a non-negative integer")
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            fail(f"{w}: minReplicaCount > maxReplicaCount")
        triggers = require(w, d, "spec.triggers", list) or []
        if not triggers:
            fail(f"{w}: no triggers")
        for t in triggers:
            md = t.get("metadata") or {}
            if t.get("type") == "prometheus":
                for k in ("serverAddress", "query", "threshold"):
                    if not isinstance(md.get(k), str) or not md.get(k):
                        fail(f"{w}: prometheus trigger needs metadata.{k} as a string")
                try:
                    float(md.get("threshold", "x"))
                except ValueError:
                    fail(f"{w}: threshold {md.get('threshold')!r} is not a number")
            if t.get("metricType") not in (None, "AverageValue", "Value", "Utilization"):
                fail(f"{w}: metricType {t.get('metricType')!r} is not one KEDA knows")
        if not any("edgespec_coordinator_cloud_demand" in ((t.get("metadata") or {}).get("query") or "")
                   for t in triggers if t.get("type") == "prometheus"):
            fail(f"{w}: no prometheus trigger reads edgespec_coordinator_cloud_demand")
        _ = ref
    elif kind in ("Issuer", "ClusterIssuer"):
        spec = require(w, d, "spec", dict) or {}
        types = [t for t in ("selfSigned", "ca", "acme", "vault", "venafi") if t in spec]
        if len(types) != 1:
            fail(f"{w}: an Issuer needs exactly one of selfSigned, ca, acme, vault, venafi "
                 f"(has {types})")
        if "ca" in spec and not isinstance((spec["ca"] or {}).get("secretName"), str):
            fail(f"{w}: spec.ca.secretName is required")
    elif kind in ("Certificate", "CertificateRequest"):
        if kind == "Certificate":
            require(w, d, "spec.secretName", str)
        else:
            require(w, d, "spec.request", str)
        require(w, d, "spec.issuerRef.name", str)
        spec = d.get("spec") or {}
        if kind == "Certificate" and not spec.get("isCA") and not spec.get("dnsNames") \
                and not spec.get("ipAddresses"):
            fail(f"{w}: a leaf certificate needs dnsNames (webpki ignores the common name)")
        for k in ("dnsNames", "ipAddresses", "uris", "usages"):
            if k in spec and not (isinstance(spec[k], list)
                                  and all(isinstance(x, str) and x for x in spec[k])):
                fail(f"{w}: spec.{k} must be a list of strings")
        if kind == "Certificate" and not spec.get("isCA"):
            ids = [u for u in spec.get("uris") or [] if str(u).startswith("spiffe://")]
            if len(ids) != 1:
                fail(f"{w}: a node certificate needs exactly one URI SAN "
                     f"spiffe://<trust-domain>/<role>/<node-id> (has {ids})")
            for u in ids:
                m = re.fullmatch(r"spiffe://[a-z0-9._-]+/(draft|verify|coordinator)/" + NODE_ID_RE,
                                 u)
                if not m:
                    fail(f"{w}: URI SAN {u!r} is not spiffe://<trust-domain>/<role>/<node-id> "
                         f"(role draft, verify or coordinator; node id of letters, digits, "
                         f"'.', '-', '_')")
        known = {"signing", "digital signature", "content commitment", "key encipherment",
                 "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
                 "decipher only", "any", "server auth", "client auth", "code signing",
                 "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                 "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
        for u in spec.get("usages") or []:
            if u not in known:
                fail(f"{w}: usage {u!r} is not one cert-manager knows")
        pk = spec.get("privateKey") or {}
        if pk.get("encoding", "PKCS1") not in ("PKCS1", "PKCS8"):
            fail(f"{w}: privateKey.encoding must be PKCS1 or PKCS8")
        if pk.get("algorithm", "RSA") not in ("RSA", "ECDSA", "Ed25519"):
            fail(f"{w}: privateKey.algorithm must be RSA, ECDSA or Ed25519")
        for k in ("duration", "renewBefore"):
            if k in spec and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s))+", str(spec[k])):
                fail(f"{w}: spec.{k} {spec[k]!r} is not a Go duration (e.g. 2160h)")
    elif kind == "PodMonitor":
        require(w, d, "spec.selector.matchLabels", dict)
        eps = require(w, d, "spec.podMetricsEndpoints", list) or []
        if not eps or not all(isinstance(e, dict) and e.get("port") for e in eps):
            fail(f"{w}: every podMetricsEndpoint needs a named `port`")
    elif kind == "PrometheusRule":
        for g in require(w, d, "spec.groups", list) or []:
            if not isinstance(g, dict) or not g.get("name") or not isinstance(g.get("rules"), list):
                fail(f"{w}: every group needs a name and rules")
                continue
            for r in g["rules"]:
                if not isinstance(r, dict) or not (r.get("alert") or r.get("record")) \
                        or not isinstance(r.get("expr"), str):
                    fail(f"{w}: group {g['name']}: every rule needs alert (or record) and expr")
                elif "for" in r and not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(r["for"])):
                    fail(f"{w}: rule {r.get('alert')}: `for` {r['for']!r} is not a duration")
    elif kind == "ScrapeConfig":
        for st in require(w, d, "spec.staticConfigs", list) or []:
            if not isinstance(st, dict) or not st.get("targets") or not all(
                    isinstance(t, str) and re.fullmatch(r"[\w.-]+:\d+", t)
                    for t in st["targets"]):
                fail(f"{w}: every staticConfig needs targets of the form host:port")
        if str((d.get("spec") or {}).get("scheme", "HTTP")).upper() not in ("HTTP", "HTTPS"):
            fail(f"{w}: spec.scheme must be HTTP or HTTPS")
    elif kind == "ServiceMonitor":
        require(w, d, "spec.selector.matchLabels", dict)
        eps = require(w, d, "spec.endpoints", list) or []
        if not eps or not all(isinstance(e, dict) and e.get("port") for e in eps):
            fail(f"{w}: every endpoint needs a named `port`")
        for e in eps:
            if e.get("scheme", "http") not in ("http", "https"):
                fail(f"{w}: endpoint scheme {e.get('scheme')!r} must be http or https")
            tls = e.get("tlsConfig") or {}
            for k in tls:
                if k not in {"ca", "cert", "keySecret", "serverName", "insecureSkipVerify",
                             "caFile", "certFile", "keyFile"}:
                    fail(f"{w}: unexpected tlsConfig field `{k}`")
            for k in ("ca", "cert"):
                src = tls.get(k)
                if src is not None and not (isinstance(src, dict) and len(src) == 1
                                            and set(src) <= {"secret", "configMap"}
                                            and (src.get("secret") or src.get("configMap") or {})
                                            .get("name") and (src.get("secret")
                                                              or src.get("configMap")).get("key")):
                    fail(f"{w}: tlsConfig.{k} must be {{secret|configMap: {{name, key}}}}")


def pod_spec(d: dict):
    if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return ((d.get("spec") or {}).get("template") or {}).get("spec")
    return None


def pod_labels(d: dict) -> dict:
    return (((d.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_keys(by_kind: dict, name) -> set | None:
    """Keys of Secret `name`, from its manifest or from a cert-manager Certificate that issues
    it (ca.crt, tls.crt, tls.key); None when nothing defines it."""
    keys = None
    sec = by_kind.get("Secret", {}).get(name)
    if sec is not None:
        keys = set((sec[2].get("stringData") or {})) | set(sec[2].get("data") or {})
    for _p, _i, c in by_kind.get("Certificate", {}).values():
        if (c.get("spec") or {}).get("secretName") == name:
            keys = (keys or set()) | {"ca.crt", "tls.crt", "tls.key"}
    return keys


def overlay_of(spec: dict, c: dict) -> tuple[str | None, dict | None]:
    """The deploy/config overlay whose ConfigMap the container mounts at /etc/edgespec."""
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        cm = (volumes.get(m.get("name")) or {}).get("configMap") or {}
        if m.get("mountPath") == "/etc/edgespec":
            src = next((src for _f, n, _c, src, _k in CONFIGMAPS if n == cm.get("name")), None)
            if src is not None:
                return src, load_overlay(Path(src).name)
    return None, None


def check_tls_mounts(by_kind: dict, w: str, spec: dict, c: dict, crate: str) -> dict | None:
    """The container's overlay (its ConfigMap mounted at /etc/edgespec) names TLS files that a
    read-only volume at TLS_DIR provides: Secret edgespec-coordinator-tls for the coordinators, a
    csi.cert-manager.io volume (one certificate per pod) for the verify pods. Returns the csi
    volume's attributes (verify pods) for the identity checks."""
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = c.get("volumeMounts") or []
    source, data = overlay_of(spec, c)
    if source is None:
        fail(f"{w}: no ConfigMap generated from deploy/config is mounted at /etc/edgespec")
        return None
    if data is None:
        fail(f"{w}: cannot read {source}")
        return None
    tls = effective(crate, data).get("tls") or {}
    tls_mount = next((m for m in mounts if m.get("mountPath") == TLS_DIR), None)
    if tls_mount is None:
        fail(f"{w}: nothing is mounted at {TLS_DIR} ({source} [tls] names files there)")
        return None
    if not tls_mount.get("readOnly"):
        fail(f"{w}: the TLS mount at {TLS_DIR} must be readOnly")
    vol = volumes.get(tls_mount.get("name")) or {}
    files: dict[str, str] = {}  # file name in the volume -> where it comes from
    attrs = None
    if crate == "coordinator":
        name = (vol.get("secret") or {}).get("secretName")
        if name != COORDINATOR_TLS_SECRET:
            fail(f"{w}: the volume mounted at {TLS_DIR} must be Secret {COORDINATOR_TLS_SECRET} "
                 f"(the coordinators' certificate, role coordinator; is {name or vol})")
            return None
        mode = (vol.get("secret") or {}).get("defaultMode", 0o644)
        if mode & 0o007:
            fail(f"{w}: Secret {name} is mounted with defaultMode {mode:#o}; the key must not be "
                 f"world-readable (0440 with the pod's fsGroup)")
        if mode & 0o077 and "fsGroup" not in (spec.get("securityContext") or {}):
            fail(f"{w}: a group-readable TLS secret needs the pod's securityContext.fsGroup")
        keys = secret_keys(by_kind, name) or set()
        items = {i.get("path"): i.get("key") for i in (vol.get("secret") or {}).get("items") or []}
        for f in TLS_FILES.values():
            key = items.get(f, f) if items else f
            if (not items or f in items) and key in keys:
                files[f] = f"Secret {name} key {key}"
    else:
        csi = vol.get("csi") or {}
        if csi.get("driver") != CSI_DRIVER:
            fail(f"{w}: the volume mounted at {TLS_DIR} must be a {CSI_DRIVER} csi volume (each "
                 f"pod its own certificate, role {ROLES[crate]}; is {vol})")
            return None
        if not csi.get("readOnly"):
            fail(f"{w}: the {CSI_DRIVER} volume must be readOnly: true (the driver refuses "
                 f"writable volumes)")
        attrs = csi.get("volumeAttributes") or {}
        for key, default in CSI_FILES.items():
            files[attrs.get(key, default)] = f"{CSI_DRIVER} {key}"
        group = attrs.get("csi.cert-manager.io/fs-group")
        want = (spec.get("securityContext") or {}).get("runAsGroup")
        if group is None or str(want) != str(group):
            fail(f"{w}: csi.cert-manager.io/fs-group must be the pod's runAsGroup ({want}) so "
                 f"the node can read its key (is {group!r})")
        if attrs.get("csi.cert-manager.io/key-encoding", "PKCS1") not in ("PKCS1", "PKCS8"):
            fail(f"{w}: csi.cert-manager.io/key-encoding must be PKCS1 or PKCS8")
        for k in ("csi.cert-manager.io/duration", "csi.cert-manager.io/renew-before"):
            if k in attrs and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s))+", str(attrs[k])):
                fail(f"{w}: {k} {attrs[k]!r} is not a Go duration (e.g. 2160h)")
        for k, v in attrs.items():
            if not isinstance(v, str):
                fail(f"{w}: volumeAttributes {k} must be a string (quote it)")
    for key in TLS_FILES:
        path = tls.get(key, "")
        if not path.startswith(TLS_DIR + "/"):
            fail(f"{w}: {source} tls.{key} = {path!r} is not in the mounted {TLS_DIR}")
            continue
        file = path[len(TLS_DIR) + 1:]
        if file not in files:
            fail(f"{w}: {source} tls.{key} names {file}, which the volume at {TLS_DIR} does not "
                 f"provide (it provides {sorted(files)})")
    return attrs


def cert_hosts(eff: dict) -> list:
    """The hosts a node dials (coordinator.address / coordinator.addresses)."""
    co = eff.get("coordinator") or {}
    addrs = co.get("addresses") if "addresses" in co else [co.get("address")]
    return [re.sub(r"^[a-z]+://", "", a or "").rsplit(":", 1)[0] for a in addrs or [] if a]


def check_certificate_names(by_kind: dict, replicas: int, cloud_addresses: list,
                            verify_attrs: dict | None, vw: str) -> dict | None:
    """One identity per role. The coordinators' Certificate (Secret edgespec-coordinator-tls)
    carries spiffe://<td>/coordinator/<name> and names everything the coordinators are dialled
    as; each verify pod's csi volume asks for spiffe://<td>/verify/${POD_NAME} and the name the
    coordinators check (their tls.server_name). Returns the coordinators' Certificate spec."""
    certs = [c for c in by_kind.get("Certificate", {}).values()
             if (c[2].get("spec") or {}).get("secretName") == COORDINATOR_TLS_SECRET]
    if len(certs) != 1:
        fail(f"exactly one cert-manager Certificate must issue Secret {COORDINATOR_TLS_SECRET} "
             f"(deploy/k8s/secrets); found {len(certs)}")
        return None
    cert = certs[0]
    cw = where(*cert)
    spec = cert[2].get("spec") or {}
    names = set(spec.get("dnsNames") or [])
    usages = set(spec.get("usages") or [])
    if not TLS_USAGES <= usages:
        fail(f"{cw}: usages must include {sorted(TLS_USAGES)} (the coordinators serve and dial)")
    issuer = (spec.get("issuerRef") or {})
    if issuer.get("name") not in by_kind.get(issuer.get("kind", "Issuer"), {}):
        fail(f"{cw}: issuerRef {issuer.get('kind', 'Issuer')}/{issuer.get('name')} is not defined")
    coord_data = load_overlay("coordinator.toml") or {}
    td = trust_domain("coordinator", coord_data)
    ids = spiffe_ids(spec.get("uris"), td)
    if [r for r, _ in ids] != ["coordinator"]:
        fail(f"{cw}: uris must hold exactly one spiffe://{td}/coordinator/<name> (the trust "
             f"domain of deploy/config/coordinator.toml); has {spec.get('uris')}")
    wanted = []  # (name, why)
    coord_server_name = ""
    for overlay, crate in OVERLAYS.items():
        data = load_overlay(overlay)
        if data is None:
            continue
        eff = effective(crate, data)
        server_name = (eff.get("tls") or {}).get("server_name", "")
        if crate == "coordinator":
            if not server_name:
                fail(f"deploy/config/{overlay}: tls.server_name must be set: cloud verify pods "
                     f"advertise their pod IP, which no certificate names")
            coord_server_name = server_name
            continue
        if server_name:
            wanted.append((server_name, f"tls.server_name of deploy/config/{overlay}"))
        else:
            hosts = cert_hosts(eff)
            if overlay == "cloud-verify.toml":
                hosts = [re.sub(r"^[a-z]+://", "", a).rsplit(":", 1)[0] for a in cloud_addresses]
            for host in hosts:
                wanted.append((host, f"dialled by deploy/config/{overlay} (tls.server_name empty)"))
        if overlay == "onprem-verify.toml":
            n = len(cert_hosts(eff))
            if n != replicas:
                fail(f"deploy/config/{overlay}: coordinator.addresses lists {n} coordinators, the "
                     f"StatefulSet has {replicas} replicas")
    for name, why in wanted:
        if name not in names:
            fail(f"{cw}: dnsNames lack {name!r} ({why})")
    if coord_server_name and coord_server_name in names:
        fail(f"{cw}: dnsNames include {coord_server_name!r}, the name the coordinators check in "
             f"VERIFY nodes' certificates (tls.server_name of deploy/config/coordinator.toml): "
             f"it belongs in the verify nodes' certificates only")
    if verify_attrs is not None:
        vtd = trust_domain("verify-node", load_overlay("cloud-verify.toml") or {})
        uris = [u.strip() for u in verify_attrs.get("csi.cert-manager.io/uri-sans", "").split(",")
                if u.strip()]
        want_uri = f"spiffe://{vtd}/verify/${{POD_NAME}}"
        if uris != [want_uri]:
            fail(f"{vw}: csi.cert-manager.io/uri-sans must be exactly {want_uri!r} (role verify, "
                 f"node id = pod name; trust domain of deploy/config/cloud-verify.toml); is {uris}")
        dns = [n.strip() for n in verify_attrs.get("csi.cert-manager.io/dns-names", "").split(",")
               if n.strip()]
        if coord_server_name and coord_server_name not in dns:
            fail(f"{vw}: csi.cert-manager.io/dns-names must include {coord_server_name!r} (the "
                 f"coordinators' tls.server_name; they dial verify pods by IP); is {dns}")
        for n in dns:
            if n in names:
                fail(f"{vw}: csi.cert-manager.io/dns-names include {n!r}, a name of the "
                     f"coordinators' certificate: a verify pod must not be able to pass for one")
        usages = {u.strip() for u in verify_attrs.get(
            "csi.cert-manager.io/key-usages", "digital signature,key encipherment").split(",")}
        if not TLS_USAGES <= usages:
            fail(f"{vw}: csi.cert-manager.io/key-usages must include {sorted(TLS_USAGES)} (a "
                 f"verify node serves the coordinators and dials them); is {sorted(usages)}")
        kind = verify_attrs.get("csi.cert-manager.io/issuer-kind", "Issuer")
        iname = verify_attrs.get("csi.cert-manager.io/issuer-name")
        issuer = by_kind.get(kind, {}).get(iname)
        if issuer is None:
            fail(f"{vw}: csi.cert-manager.io/issuer-name {kind}/{iname} is not defined")
        elif "selfSigned" in (issuer[2].get("spec") or {}):
            fail(f"{vw}: the csi-driver cannot use a selfSigned issuer ({kind}/{iname})")
        elif iname != issuer_of_coordinators(spec):
            fail(f"{vw}: the verify pods' issuer {iname} differs from the coordinators' "
                 f"({issuer_of_coordinators(spec)}): both must chain to the one fleet CA")
    return spec


def issuer_of_coordinators(spec: dict):
    return (spec.get("issuerRef") or {}).get("name")


def check_cross_refs(docs) -> None:
    by_kind: dict[str, dict[str, tuple]] = {}
    for path, i, d in docs:
        by_kind.setdefault(d.get("kind"), {})[(d.get("metadata") or {}).get("name")] = (path, i, d)
    workloads = [x for k in ("Deployment", "StatefulSet") for x in by_kind.get(k, {}).values()]

    for path, i, d in workloads:
        w = where(path, i, d)
        sel = ((d.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not matches(sel, pod_labels(d)):
            fail(f"{w}: spec.selector.matchLabels {sel} does not match the pod template labels")
        spec = pod_spec(d) or {}
        crate_ports = {}
        for c in spec.get("containers") or []:
            cw = f"{w} container {c.get('name')}"
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            crate_ports.update(ports)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                pr = c.get(probe) or {}
                for kind in ("httpGet", "grpc", "tcpSocket"):
                    if kind in pr:
                        port = pr[kind].get("port")
                        if port not in ports and port not in ports.values():
                            fail(f"{cw}: {probe} uses port {port!r}, not a container port")
            crate = CONTAINERS.get(c.get("name"))
            for e in c.get("env") or []:
                name = e.get("name", "")
                if name.startswith("EDGESPEC__"):
                    if crate is None:
                        fail(f"{cw}: sets {name} but the container name maps to no crate "
                             f"({', '.join(CONTAINERS)})")
                    else:
                        check_env_key(cw, crate, name)
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    sec = by_kind.get("Secret", {}).get(ref.get("name"))
                    if sec is None:
                        fail(f"{cw}: env {name} reads Secret {ref.get('name')}, which no manifest "
                             f"(deploy/k8s/secrets templates included) defines")
                    else:
                        keys = set((sec[2].get("stringData") or {})) | set(sec[2].get("data") or {})
                        if ref.get("key") not in keys:
                            fail(f"{cw}: Secret {ref.get('name')} has no key {ref.get('key')}")
        for v in spec.get("volumes") or []:
            if "configMap" in v and v["configMap"].get("name") not in by_kind.get("ConfigMap", {}):
                fail(f"{w}: volume {v.get('name')} names ConfigMap {v['configMap'].get('name')}, "
                     f"which is not defined")
            if "secret" in v:
                name = (v["secret"] or {}).get("secretName")
                keys = secret_keys(by_kind, name)
                if keys is None:
                    fail(f"{w}: volume {v.get('name')} names Secret {name}, which neither a "
                         f"manifest nor a cert-manager Certificate (deploy/k8s/secrets templates "
                         f"included) defines")
                for item in (v["secret"] or {}).get("items") or []:
                    if keys is not None and item.get("key") not in keys:
                        fail(f"{w}: volume {v.get('name')}: Secret {name} has no key "
                             f"{item.get('key')}")
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"].get("claimName")
                if claim not in by_kind.get("PersistentVolumeClaim", {}):
                    fail(f"{w}: volume {v.get('name')} names PVC {claim}, which is not defined")
        if d.get("kind") == "StatefulSet":
            svc = by_kind.get("Service", {}).get((d.get("spec") or {}).get("serviceName"))
            if svc is None or (svc[2].get("spec") or {}).get("clusterIP") != "None":
                fail(f"{w}: serviceName must name a headless Service defined here")

    for kind in ("Service", "PodDisruptionBudget"):
        for path, i, d in by_kind.get(kind, {}).values():
            w = where(path, i, d)
            spec = d.get("spec") or {}
            sel = spec.get("selector") or {}
            if kind == "PodDisruptionBudget":
                sel = sel.get("matchLabels") or {}
            extra = {"statefulset.kubernetes.io/pod-name"}
            base_sel = {k: v for k, v in sel.items() if k not in extra}
            targets = [x for x in workloads if matches(base_sel, pod_labels(x[2]))]
            if not targets:
                fail(f"{w}: selector {sel} matches no Deployment/StatefulSet pods")
                continue
            if "statefulset.kubernetes.io/pod-name" in sel:
                pod = sel["statefulset.kubernetes.io/pod-name"]
                ok = any(x[2]["kind"] == "StatefulSet" and re.fullmatch(
                    re.escape(x[2]["metadata"]["name"]) + r"-(\d+)", pod) and int(pod.rsplit("-", 1)[1])
                    < (x[2]["spec"].get("replicas", 1)) for x in targets)
                if not ok:
                    fail(f"{w}: selects pod {pod}, which no StatefulSet replica will be")
            if kind == "Service":
                names = {p.get("name") for x in targets for c in pod_spec(x[2]).get("containers") or []
                         for p in c.get("ports") or []}
                for p in spec.get("ports") or []:
                    tp = p.get("targetPort")
                    if isinstance(tp, str) and tp not in names:
                        fail(f"{w}: port {p.get('name')} targets `{tp}`, not a named port of "
                             f"its pods ({sorted(names)})")

    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for path, i, d in by_kind.get(kind, {}).values():
            ref = (d.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("name") not in by_kind.get(ref.get("kind", "Deployment"), {}):
                fail(f"{where(path, i, d)}: scaleTargetRef {ref.get('kind', 'Deployment')}/"
                     f"{ref.get('name')} is not defined")

    # ConfigMaps mirrored from deploy/config must match their source byte for byte.
    for f, name, _comp, src, key in CONFIGMAPS:
        cm = by_kind.get("ConfigMap", {}).get(name)
        if cm is None:
            fail(f"ConfigMap {name} (deploy/k8s/{f}) is missing")
            continue
        ann = ((cm[2].get("metadata") or {}).get("annotations") or {}).get("edgespec.dev/source")
        if ann != src:
            fail(f"{where(*cm)}: annotation edgespec.dev/source should be {src}")
        if (cm[2].get("data") or {}).get(key) != (ROOT / src).read_text():
            fail(f"{where(*cm)}: data.{key} differs from {src}; run "
                 f"`python3 deploy/tools/check_deploy.py sync`")

    # Fleet wiring: verify pods must know every coordinator replica, by its stable DNS name.
    coord = by_kind.get("StatefulSet", {}).get("edgespec-coordinator")
    verify = by_kind.get("Deployment", {}).get("edgespec-verify-node")
    if coord is None or verify is None:
        fail("StatefulSet edgespec-coordinator and Deployment edgespec-verify-node must exist")
        return
    cs = coord[2]["spec"]
    replicas = cs.get("replicas", 1)
    if replicas < 2:
        fail(f"{where(*coord)}: replicas must be >= 2 (got {replicas})")
    peers = cs.get("serviceName")
    want_grpc = [f"https://edgespec-coordinator-{n}.{peers}:50051" for n in range(replicas)]
    vspec = pod_spec(verify[2])
    c = next((c for c in vspec.get("containers") or [] if c.get("name") == "verify-node"), None)
    if c is None:
        fail(f"{where(*verify)}: no container named verify-node")
        return
    env = {e["name"]: e for e in c.get("env") or []}
    vw = where(*verify)
    got = (env.get("EDGESPEC__COORDINATOR__ADDRESSES") or {}).get("value", "").split(",")
    if got != want_grpc:
        fail(f"{vw}: EDGESPEC__COORDINATOR__ADDRESSES is {got}, expected one entry per "
             f"coordinator replica: {want_grpc}")
    for name, value in (("EDGESPEC__SERVER__POOL", "cloud"),
                        ("EDGESPEC__SERVER__ADVERTISE_ADDR", "https://$(POD_IP):50061")):
        if (env.get(name) or {}).get("value") != value:
            fail(f"{vw}: {name} must be {value!r}")
    # The node id is the pod name, as in the pod's certificate (or left to the certificate).
    node_id = env.get("EDGESPEC__SERVER__NODE_ID")
    if node_id is not None and node_id.get("value", "") not in ("", "$(POD_NAME)"):
        fail(f"{vw}: EDGESPEC__SERVER__NODE_ID must be $(POD_NAME) (the node id in the pod's "
             f"certificate, spiffe://.../verify/${{POD_NAME}}) or unset; is {node_id}")
    # The verify pods drain themselves on SIGTERM over their own certificate: no admin API
    # client, no fleet-wide admin token on GPU pods, no preStop hook.
    for stale in ("COORDINATOR_ADMIN_URLS", "ADMIN_TOKEN"):
        if stale in env:
            fail(f"{vw}: env {stale} is left over from the preStop drain; the node drains itself "
                 f"on SIGTERM (remove it)")
    for ctr in (vspec.get("containers") or []) + (vspec.get("initContainers") or []):
        cw = f"{vw} container {ctr.get('name')}"
        for e in ctr.get("env") or []:
            if ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") == ADMIN_TOKEN_SECRET:
                fail(f"{cw}: env {e.get('name')} reads Secret {ADMIN_TOKEN_SECRET}: verify pods "
                     f"must not carry the fleet-wide admin token")
        for e in ctr.get("envFrom") or []:
            if (e.get("secretRef") or {}).get("name") == ADMIN_TOKEN_SECRET:
                fail(f"{cw}: envFrom reads Secret {ADMIN_TOKEN_SECRET}: verify pods must not "
                     f"carry the fleet-wide admin token")
        if (ctr.get("lifecycle") or {}).get("preStop"):
            fail(f"{cw}: no preStop hook: on SIGTERM the node drains itself (heartbeat "
                 f"draining = true over its own certificate); a hook only delays that")
    for v in vspec.get("volumes") or []:
        if (v.get("secret") or {}).get("secretName") == ADMIN_TOKEN_SECRET:
            fail(f"{vw}: volume {v.get('name')} mounts Secret {ADMIN_TOKEN_SECRET}: verify pods "
                 f"must not carry the fleet-wide admin token")
    for name, path_ in (("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP")):
        if ((env.get(name) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != path_:
            fail(f"{vw}: {name} must come from the downward API ({path_})")
    if ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu") != 1:
        fail(f"{vw}: must request nvidia.com/gpu: 1 in limits")
    # Probes: the kubelet cannot present a client certificate, so they go to the plaintext
    # health-only listener of cloud-verify.toml, never to the mTLS Verifier port.
    cloud = effective("verify-node", load_overlay("cloud-verify.toml") or {})
    health = (cloud.get("server") or {}).get("health_listen", "")
    health_port = int(health.rsplit(":", 1)[1]) if re.fullmatch(r".+:\d+", health) else None
    grpc_port = int(str((cloud.get("server") or {}).get("listen", ":0")).rsplit(":", 1)[1])
    if health_port is None:
        fail("deploy/config/cloud-verify.toml: server.health_listen must be set (host:port) for "
             "the kubelet's gRPC probes")
    else:
        if health_port == grpc_port:
            fail("deploy/config/cloud-verify.toml: server.health_listen must differ from "
                 "server.listen")
        if health_port not in [p.get("containerPort") for p in c.get("ports") or []]:
            fail(f"{vw}: the health port {health_port} (server.health_listen) is not a "
                 f"container port")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            g = (c.get(probe) or {}).get("grpc")
            if not g or g.get("port") != health_port or g.get("service") != VERIFIER_SERVICE:
                fail(f"{vw}: {probe} must be a grpc probe on the plaintext health port "
                     f"{health_port} with service {VERIFIER_SERVICE} (got {g})")
    if not any(m.get("mountPath") == "/models" and m.get("readOnly") for m in c.get("volumeMounts") or []):
        fail(f"{vw}: the model volume must be mounted read-only at /models")
    grace = vspec.get("terminationGracePeriodSeconds", 30)
    need = stop_budget("deploy/config/cloud-verify.toml", load_overlay("cloud-verify.toml") or {})
    if need is not None and grace < need:
        fail(f"{vw}: terminationGracePeriodSeconds {grace} is shorter than server.drain_timeout + "
             f"2 x server.shutdown_grace + {STOP_MARGIN_S}s = {need:g}s "
             f"(deploy/config/cloud-verify.toml)")
    verify_attrs = check_tls_mounts(by_kind, vw, vspec, c, "verify-node")
    cc = next(iter(pod_spec(coord[2]).get("containers") or []), {})
    cw = where(*coord)
    check_tls_mounts(by_kind, cw, pod_spec(coord[2]), cc, "coordinator")
    coord_cert = check_certificate_names(
        by_kind, replicas,
        (env.get("EDGESPEC__COORDINATOR__ADDRESSES") or {}).get("value", "").split(","),
        verify_attrs, vw)
    # The admin port serves HTTPS with the coordinators' certificate unless tls.mode is
    # plaintext or admin.plaintext = true: probes and scrapers must say https.
    coord_eff = effective("coordinator", load_overlay("coordinator.toml") or {})
    admin_https = ((coord_eff.get("tls") or {}).get("mode") == "mtls"
                   and not (coord_eff.get("admin") or {}).get("plaintext", False))
    scheme = "HTTPS" if admin_https else "HTTP"
    admin_port = int(str((coord_eff.get("admin") or {}).get("listen", ":9464")).rsplit(":", 1)[1])
    coord_ports = {p.get("name"): p.get("containerPort") for p in cc.get("ports") or []}
    # Readiness must not wait for a verify node: /readyz answers 503 until one is up, which with
    # the cloud pool at zero and no on-prem verify node would leave the draft-facing Services
    # without endpoints, so no block is ever refused and the pool never scales up.
    for probe, path_ in (("readinessProbe", "/healthz"), ("livenessProbe", "/healthz")):
        get = (cc.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path_:
            fail(f"{cw}: {probe} must be httpGet {path_}"
                 + (" (not /readyz: it is 503 while no verify node is up, which deadlocks a "
                    "cloud pool scaled to zero)" if probe == "readinessProbe" else ""))
        if get.get("scheme", "HTTP") != scheme:
            fail(f"{cw}: {probe} must use scheme: {scheme} (the admin port serves "
                 f"{scheme} with tls.mode = {(coord_eff.get('tls') or {}).get('mode')!r}, "
                 f"admin.plaintext = {(coord_eff.get('admin') or {}).get('plaintext', False)})")
        if coord_ports.get(get.get("port"), get.get("port")) != admin_port:
            fail(f"{cw}: {probe} must go to the admin port {admin_port} (admin.listen)")
    for svc in by_kind.get("Service", {}).values():
        if not matches((svc[2].get("spec") or {}).get("selector") or {}, pod_labels(coord[2])):
            continue
        for port in (svc[2].get("spec") or {}).get("ports") or []:
            if port.get("targetPort") in ("admin", admin_port) and \
                    port.get("appProtocol", scheme.lower()) != scheme.lower():
                fail(f"{where(*svc)}: port {port.get('name')} appProtocol must be "
                     f"{scheme.lower()} (the admin port serves {scheme})")
    for sm in by_kind.get("ServiceMonitor", {}).values():
        smw = where(*sm)
        for e in (sm[2].get("spec") or {}).get("endpoints") or []:
            if e.get("port") != "admin":
                continue
            if e.get("scheme", "http") != scheme.lower():
                fail(f"{smw}: endpoint admin must scrape with scheme: {scheme.lower()}")
            if not admin_https:
                continue
            tls = e.get("tlsConfig") or {}
            if tls.get("insecureSkipVerify"):
                fail(f"{smw}: tlsConfig.insecureSkipVerify: check the coordinators' certificate "
                     f"against the fleet CA instead")
            ca = (tls.get("ca") or {}).get("secret") or {}
            if (ca.get("name"), ca.get("key")) != (COORDINATOR_TLS_SECRET, "ca.crt") \
                    and not (tls.get("ca") or {}).get("configMap"):
                fail(f"{smw}: tlsConfig.ca must be the fleet CA (Secret {COORDINATOR_TLS_SECRET} "
                     f"key ca.crt, or a ConfigMap bundle); is {tls.get('ca')}")
            names = set((coord_cert or {}).get("dnsNames") or [])
            if tls.get("serverName") not in names:
                fail(f"{smw}: tlsConfig.serverName {tls.get('serverName')!r} must be a DNS name of "
                     f"the coordinators' certificate ({sorted(names)}): Prometheus scrapes pod IPs")
    check_network_policies(by_kind, coord, verify, c, cc)
    for kind in ("PodDisruptionBudget",):
        for target in (coord, verify):
            if not any(matches(((p[2].get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                               pod_labels(target[2])) for p in by_kind.get(kind, {}).values()):
                fail(f"{where(*target)}: no PodDisruptionBudget covers it")
    check_ops.check_k8s(by_kind, coord, verify)


def np_selects(np: dict, labels: dict) -> bool:
    sel = (np.get("spec") or {}).get("podSelector") or {}
    return all(labels.get(k) == v for k, v in (sel.get("matchLabels") or {}).items())


def ingress_peers(by_kind: dict, labels: dict, number: int, name: str | None) -> list:
    """Who may connect to TCP port `number` (container port `name`) of pods with `labels`:
    [(policy, peer)], peer None meaning anyone. Empty: nobody (default deny)."""
    out = []
    for np in by_kind.get("NetworkPolicy", {}).values():
        spec = np[2].get("spec") or {}
        types = spec.get("policyTypes") or ["Ingress"]
        if "Ingress" not in types or not np_selects(np[2], labels):
            continue
        for rule in spec.get("ingress") or []:
            ports = rule.get("ports") or []
            hit = not ports or any(
                p.get("protocol", "TCP") == "TCP" and (
                    p.get("port") is None or p.get("port") == name
                    or (isinstance(p.get("port"), int)
                        and p["port"] <= number <= p.get("endPort", p["port"])))
                for p in ports)
            if not hit:
                continue
            peers = rule.get("from") or []
            out.extend((np, peer) for peer in peers) if peers else out.append((np, None))
    return out


def peer_kind(peer) -> str:
    if peer is None:
        return "anyone"
    if "ipBlock" in peer:
        return "ipBlock"
    if "namespaceSelector" in peer:
        return "namespace"
    return "pod"


def check_network_policies(by_kind: dict, coord, verify, vc: dict, cc: dict) -> None:
    """Default-deny ingress, and each edgespec port open to exactly the peers that need it."""
    nps = by_kind.get("NetworkPolicy", {})
    if not nps:
        fail("deploy/k8s: no NetworkPolicy (base/networkpolicy.yaml: default-deny ingress plus "
             "one policy per edgespec port)")
        return
    workloads = [x for k in ("Deployment", "StatefulSet") for x in by_kind.get(k, {}).values()]
    deny = [np for np in nps.values()
            if not ((np[2].get("spec") or {}).get("podSelector") or {})
            and "Ingress" in ((np[2].get("spec") or {}).get("policyTypes") or [])
            and not (np[2].get("spec") or {}).get("ingress")]
    if not deny:
        fail("deploy/k8s: no default-deny ingress NetworkPolicy (podSelector {}, policyTypes "
             "[Ingress], no ingress rules)")
    for np in nps.values():
        w = where(*np)
        spec = np[2].get("spec") or {}
        if (spec.get("podSelector") or {}).get("matchExpressions"):
            fail(f"{w}: use podSelector.matchLabels (matchExpressions are not checked here)")
        selected = [x for x in workloads if np_selects(np[2], pod_labels(x[2]))]
        if (spec.get("podSelector") or {}).get("matchLabels") and not selected:
            fail(f"{w}: podSelector matches no Deployment/StatefulSet pods")
        ports = {(p.get("name"), p.get("containerPort")) for x in selected
                 for ctr in pod_spec(x[2]).get("containers") or [] for p in ctr.get("ports") or []}
        for rule in spec.get("ingress") or []:
            for p in rule.get("ports") or []:
                if p.get("port") is not None and not any(p.get("port") in pair for pair in ports):
                    fail(f"{w}: port {p.get('port')} is not a container port of the pods it "
                         f"selects ({sorted(n for n, _ in ports)})")
            for peer in rule.get("from") or []:
                blk = peer.get("ipBlock")
                if blk is None:
                    continue
                try:
                    net = ipaddress.ip_network(blk.get("cidr", ""), strict=True)
                    for e in blk.get("except") or []:
                        if not ipaddress.ip_network(e, strict=True).subnet_of(net):
                            fail(f"{w}: ipBlock except {e} is not inside {net}")
                except (ValueError, TypeError) as e:
                    fail(f"{w}: ipBlock {blk}: {e}")

    vlabels, clabels = pod_labels(verify[2]), pod_labels(coord[2])
    vw, cw = where(*verify), where(*coord)

    def port_of(overlay: str, crate: str, section: str, key: str, default: str) -> int:
        eff = effective(crate, load_overlay(overlay) or {})
        return int(str((eff.get(section) or {}).get(key, default)).rsplit(":", 1)[1])

    def name_of(ctr: dict, number: int):
        return next((p.get("name") for p in ctr.get("ports") or []
                     if p.get("containerPort") == number), None)

    def cidrs(peers) -> list:
        return [ipaddress.ip_network(p["ipBlock"]["cidr"], strict=False)
                for _np, p in peers if peer_kind(p) == "ipBlock"
                and re.fullmatch(r"[0-9a-fA-F.:]+/\d+", str(p["ipBlock"].get("cidr", "")))]

    def covered(net, nets) -> bool:
        return any(net.version == n.version and net.subnet_of(n) for n in nets)

    def show(peers) -> str:
        return ", ".join(f"{(np[2].get('metadata') or {}).get('name')}: {peer}"
                         for np, peer in peers) or "nobody"

    # Verify pods' Verifier: only the coordinator pods.
    vgrpc = port_of("cloud-verify.toml", "verify-node", "server", "listen", ":50061")
    peers = ingress_peers(by_kind, vlabels, vgrpc, name_of(vc, vgrpc))
    if not peers:
        fail(f"{vw}: no NetworkPolicy admits the coordinators to the Verifier port {vgrpc}")
    for np, peer in peers:
        sel = ((peer or {}).get("podSelector") or {}).get("matchLabels") or {}
        if peer_kind(peer) != "pod" or not matches(sel, clabels) or matches(sel, vlabels):
            fail(f"{where(*np)}: admits {peer or 'anyone'} to the verify pods' Verifier port "
                 f"{vgrpc}; only the coordinator pods (podSelector {clabels}) may connect")
    # Verify pods' plaintext health port: only the kubelet (node CIDR).
    health = str(effective("verify-node", load_overlay("cloud-verify.toml") or {})
                 .get("server", {}).get("health_listen", ""))
    probe_nets = []
    if re.fullmatch(r".+:\d+", health):
        hport = int(health.rsplit(":", 1)[1])
        peers = ingress_peers(by_kind, vlabels, hport, name_of(vc, hport))
        if not peers:
            fail(f"{vw}: no NetworkPolicy admits the kubelet's probes (the node CIDR) to the "
                 f"health port {hport}")
        for np, peer in peers:
            if peer_kind(peer) != "ipBlock":
                fail(f"{where(*np)}: admits {peer or 'anyone'} to the plaintext health port "
                     f"{hport}; only the kubelet's probes (an ipBlock of the node CIDR) may")
        probe_nets = cidrs(peers)
    # Coordinators' gRPC: the verify pods and the on-prem ranges (draft and verify nodes).
    cgrpc = port_of("coordinator.toml", "coordinator", "grpc", "listen", ":50051")
    peers = ingress_peers(by_kind, clabels, cgrpc, name_of(cc, cgrpc))
    kinds = [peer_kind(p) for _np, p in peers]
    if not any(peer_kind(p) == "pod" and matches((p.get("podSelector") or {}).get("matchLabels")
                                                 or {}, vlabels) for _np, p in peers):
        fail(f"{cw}: no NetworkPolicy admits the verify pods to the coordinators' gRPC port "
             f"{cgrpc} (registration, heartbeats, their drain on SIGTERM); admitted: {show(peers)}")
    if "ipBlock" not in kinds:
        fail(f"{cw}: no NetworkPolicy admits the on-prem draft and verify nodes (an ipBlock of "
             f"the sites' ranges) to the coordinators' gRPC port {cgrpc}")
    for np, peer in peers:
        if peer_kind(peer) not in ("pod", "ipBlock"):
            fail(f"{where(*np)}: admits {peer or 'anyone'} to the coordinators' gRPC port "
                 f"{cgrpc}; only the verify pods and the on-prem ranges may connect")
    grpc_nets = cidrs(peers)
    for svc in by_kind.get("Service", {}).values():
        sspec = svc[2].get("spec") or {}
        if sspec.get("type") != "LoadBalancer" or not matches(
                {k: v for k, v in (sspec.get("selector") or {}).items()
                 if k != "statefulset.kubernetes.io/pod-name"}, clabels):
            continue
        if sspec.get("externalTrafficPolicy") != "Local":
            fail(f"{where(*svc)}: externalTrafficPolicy must be Local, or the coordinators see "
                 f"node addresses instead of the on-prem clients' and the NetworkPolicy's ipBlock "
                 f"does not apply")
        for r in sspec.get("loadBalancerSourceRanges") or []:
            try:
                net = ipaddress.ip_network(r, strict=False)
            except ValueError as e:
                fail(f"{where(*svc)}: loadBalancerSourceRanges {r}: {e}")
                continue
            if not covered(net, grpc_nets):
                fail(f"{where(*svc)}: loadBalancerSourceRanges {r} is not admitted to the "
                     f"coordinators' gRPC port by any NetworkPolicy ipBlock "
                     f"({[str(n) for n in grpc_nets]}): keep the two lists the same")
    # Coordinators' admin port: Prometheus, operators, the kubelet's probes. Not the GPU pods.
    admin = port_of("coordinator.toml", "coordinator", "admin", "listen", ":9464")
    peers = ingress_peers(by_kind, clabels, admin, name_of(cc, admin))
    if not peers:
        fail(f"{cw}: no NetworkPolicy admits Prometheus and the kubelet to the admin port {admin}")
    for np, peer in peers:
        kind = peer_kind(peer)
        sel = ((peer or {}).get("podSelector") or {}).get("matchLabels") or {}
        if kind == "anyone" or (kind == "pod" and (not sel or matches(sel, vlabels))):
            fail(f"{where(*np)}: admits {peer or 'anyone'} to the admin port {admin}; only the "
                 f"monitoring and operator namespaces/ranges and the kubelet may")
    prom_ns = None
    for so in by_kind.get("ScaledObject", {}).values():
        for t in (so[2].get("spec") or {}).get("triggers") or []:
            m = re.match(r"https?://[^./:]+\.([^./:]+)\.svc", (t.get("metadata") or {})
                         .get("serverAddress", ""))
            prom_ns = prom_ns or (m and m.group(1))
    if prom_ns and not any(
            peer_kind(p) == "namespace"
            and ((p.get("namespaceSelector") or {}).get("matchLabels") or {})
            .get("kubernetes.io/metadata.name") == prom_ns for _np, p in peers):
        fail(f"{cw}: no NetworkPolicy admits namespace {prom_ns} (Prometheus, the KEDA trigger's "
             f"serverAddress) to the admin port {admin}: /metrics would not be scraped")
    for net in probe_nets:
        if not covered(net, cidrs(peers)):
            fail(f"{cw}: the node CIDR {net} (admitted to the verify pods' health port for the "
                 f"kubelet's probes) is not admitted to the admin port {admin}, where the "
                 f"coordinators' probes go")


def check_kustomizations(files) -> None:
    referenced: set[Path] = set()
    for k in sorted(K8S.rglob("kustomization.yaml")):
        import yaml

        d = yaml.safe_load(k.read_text()) or {}
        for r in d.get("resources") or []:
            target = (k.parent / r).resolve()
            if target.is_dir():
                if not (target / "kustomization.yaml").exists():
                    fail(f"{rel(k)}: resource {r} is a directory without kustomization.yaml")
            elif target.is_file():
                if k.parent.resolve() not in target.parents:
                    fail(f"{rel(k)}: resource {r} is outside the kustomization's directory "
                         f"(kustomize's load restrictor refuses it)")
                referenced.add(target)
            else:
                fail(f"{rel(k)}: resource {r} does not exist")
        for g in d.get("configMapGenerator") or []:
            for f in g.get("files") or []:
                target = (k.parent / str(f).split("=")[-1]).resolve()
                if not target.is_file() or k.parent.resolve() not in target.parents:
                    fail(f"{rel(k)}: configMapGenerator {g.get('name')} file {f} does not exist "
                         f"inside the kustomization's directory")
    for f in files:
        if f.name == "kustomization.yaml" or any(t in f.parents for t in TEMPLATE_DIRS):
            continue
        if f.resolve() not in referenced:
            fail(f"{rel(f)}: not listed in any kustomization.yaml")


def cmd_k8s(version: str | None) -> None:
    try:
        import kubernetes_validate
        import yaml  # noqa: F401
    except ImportError as e:
        fail(f"cannot import kubernetes-validate / PyYAML ({e}); install with "
             f"`python3 -m pip install --target <dir> kubernetes-validate` and set PYTHONPATH")
        return
    version = version or kubernetes_validate.latest_version()
    files, docs = load_docs()
    for path, i, d in docs:
        w = where(path, i, d)
        api, kind = d.get("apiVersion"), d.get("kind")
        if not api or not kind:
            fail(f"{w}: apiVersion and kind are required")
            continue
        if (api, kind) in CRD_KINDS:
            check_crd(w, api, kind, d)
            print(f"ok   {w}: structural check ({api})")
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
            print(f"ok   {w}: kubernetes {version} schema (strict)")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(f"{w}: no schema for {api} {kind} and no structural check either ({e.message})")
        except kubernetes_validate.ValidationError as e:
            loc = ".".join(str(p) for p in e.path)
            fail(f"{w}: invalid against kubernetes {version}: {loc}: {e.message}")
        except Exception as e:  # noqa: BLE001 - report any other failure as a finding
            fail(f"{w}: validation error: {type(e).__name__}: {e}")
    check_kustomizations(files)
    check_cross_refs(docs)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("config", "k8s", "sync", "monitoring", "docs"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "config":
        cmd_config()
    elif argv[1] == "k8s":
        cmd_k8s(os.environ.get("KUBERNETES_VERSION"))
    elif argv[1] == "monitoring":
        metrics = argv[argv.index("--metrics") + 1] if "--metrics" in argv[:-1] else None
        check_ops.cmd_monitoring(metrics)
    elif argv[1] == "docs":
        check_ops.cmd_docs()
    else:
        cmd_sync()
    for e in errors:
        print(f"FAIL: {e}")
    if errors:
        print(f"{len(errors)} problem(s) in deploy/ ({argv[1]})")
        return 1
    return 0


# check_ops.py imports this module as `check_deploy` (to share `fail` and the loaders): make
# that the running script rather than a second copy with its own error list.
sys.modules.setdefault("check_deploy", sys.modules[__name__])
sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_ops  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv))
