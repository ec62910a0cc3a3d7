//! The Kubernetes manifests in `deploy/kubernetes`: every YAML file under it (the directory is
//! walked, so a new file is covered without touching this test) is validated against the
//! Kubernetes API schemas, strictly, and the facts the README relies on are asserted.
//!
//! The work is done by `tests/k8s/check_manifests.py`, which uses `kubernetes-validate` from
//! PyPI: it bundles the schemas, so no cluster and no network is needed. `scripts/test`
//! installs it; without it these tests fail (they do not skip) and say how to install it. A
//! kind without a bundled schema fails, except the custom resources the script checks by hand
//! (VolumeSnapshotClass).
//!
//! The second test breaks copies of the manifests in known ways and expects each to be caught,
//! so a checker that stopped checking (say, lost its strict mode) cannot pass silently.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn manifests() -> PathBuf {
    workspace().join("deploy/kubernetes")
}

/// Runs the checker on `dir`: its exit code and its stdout and stderr together.
fn check(dir: &Path) -> (i32, String) {
    let script = workspace().join("tests/k8s/check_manifests.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Replaces the first `old` in `file` (relative to `dir`) by `new`; `old` must be there.
fn edit(dir: &Path, file: &str, old: &str, new: &str) {
    let path = dir.join(file);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(old), "{file} no longer contains {old:?}");
    fs::write(&path, text.replacen(old, new, 1)).unwrap();
}

#[test]
fn every_manifest_matches_the_kubernetes_schemas_and_the_documented_facts() {
    let (code, out) = check(&manifests());
    assert_eq!(code, 0, "deploy/kubernetes fails its checks:\n{out}");
    // Sanity: the walk found the files this test is about.
    for file in [
        "02-csidriver.yaml",
        "04-node-daemonset.yaml",
        "snapshots/snapshotclass.yaml",
    ] {
        assert!(
            manifests().join(file).is_file(),
            "deploy/kubernetes/{file} is missing"
        );
    }
    assert!(out.contains(", 0 failed"), "no closing count:\n{out}");
}

#[test]
fn a_broken_manifest_fails_the_check() {
    type Break = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    );
    let cases: [Break; 8] = [
        (
            "a misspelt field in a container",
            "05-controller.yaml",
            "          securityContext:",
            "          securityContxt:",
            "'securityContxt' was unexpected",
        ),
        (
            "a string where the schema wants an integer",
            "04-node-daemonset.yaml",
            "failureThreshold: 6",
            "failureThreshold: \"6\"",
            "is not of type 'integer'",
        ),
        (
            "a kind with no schema",
            "02-csidriver.yaml",
            "kind: CSIDriver",
            "kind: CSIDriverz",
            "no schema for storage.k8s.io/v1 CSIDriverz",
        ),
        (
            "a snapshot class for another driver",
            "snapshots/snapshotclass.yaml",
            "driver: csi.ballast.dev",
            "driver: csi.example.dev",
            "driver is 'csi.example.dev'",
        ),
        (
            "a parameter the driver refuses",
            "06-storageclasses.yaml",
            "  zoneSpread: soft\n",
            "  zoneSpread: soft\n  encrypted: \"true\"\n",
            "the driver refuses ['encrypted']",
        ),
        (
            "an update that stops the old pod before the new one runs (no hand-over)",
            "04-node-daemonset.yaml",
            "      maxSurge: 1\n      maxUnavailable: 0",
            "      maxUnavailable: 1",
            "must be RollingUpdate with maxSurge 1",
        ),
        (
            "an old pod's daemon that exits after handing over (its container would restart)",
            "04-node-daemonset.yaml",
            "            - --after-hand-over=wait",
            "            - --after-hand-over=exit",
            "ballast --after-hand-over",
        ),
        (
            "the kubelet directory without Bidirectional propagation",
            "04-node-daemonset.yaml",
            "mountPath: /var/lib/kubelet\n              mountPropagation: Bidirectional",
            "mountPath: /var/lib/kubelet\n              mountPropagation: HostToContainer",
            "ballast mount of /var/lib/kubelet",
        ),
    ];
    for (what, file, old, new, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&manifests(), dir.path());
        edit(dir.path(), file, old, new);
        let (code, out) = check(dir.path());
        assert_eq!(code, 1, "{what} in {file} was not caught:\n{out}");
        assert!(
            out.contains(expect),
            "{what} in {file}: expected {expect:?} in:\n{out}"
        );
    }
    // A new file is picked up by the walk, and an unknown custom resource in it fails.
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&manifests(), dir.path());
    fs::write(
        dir.path().join("example/monitor.yaml"),
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: ballast\n",
    )
    .unwrap();
    let (code, out) = check(dir.path());
    assert_eq!(code, 1, "an unknown custom resource was not caught:\n{out}");
    assert!(
        out.contains("no schema for monitoring.coreos.com/v1 ServiceMonitor"),
        "{out}"
    );
}
