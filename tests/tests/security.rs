//! Issue 14, the local surfaces: who on the same host can reach a daemon.
//!
//! (The FUSE attach mount's permissions are tested with the other attach tests, in
//! `attach_block.rs`.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use integration_tests::{Daemon, NodeDir};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every unix socket the daemon serves (the local API, NBD, CSI, Docker) is 0600, and the
/// data directory 0700, even when the daemon starts under a umask of 000. Before: the CSI and
/// Docker sockets were left as the umask made them (0777 here), and the API and NBD sockets
/// were `chmod`ed only after `bind`, open to anyone in between.
#[test]
fn every_socket_is_private_even_under_a_permissive_umask() {
    let node = NodeDir::new().unwrap();
    let csi = node.scratch("csi/csi.sock");
    let docker = node.scratch("docker/plugins/ballast.sock");
    let mut args = node.daemon_args();
    args.extend([
        "--csi-socket".to_owned(),
        csi.display().to_string(),
        "--docker-socket".to_owned(),
        docker.display().to_string(),
    ]);
    let mut daemon = Daemon::spawn_under_umask(&node, 0, args).unwrap();
    daemon.wait_ready(Duration::from_secs(30)).unwrap();
    let nbd = node.data_dir().join("nbd.sock");
    for socket in [node.socket(), nbd.clone(), csi.clone(), docker.clone()] {
        assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    }
    assert_eq!(mode(&node.data_dir()), 0o700);
    // The directories the daemon made for its sockets are private too, and nothing is left
    // of the private directories the sockets were bound in.
    for socket in [&csi, &docker] {
        let dir = socket.parent().unwrap();
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
    // The daemon still serves through them.
    daemon.cli(["volume", "list"]).success();
    assert!(daemon.terminate().unwrap().success());
    for socket in [node.socket(), nbd, csi, docker] {
        assert!(
            !socket.exists(),
            "{} is removed at shutdown",
            socket.display()
        );
    }
}
