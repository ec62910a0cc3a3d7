#!/usr/bin/env python3
"""Checks every Kubernetes manifest under a directory (default: deploy/kubernetes).

1. Schema: each document is validated against the Kubernetes API schemas that the
   kubernetes-validate package bundles (offline), for one pinned Kubernetes version, in strict
   mode (an unknown field is an error). A kind with no bundled schema is an error too, except
   the custom resources listed in CRD_CHECKS, which get a check of their own here.
2. Facts that the README relies on and that could regress silently: the CSIDriver, the node
   DaemonSet, the CSI sidecars, the StorageClasses, StatefulSets, resources on every container,
   namespaces and references between objects.

Prints one line per problem and a closing count of checks and failures; exits 1 if any check
failed, 2 if the tools are missing or the directory does not exist.

    python3 tests/k8s/check_manifests.py [DIR]
"""

import os
import re
import sys
from urllib.parse import urlparse

try:
    import yaml
    import kubernetes_validate
    from kubernetes_validate import SchemaNotFoundError, ValidationError
except ImportError as e:  # pragma: no cover - depends on the machine
    print(
        f"check_manifests: {e}; install with `python3 -m pip install kubernetes-validate` "
        "(scripts/test does)",
        file=sys.stderr,
    )
    sys.exit(2)

# The Kubernetes version whose API schemas the manifests must satisfy: the oldest we support.
K8S_VERSION = "1.31"

DRIVER = "csi.ballast.dev"
NAMESPACE = "ballast-system"
KUBELET_DIR = "/var/lib/kubelet"
SOCKET_HOST_PATH = f"{KUBELET_DIR}/plugins/{DRIVER}/csi.sock"
SC_PARAMETERS = {"replicas", "fsType", "zoneSpread"}
SC_RESERVED_PREFIX = "csi.storage.k8s.io/"
HTTP_PORT = 9470

# Kinds whose pod template is at spec.template.
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}
# Kinds that are not namespaced (everything else in these manifests is).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CSIDriver",
    "StorageClass",
    "VolumeSnapshotClass",
    "PriorityClass",
}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def check_volume_snapshot_class(doc):
    """snapshot.storage.k8s.io/v1 VolumeSnapshotClass, a CRD kubernetes-validate has no schema
    for: the fields the CRD's schema defines, the ones it requires, and their values."""
    problems = []
    allowed = {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        problems.append(f"unknown fields {unknown}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        problems.append("metadata is not a mapping")
    else:
        unknown = sorted(set(meta) - {"name", "labels", "annotations"})
        if unknown:
            problems.append(f"unknown metadata fields {unknown}")
        if not DNS_SUBDOMAIN.match(str(meta.get("name", ""))):
            problems.append(f"metadata.name {meta.get('name')!r} is not a DNS subdomain")
        for key in ("labels", "annotations"):
            value = meta.get(key, {})
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                problems.append(f"metadata.{key} must map strings to strings")
    if doc.get("driver") != DRIVER:
        problems.append(f"driver is {doc.get('driver')!r}, not {DRIVER!r}")
    if doc.get("deletionPolicy") not in ("Delete", "Retain"):
        problems.append(f"deletionPolicy {doc.get('deletionPolicy')!r} is not Delete or Retain")
    params = doc.get("parameters", {})
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in params.items()
    ):
        problems.append("parameters must map strings to strings")
    return problems


# (apiVersion, kind) of custom resources checked here instead of against a bundled schema.
CRD_CHECKS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): check_volume_snapshot_class,
}


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what, problem=""):
        """Counts one check; prints the problem when it failed."""
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL {what}: {problem}" if problem else f"FAIL {what}")
        return ok


class Doc:
    """One YAML document and where it came from."""

    def __init__(self, path, index, body):
        self.path = path
        self.index = index
        self.body = body

    @property
    def kind(self):
        return self.body.get("kind")

    @property
    def name(self):
        return (self.body.get("metadata") or {}).get("name")

    @property
    def namespace(self):
        return (self.body.get("metadata") or {}).get("namespace")

    def __str__(self):
        return f"{self.path}#{self.index} {self.kind}/{self.name}"


def load(root):
    """Every document of every *.yaml / *.yml file below root, in path order."""
    files = []
    for d, _, names in os.walk(root):
        files += [os.path.join(d, n) for n in names if n.endswith((".yaml", ".yml"))]
    docs, errors = [], []
    for path in sorted(files):
        rel = os.path.relpath(path, root)
        try:
            with open(path, encoding="utf-8") as f:
                bodies = list(yaml.safe_load_all(f))
        except yaml.YAMLError as e:
            errors.append(f"{rel}: not valid YAML: {e}")
            continue
        found = 0
        for i, body in enumerate(bodies):
            if body is None:
                continue
            found += 1
            if not isinstance(body, dict) or not body.get("apiVersion") or not body.get("kind"):
                errors.append(f"{rel}#{i}: not a Kubernetes object (apiVersion and kind)")
                continue
            docs.append(Doc(rel, i, body))
        if not found:
            errors.append(f"{rel}: no documents")
    return files, docs, errors


def validate_schemas(docs, r):
    for d in docs:
        key = (d.body["apiVersion"], d.kind)
        if key in CRD_CHECKS:
            problems = CRD_CHECKS[key](d.body)
            r.check(not problems, f"{d} (custom resource check)", "; ".join(problems))
            continue
        try:
            kubernetes_validate.validate(d.body, K8S_VERSION, strict=True)
            r.check(True, str(d))
        except ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            r.check(False, f"{d} against Kubernetes {K8S_VERSION}", f"{where}: {e.message}")
        except SchemaNotFoundError:
            r.check(
                False,
                str(d),
                f"no schema for {d.body['apiVersion']} {d.kind} in Kubernetes {K8S_VERSION}; "
                "a custom resource needs an entry in CRD_CHECKS",
            )


def pod_spec(doc):
    if doc.kind in WORKLOADS:
        return ((doc.body.get("spec") or {}).get("template") or {}).get("spec") or {}
    if doc.kind == "Pod":
        return doc.body.get("spec") or {}
    return None


def containers(spec):
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def arg_value(container, flag):
    """The value of --flag=VALUE or `--flag VALUE` in the container's command and args."""
    words = (container.get("command") or []) + (container.get("args") or [])
    for i, w in enumerate(words):
        if w.startswith(flag + "="):
            return w[len(flag) + 1 :]
        if w == flag and i + 1 < len(words):
            return words[i + 1]
    return None


def has_flag(container, flag):
    words = (container.get("command") or []) + (container.get("args") or [])
    return any(w == flag or w.startswith(flag + "=") for w in words)


def host_path_of(spec, container, path):
    """The host path behind `path` in the container, through a hostPath volume mount."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, m)
    if best is None:
        return None
    mp, m = best
    host = (volumes.get(m["name"]) or {}).get("hostPath")
    if not host:
        return None
    return host["path"].rstrip("/") + path[len(mp) :]


def probe_port(container, probe):
    port = ((container.get(probe) or {}).get("httpGet") or {}).get("port")
    if isinstance(port, str):
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return p.get("containerPort")
    return port


def check_resources(docs, r):
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        for c in containers(spec):
            res = c.get("resources") or {}
            missing = [
                f"{part}.{what}"
                for part in ("requests", "limits")
                for what in ("cpu", "memory")
                if what not in (res.get(part) or {})
            ]
            r.check(not missing, f"{d} container {c.get('name')} resources", f"no {missing}")


def check_csidriver(docs, r):
    drivers = [d for d in docs if d.kind == "CSIDriver"]
    r.check(
        [d.name for d in drivers] == [DRIVER],
        "CSIDriver",
        f"expected exactly one, {DRIVER}; found {[d.name for d in drivers]}",
    )
    for d in drivers:
        spec = d.body.get("spec") or {}
        r.check(spec.get("attachRequired") is False, f"{d} attachRequired", "must be false")
        r.check(spec.get("podInfoOnMount") is True, f"{d} podInfoOnMount", "must be true")
        r.check(spec.get("fsGroupPolicy") == "File", f"{d} fsGroupPolicy", "must be File")
        r.check(
            spec.get("volumeLifecycleModes") == ["Persistent"],
            f"{d} volumeLifecycleModes",
            "must be [Persistent]",
        )


def find(docs, kind, name):
    found = [d for d in docs if d.kind == kind and d.name == name]
    return found[0] if found else None


def check_node_daemonset(docs, r):
    d = find(docs, "DaemonSet", "ballast-node")
    if not r.check(d is not None, "DaemonSet ballast-node", "missing"):
        return
    spec = pod_spec(d)
    ds_spec = d.body.get("spec") or {}
    r.check(
        spec.get("priorityClassName") == "system-node-critical",
        f"{d} priorityClassName",
        "must be system-node-critical",
    )
    r.check(spec.get("hostNetwork") is True, f"{d} hostNetwork", "must be true")
    r.check(
        spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
        f"{d} dnsPolicy",
        "ClusterFirstWithHostNet, or etcd's service names do not resolve on the host network",
    )
    r.check(
        {"operator": "Exists"} in (spec.get("tolerations") or []),
        f"{d} tolerations",
        "must tolerate every taint (operator: Exists) to run on every node",
    )
    strategy = ds_spec.get("updateStrategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    r.check(
        strategy.get("type") == "RollingUpdate"
        and rolling.get("maxSurge") == 1
        and rolling.get("maxUnavailable") == 0,
        f"{d} updateStrategy",
        "must be RollingUpdate with maxSurge 1 and maxUnavailable 0 (the hand-over of issue 16)",
    )
    for c in containers(spec):
        r.check(
            not c.get("ports"),
            f"{d} container {c.get('name')} ports",
            "a surge pod on the host network cannot declare ports (they are host ports)",
        )
    by_name = {c["name"]: c for c in spec.get("containers") or []}
    ballast = by_name.get("ballast")
    if not r.check(ballast is not None, f"{d} container ballast", "missing"):
        return
    r.check(
        (ballast.get("image") or "").startswith("ballast/ballast:"),
        f"{d} ballast image",
        f"{ballast.get('image')!r} is not ballast/ballast",
    )
    r.check(
        (ballast.get("securityContext") or {}).get("privileged") is True,
        f"{d} ballast privileged",
        "must be privileged",
    )
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    propagation = {}
    for m in ballast.get("volumeMounts") or []:
        host = ((volumes.get(m["name"]) or {}).get("hostPath") or {}).get("path")
        if host:
            propagation[host.rstrip("/")] = (m["mountPath"], m.get("mountPropagation"))
    for host in (KUBELET_DIR, "/dev"):
        mount = propagation.get(host)
        r.check(
            mount == (host, "Bidirectional"),
            f"{d} ballast mount of {host}",
            f"must be mounted at the same path with Bidirectional propagation; got {mount}",
        )
    for host in ("/var/lib/ballast", "/run/ballast"):
        r.check(host in propagation, f"{d} ballast mount of {host}", "no hostPath mount")
    r.check(
        propagation.get("/var/lib/ballast") == ("/var/lib/ballast", "Bidirectional"),
        f"{d} ballast mount of /var/lib/ballast",
        "must be Bidirectional: the next pod and the holders see the attach FUSE mount",
    )
    # Issue 16: a holder container per pod, the daemon handing over to the next pod's.
    for flag in ("--upgrade",):
        r.check(has_flag(ballast, flag), f"{d} ballast {flag}", "missing")
    r.check(
        arg_value(ballast, "--after-hand-over") == "wait",
        f"{d} ballast --after-hand-over",
        "must be wait, or the old pod's container restarts and takes the node back",
    )
    holder_socket = arg_value(ballast, "--holder-socket")
    holder = by_name.get("holder")
    if r.check(holder is not None, f"{d} container holder", "missing") and r.check(
        holder_socket is not None, f"{d} ballast --holder-socket", "missing"
    ):
        words = (holder.get("command") or []) + (holder.get("args") or [])
        r.check(
            words[:1] == ["holder"] and "--standing" in words,
            f"{d} holder command",
            "must run `ballast holder --standing`",
        )
        r.check(
            host_path_of(spec, holder, arg_value(holder, "--socket") or "")
            == host_path_of(spec, ballast, holder_socket)
            and "$(POD_NAME)" in holder_socket,
            f"{d} holder --socket",
            f"must be the daemon's --holder-socket {holder_socket!r} on the host, one per pod",
        )
        mountpoint = arg_value(holder, "--mountpoint") or ""
        r.check(
            host_path_of(spec, holder, mountpoint) == "/var/lib/ballast/fuse"
            and any(
                m.get("mountPropagation") in ("HostToContainer", "Bidirectional")
                for m in holder.get("volumeMounts") or []
            ),
            f"{d} holder --mountpoint",
            "must see /var/lib/ballast/fuse of the host, with mount propagation",
        )
    r.check(
        ((ballast.get("livenessProbe") or {}).get("httpGet") or {}).get("path") == "/healthz",
        f"{d} ballast livenessProbe",
        "must GET /healthz",
    )
    r.check(
        ((ballast.get("readinessProbe") or {}).get("httpGet") or {}).get("path") == "/readyz",
        f"{d} ballast readinessProbe",
        "must GET /readyz",
    )
    http = arg_value(ballast, "--http") or ""
    for probe in ("livenessProbe", "readinessProbe"):
        port = probe_port(ballast, probe)
        r.check(
            port == HTTP_PORT and http.endswith(f":{HTTP_PORT}"),
            f"{d} ballast {probe} port",
            f"probe port {port} and --http {http!r} must both be {HTTP_PORT}",
        )
    # Issue 14: replica traffic is mutual TLS, never plaintext, in the shipped manifests.
    for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
        r.check(arg_value(ballast, flag) is not None, f"{d} ballast {flag}", "missing")
    r.check(
        not has_flag(ballast, "--insecure-plaintext-replicas"),
        f"{d} ballast --insecure-plaintext-replicas",
        "plaintext replica traffic in a shipped manifest",
    )
    r.check(
        (arg_value(ballast, "--listen") or "").endswith(":9471"),
        f"{d} ballast --listen",
        "replica traffic on port 9471",
    )
    csi_socket = arg_value(ballast, "--csi-socket")
    r.check(
        csi_socket is not None and host_path_of(spec, ballast, csi_socket) == SOCKET_HOST_PATH,
        f"{d} ballast --csi-socket",
        f"{csi_socket!r} must be {SOCKET_HOST_PATH} on the host",
    )
    registrar = by_name.get("node-driver-registrar")
    if r.check(registrar is not None, f"{d} container node-driver-registrar", "missing"):
        r.check(
            arg_value(registrar, "--kubelet-registration-path") == SOCKET_HOST_PATH,
            f"{d} registrar --kubelet-registration-path",
            f"must be {SOCKET_HOST_PATH}",
        )
        address = arg_value(registrar, "--csi-address") or ""
        r.check(
            host_path_of(spec, registrar, address) == SOCKET_HOST_PATH,
            f"{d} registrar --csi-address",
            f"{address!r} is not the daemon's socket {SOCKET_HOST_PATH}",
        )
        r.check(
            host_path_of(spec, registrar, "/registration")
            == f"{KUBELET_DIR}/plugins_registry",
            f"{d} registrar registration dir",
            f"/registration must be {KUBELET_DIR}/plugins_registry",
        )
    check_etcd_endpoints(docs, d, ballast, r)


def check_etcd_endpoints(docs, ds, ballast, r):
    """--etcd names exactly the members of the etcd StatefulSet shipped here."""
    sts = find(docs, "StatefulSet", "etcd")
    if sts is None:
        return  # an external etcd: nothing to compare with
    spec = sts.body["spec"]
    ns = sts.namespace
    expected = {f"{sts.name}-{i}.{spec['serviceName']}.{ns}.svc" for i in range(spec["replicas"])}
    urls = (arg_value(ballast, "--etcd") or "").split(",")
    hosts = {urlparse(u).hostname for u in urls}
    ports = {urlparse(u).port for u in urls}
    # Issue 14: the shipped etcd is TLS with client certificates; the node has all three.
    r.check(
        all(u.startswith("https://") for u in urls),
        f"{ds} ballast --etcd",
        f"{urls} must be https:// (the shipped etcd requires TLS)",
    )
    for flag in ("--etcd-ca", "--etcd-cert", "--etcd-key"):
        r.check(arg_value(ballast, flag) is not None, f"{ds} ballast {flag}", "missing")
    policy = find(docs, "NetworkPolicy", sts.name)
    if r.check(policy is not None, f"NetworkPolicy {sts.name}", "missing"):
        peer = [
            rule
            for rule in policy.body["spec"].get("ingress") or []
            if any(p.get("port") == 2380 for p in rule.get("ports") or [])
        ]
        r.check(
            bool(peer) and all(rule.get("from") for rule in peer),
            f"{policy} peer port",
            "etcd's peer port must be open to etcd members only",
        )
    etcd = next(iter(pod_spec(sts).get("containers") or []), {})
    r.check(
        has_flag(etcd, "--client-cert-auth"),
        f"{sts} etcd --client-cert-auth",
        "etcd must require client certificates",
    )
    r.check(
        hosts == expected and ports == {2379},
        f"{ds} ballast --etcd",
        f"{urls} must name {sorted(expected)} on port 2379",
    )
    r.check(
        find(docs, "Service", spec["serviceName"]) is not None,
        f"{sts} serviceName",
        f"no Service {spec['serviceName']}",
    )


def check_sidecars(docs, r):
    """Every CSI sidecar outside the node plugin: leader election, and the daemon's socket."""
    seen = set()
    for d in docs:
        if d.kind != "Deployment":
            continue
        spec = pod_spec(d)
        for c in spec.get("containers") or []:
            address = arg_value(c, "--csi-address")
            if address is None:
                continue
            seen.add(c["name"])
            r.check(has_flag(c, "--leader-election"), f"{d} {c['name']}", "no --leader-election")
            r.check(
                host_path_of(spec, c, address) == SOCKET_HOST_PATH,
                f"{d} {c['name']} --csi-address",
                f"{address!r} is not the node daemon's socket {SOCKET_HOST_PATH} on the host",
            )
            if c["name"] == "csi-provisioner":
                gates = arg_value(c, "--feature-gates") or ""
                r.check(
                    "Topology=true" in gates.split(","),
                    f"{d} csi-provisioner",
                    "topology must be on (--feature-gates=Topology=true)",
                )
                r.check(
                    has_flag(c, "--extra-create-metadata"),
                    f"{d} csi-provisioner",
                    "no --extra-create-metadata",
                )
    for name in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
        r.check(name in seen, f"sidecar {name}", "no Deployment runs it")
    controller = find(docs, "Deployment", "ballast-controller")
    if r.check(controller is not None, "Deployment ballast-controller", "missing"):
        r.check(
            controller.body["spec"].get("replicas") == 2,
            f"{controller} replicas",
            "2, with leader election",
        )


def check_storage_classes(docs, r):
    classes = {d.name: d for d in docs if d.kind == "StorageClass"}
    for d in classes.values():
        if d.body.get("provisioner") != DRIVER:
            continue
        params = d.body.get("parameters") or {}
        unknown = sorted(
            k for k in params if k not in SC_PARAMETERS and not k.startswith(SC_RESERVED_PREFIX)
        )
        r.check(not unknown, f"{d} parameters", f"the driver refuses {unknown}")
        replicas = params.get("replicas")
        r.check(
            replicas in {str(n) for n in range(1, 6)},
            f"{d} replicas",
            f"{replicas!r} is not a string from 1 to 5",
        )
        if "fsType" in params:
            r.check(params["fsType"] in ("ext4", "xfs"), f"{d} fsType", "ext4 or xfs")
        if "zoneSpread" in params:
            r.check(params["zoneSpread"] in ("hard", "soft"), f"{d} zoneSpread", "hard or soft")
        r.check(
            d.body.get("volumeBindingMode") == "WaitForFirstConsumer",
            f"{d} volumeBindingMode",
            "must be WaitForFirstConsumer",
        )
    r3 = classes.get("ballast-r3")
    if r.check(r3 is not None, "StorageClass ballast-r3", "missing"):
        b = r3.body
        r.check(b.get("provisioner") == DRIVER, f"{r3} provisioner", f"must be {DRIVER}")
        r.check(b.get("allowVolumeExpansion") is True, f"{r3} allowVolumeExpansion", "true")
        r.check(b.get("reclaimPolicy") == "Delete", f"{r3} reclaimPolicy", "Delete")
        params = b.get("parameters") or {}
        r.check(
            params.get("replicas") == "3" and params.get("zoneSpread") == "soft",
            f"{r3} parameters",
            "replicas 3, zoneSpread soft",
        )
    r1 = classes.get("ballast-r1")
    if r.check(r1 is not None, "StorageClass ballast-r1", "missing"):
        r.check(
            (r1.body.get("parameters") or {}).get("replicas") == "1",
            f"{r1} replicas",
            "must be 1",
        )


def selects(selector, labels):
    match = (selector or {}).get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def check_statefulsets(docs, r):
    classes = {d.name for d in docs if d.kind == "StorageClass"}
    for d in docs:
        if d.kind != "StatefulSet":
            continue
        spec = d.body["spec"]
        pod = pod_spec(d)
        labels = spec["template"]["metadata"].get("labels") or {}
        ns = d.namespace
        same_ns = [x for x in docs if x.namespace == ns]
        templates = spec.get("volumeClaimTemplates") or []
        r.check(bool(templates), f"{d} volumeClaimTemplates", "persistent data needs claims")
        for t in templates:
            size = (((t.get("spec") or {}).get("resources") or {}).get("requests") or {}).get(
                "storage"
            )
            r.check(bool(size), f"{d} claim {t['metadata']['name']}", "no explicit storage")
            sc = (t.get("spec") or {}).get("storageClassName")
            if sc is not None and sc.startswith("ballast-"):
                r.check(sc in classes, f"{d} claim storageClassName", f"no StorageClass {sc}")
        # A memory emptyDir holds no data (certificates made at start); any other belongs
        # in a claim.
        empty = [
            v["name"]
            for v in pod.get("volumes") or []
            if "emptyDir" in v and (v["emptyDir"] or {}).get("medium") != "Memory"
        ]
        r.check(not empty, f"{d} volumes", f"emptyDir {empty} where claims belong")
        service = find(same_ns, "Service", spec.get("serviceName"))
        r.check(
            service is not None and service.body["spec"].get("clusterIP") == "None",
            f"{d} serviceName",
            f"needs a headless Service {spec.get('serviceName')!r} in its namespace",
        )
        pdbs = [
            x
            for x in same_ns
            if x.kind == "PodDisruptionBudget" and selects(x.body["spec"].get("selector"), labels)
        ]
        r.check(len(pdbs) == 1, f"{d} PodDisruptionBudget", f"{len(pdbs)} select its pods")
        for c in pod.get("containers") or []:
            r.check("readinessProbe" in c, f"{d} container {c['name']}", "no readinessProbe")
        anti = (
            ((pod.get("affinity") or {}).get("podAntiAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution"
            )
            or []
        )
        r.check(
            any(
                t.get("topologyKey") == "kubernetes.io/hostname"
                and selects(t.get("labelSelector"), labels)
                for t in anti
            ),
            f"{d} podAntiAffinity",
            "must require its pods on distinct nodes (kubernetes.io/hostname)",
        )
    example = [
        d
        for d in docs
        if d.kind == "StatefulSet" and d.path.startswith("example" + os.sep)
    ]
    r.check(bool(example), "example StatefulSet", "none under example/")
    for d in example:
        claims = d.body["spec"].get("volumeClaimTemplates") or []
        r.check(
            all(t["spec"].get("storageClassName") == "ballast-r3" for t in claims),
            f"{d} storageClassName",
            "the example's claims use ballast-r3",
        )


def check_namespaces_and_references(docs, r):
    namespaces = {d.name for d in docs if d.kind == "Namespace"}
    r.check(NAMESPACE in namespaces, f"Namespace {NAMESPACE}", "missing")
    keys = {}
    for d in docs:
        key = (d.body["apiVersion"].split("/")[0], d.kind, d.namespace, d.name)
        r.check(key not in keys, str(d), f"duplicate of {keys.get(key)}")
        keys[key] = d
        scoped = d.kind in CLUSTER_SCOPED
        example = d.path.startswith("example" + os.sep)
        if scoped:
            r.check(d.namespace is None, str(d), "cluster-scoped, must have no namespace")
        elif not example:
            r.check(d.namespace == NAMESPACE, str(d), f"must be in namespace {NAMESPACE}")
    accounts = {(d.namespace, d.name) for d in docs if d.kind == "ServiceAccount"}
    for d in docs:
        spec = pod_spec(d)
        if spec is not None and "serviceAccountName" in spec:
            sa = (d.namespace, spec["serviceAccountName"])
            r.check(sa in accounts, f"{d} serviceAccountName", f"no ServiceAccount {sa}")
    roles = {(d.kind, d.namespace, d.name) for d in docs if d.kind in ("Role", "ClusterRole")}
    for d in docs:
        if d.kind not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = d.body["roleRef"]
        ns = d.namespace if ref["kind"] == "Role" else None
        r.check(
            (ref["kind"], ns, ref["name"]) in roles,
            f"{d} roleRef",
            f"no {ref['kind']} {ref['name']}",
        )
        for s in d.body.get("subjects") or []:
            if s["kind"] == "ServiceAccount":
                r.check(
                    (s.get("namespace"), s["name"]) in accounts,
                    f"{d} subject",
                    f"no ServiceAccount {s.get('namespace')}/{s['name']}",
                )


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes"
    if not os.path.isdir(root):
        print(f"check_manifests: {root} is not a directory", file=sys.stderr)
        return 2
    r = Report()
    files, docs, errors = load(root)
    r.check(bool(files), root, "no *.yaml or *.yml files")
    for e in errors:
        r.check(False, e)
    print(
        f"check_manifests: {len(docs)} objects in {len(files)} files under {root}, "
        f"Kubernetes {K8S_VERSION} schemas (kubernetes-validate "
        f"{kubernetes_validate.__version__}, strict)"
    )
    validate_schemas(docs, r)
    check_resources(docs, r)
    check_csidriver(docs, r)
    check_node_daemonset(docs, r)
    check_sidecars(docs, r)
    check_storage_classes(docs, r)
    check_statefulsets(docs, r)
    check_namespaces_and_references(docs, r)
    print(f"check_manifests: {r.passed + r.failed} checks, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
