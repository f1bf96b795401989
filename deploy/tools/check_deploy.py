#!/usr/bin/env python3
"""Static checks of deploy/ (run by tests/tests/deploy_manifests.rs; usable on its own).

    python3 deploy/tools/check_deploy.py config   # TOML overlays + EDGESPEC__ env keys vs default.toml
    python3 deploy/tools/check_deploy.py k8s      # every deploy/k8s YAML (needs kubernetes-validate)
    python3 deploy/tools/check_deploy.py sync     # rewrite the ConfigMaps from deploy/config

Exit status 0 when every check passes, 1 with one "FAIL: ..." line per problem otherwise.
Needs Python >= 3.11 (tomllib); `k8s` also needs PyYAML and kubernetes-validate importable
(pip install kubernetes-validate).
"""

from __future__ import annotations

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
}
# Where every node finds its TLS material (systemd hosts: installed files; Kubernetes: Secret
# edgespec-tls mounted there), and which file each [tls] key names.
TLS_DIR = "/etc/edgespec/tls"
TLS_FILES = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
TLS_SECRET = "edgespec-tls"
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
                 f"install the files there, pods mount Secret {TLS_SECRET} there)")
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
        print(f"ok   {rel(path)}: {n} keys, all in {crate}/default.toml; mtls, https addresses")
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
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        crate = unit.stem.removeprefix("edgespec-")
        for lineno, line in enumerate(unit.read_text().splitlines(), 1):
            for m in re.finditer(r"\b(EDGESPEC__[A-Za-z0-9_]+)=(\S*)", line):
                if line.lstrip().startswith("Environment="):
                    check_env_key(f"{rel(unit)}:{lineno}", crate, m.group(1))
                    check_env_value(f"{rel(unit)}:{lineno}", m.group(1), m.group(2))


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
                if "edgespec_coordinator_cloud_demand" not in md.get("query", ""):
                    fail(f"{w}: the prometheus query does not read edgespec_coordinator_cloud_demand")
                try:
                    float(md.get("threshold", "x"))
                except ValueError:
                    fail(f"{w}: threshold {md.get('threshold')!r} is not a number")
            if t.get("metricType") not in (None, "AverageValue", "Value", "Utilization"):
                fail(f"{w}: metricType {t.get('metricType')!r} is not one KEDA knows")
        _ = ref
    elif kind in ("Issuer", "ClusterIssuer"):
        spec = require(w, d, "spec", dict) or {}
        types = [t for t in ("selfSigned", "ca", "acme", "vault", "venafi") if t in spec]
        if len(types) != 1:
            fail(f"{w}: an Issuer needs exactly one of selfSigned, ca, acme, vault, venafi "
                 f"(has {types})")
        if "ca" in spec and not isinstance((spec["ca"] or {}).get("secretName"), str):
            fail(f"{w}: spec.ca.secretName is required")
    elif kind == "Certificate":
        require(w, d, "spec.secretName", str)
        require(w, d, "spec.issuerRef.name", str)
        spec = d.get("spec") or {}
        if not spec.get("isCA") and not spec.get("dnsNames") and not spec.get("ipAddresses"):
            fail(f"{w}: a leaf certificate needs dnsNames (webpki ignores the common name)")
        for k in ("dnsNames", "ipAddresses", "usages"):
            if k in spec and not (isinstance(spec[k], list)
                                  and all(isinstance(x, str) and x for x in spec[k])):
                fail(f"{w}: spec.{k} must be a list of strings")
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
    elif kind == "ServiceMonitor":
        require(w, d, "spec.selector.matchLabels", dict)
        eps = require(w, d, "spec.endpoints", list) or []
        if not eps or not all(isinstance(e, dict) and e.get("port") for e in eps):
            fail(f"{w}: every endpoint needs a named `port`")


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


def check_tls_mounts(by_kind: dict, w: str, spec: dict, c: dict, crate: str) -> None:
    """The container's overlay (its ConfigMap mounted at /etc/edgespec) names TLS files that a
    read-only mount of Secret edgespec-tls provides."""
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = c.get("volumeMounts") or []
    source = None
    for m in mounts:
        cm = (volumes.get(m.get("name")) or {}).get("configMap") or {}
        if m.get("mountPath") == "/etc/edgespec":
            source = next((src for _f, n, _c, src, _k in CONFIGMAPS if n == cm.get("name")), None)
    if source is None:
        fail(f"{w}: no ConfigMap generated from deploy/config is mounted at /etc/edgespec")
        return
    data = load_overlay(Path(source).name)
    if data is None:
        fail(f"{w}: cannot read {source}")
        return
    tls = effective(crate, data).get("tls") or {}
    tls_mount = next((m for m in mounts if m.get("mountPath") == TLS_DIR), None)
    if tls_mount is None:
        fail(f"{w}: Secret {TLS_SECRET} must be mounted at {TLS_DIR} ({source} [tls])")
        return
    if not tls_mount.get("readOnly"):
        fail(f"{w}: the TLS mount at {TLS_DIR} must be readOnly")
    vol = volumes.get(tls_mount.get("name")) or {}
    name = (vol.get("secret") or {}).get("secretName")
    if name != TLS_SECRET:
        fail(f"{w}: the volume mounted at {TLS_DIR} must be Secret {TLS_SECRET} (is {name})")
        return
    mode = (vol.get("secret") or {}).get("defaultMode", 0o644)
    if mode & 0o007:
        fail(f"{w}: Secret {TLS_SECRET} is mounted with defaultMode {mode:#o}; the key must not "
             f"be world-readable (0440 with the pod's fsGroup)")
    if mode & 0o077 and "fsGroup" not in (spec.get("securityContext") or {}):
        fail(f"{w}: a group-readable TLS secret needs the pod's securityContext.fsGroup")
    keys = secret_keys(by_kind, TLS_SECRET) or set()
    items = {i.get("path"): i.get("key") for i in (vol.get("secret") or {}).get("items") or []}
    for key in TLS_FILES:
        path = tls.get(key, "")
        if not path.startswith(TLS_DIR + "/"):
            fail(f"{w}: {source} tls.{key} = {path!r} is not in the mounted {TLS_DIR}")
            continue
        file = path[len(TLS_DIR) + 1:]
        secret_key = items.get(file, file) if items else file
        if items and file not in items:
            fail(f"{w}: {source} tls.{key} names {file}, which the volume's items do not project")
        elif secret_key not in keys:
            fail(f"{w}: {source} tls.{key} names {file}, but Secret {TLS_SECRET} has no key "
                 f"{secret_key} ({sorted(keys)})")


def check_certificate_names(by_kind: dict, replicas: int, cloud_addresses: list) -> None:
    """The certificate that fills Secret edgespec-tls names everything its holders are dialled
    as: each overlay's tls.server_name, or, where that is empty, the host it dials
    (`cloud_addresses`: the cloud verify pods' EDGESPEC__COORDINATOR__ADDRESSES)."""
    certs = [c for c in by_kind.get("Certificate", {}).values()
             if (c[2].get("spec") or {}).get("secretName") == TLS_SECRET]
    if len(certs) != 1:
        fail(f"exactly one cert-manager Certificate must issue Secret {TLS_SECRET} "
             f"(deploy/k8s/secrets); found {len(certs)}")
        return
    cert = certs[0]
    cw = where(*cert)
    spec = cert[2].get("spec") or {}
    names = set(spec.get("dnsNames") or [])
    usages = set(spec.get("usages") or [])
    if not TLS_USAGES <= usages:
        fail(f"{cw}: usages must include {sorted(TLS_USAGES)} (every node serves and dials)")
    issuer = (spec.get("issuerRef") or {})
    if issuer.get("name") not in by_kind.get(issuer.get("kind", "Issuer"), {}):
        fail(f"{cw}: issuerRef {issuer.get('kind', 'Issuer')}/{issuer.get('name')} is not defined")
    wanted = []  # (name, why)
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
            else:
                wanted.append((server_name, f"tls.server_name of deploy/config/{overlay}"))
            continue
        if server_name:
            wanted.append((server_name, f"tls.server_name of deploy/config/{overlay}"))
            continue
        co = eff.get("coordinator") or {}
        addrs = co.get("addresses") if "addresses" in co else [co.get("address")]
        if overlay == "cloud-verify.toml":
            addrs = cloud_addresses
        for a in addrs or []:
            host = re.sub(r"^[a-z]+://", "", a or "").rsplit(":", 1)[0]
            wanted.append((host, f"dialled by deploy/config/{overlay} (tls.server_name empty)"))
        if overlay == "onprem-verify.toml" and len(addrs or []) != replicas:
            fail(f"deploy/config/{overlay}: coordinator.addresses lists {len(addrs or [])} "
                 f"coordinators, the StatefulSet has {replicas} replicas")
    for name, why in wanted:
        if name not in names:
            fail(f"{cw}: dnsNames lack {name!r} ({why})")


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
    want_admin = [f"http://edgespec-coordinator-{n}.{peers}:9464" for n in range(replicas)]
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
    got = (env.get("COORDINATOR_ADMIN_URLS") or {}).get("value", "").split()
    if got != want_admin:
        fail(f"{vw}: COORDINATOR_ADMIN_URLS is {got}, expected {want_admin}")
    for name, value in (("EDGESPEC__SERVER__POOL", "cloud"),
                        ("EDGESPEC__SERVER__NODE_ID", "$(POD_NAME)"),
                        ("EDGESPEC__SERVER__ADVERTISE_ADDR", "https://$(POD_IP):50061")):
        if (env.get(name) or {}).get("value") != value:
            fail(f"{vw}: {name} must be {value!r}")
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
    pre = " ".join(((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or [])
    if "/admin/v1/verifiers/$POD_NAME/drain" not in pre:
        fail(f"{vw}: preStop must drain the node through the admin API")
    if not any(m.get("mountPath") == "/models" and m.get("readOnly") for m in c.get("volumeMounts") or []):
        fail(f"{vw}: the model volume must be mounted read-only at /models")
    grace = vspec.get("terminationGracePeriodSeconds", 30)
    if grace < 20 + 2 * 5 + 2 * 30:
        fail(f"{vw}: terminationGracePeriodSeconds {grace} is shorter than preStop drain + "
             f"2 x server.shutdown_grace")
    check_tls_mounts(by_kind, vw, vspec, c, "verify-node")
    cc = next(iter(pod_spec(coord[2]).get("containers") or []), {})
    check_tls_mounts(by_kind, where(*coord), pod_spec(coord[2]), cc, "coordinator")
    check_certificate_names(by_kind, replicas,
                            (env.get("EDGESPEC__COORDINATOR__ADDRESSES") or {}).get("value", "")
                            .split(","))
    if ((cc.get("readinessProbe") or {}).get("httpGet") or {}).get("path") != "/readyz":
        fail(f"{where(*coord)}: readiness must be httpGet /readyz")
    if ((cc.get("livenessProbe") or {}).get("httpGet") or {}).get("path") != "/healthz":
        fail(f"{where(*coord)}: liveness must be httpGet /healthz")
    for kind in ("PodDisruptionBudget",):
        for target in (coord, verify):
            if not any(matches(((p[2].get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                               pod_labels(target[2])) for p in by_kind.get(kind, {}).values()):
                fail(f"{where(*target)}: no PodDisruptionBudget covers it")


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
    if len(argv) < 2 or argv[1] not in ("config", "k8s", "sync"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "config":
        cmd_config()
    elif argv[1] == "k8s":
        cmd_k8s(os.environ.get("KUBERNETES_VERSION"))
    else:
        cmd_sync()
    for e in errors:
        print(f"FAIL: {e}")
    if errors:
        print(f"{len(errors)} problem(s) in deploy/ ({argv[1]})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
