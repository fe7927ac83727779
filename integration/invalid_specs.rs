//! Bad input through the real CLI: every spec in integration/invalid/ (and a generated
//! 10 MB file) exits 2 with a message naming the problem and its location, and a kernel
//! dump of the node before and after `apply` is identical.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

struct Case {
    file: PathBuf,
    expect: String,
    location: String,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/invalid");
    let table = std::fs::read_to_string(dir.join("EXPECTED.tsv")).expect("EXPECTED.tsv");
    let cases: Vec<Case> = table
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert!(cols.len() >= 3, "bad EXPECTED.tsv row: {l}");
            Case {
                file: dir.join(cols[0]),
                expect: cols[1].to_owned(),
                location: cols[2].to_owned(),
            }
        })
        .collect();
    assert!(cases.len() >= 30, "corpus has only {} cases", cases.len());
    cases
}

fn check_message(case: &Case, stderr: &str) {
    assert!(
        stderr.to_lowercase().contains(&case.expect.to_lowercase()),
        "{}: expected {:?} in: {stderr}",
        case.file.display(),
        case.expect
    );
    if case.location != "-" {
        let want = format!("{}:{}", case.file.display(), case.location);
        assert!(
            stderr.contains(&want),
            "{}: expected location {want} in: {stderr}",
            case.file.display()
        );
    }
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "message should be one line: {stderr}"
    );
}

#[test]
fn every_invalid_spec_is_refused_with_its_location() {
    for case in corpus() {
        let out = Command::new(BIN)
            .args(["validate", "-f"])
            .arg(&case.file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            case.file.display(),
            stderr(&out)
        );
        check_message(&case, &stderr(&out));
    }
}

#[test]
fn invalid_specs_change_nothing_in_the_kernel() {
    let c = Cluster::new("bad", 1, false, 1500);
    // Something of ours in place first, so "nothing changed" covers existing objects.
    let good = c.spec(
        "good.yaml",
        "  - name: blue\n    vni: 100\n    addresses: {node-a: 10.1.0.1/24}\n",
    );
    c.apply("node-a", &good);
    let before = c.kernel_dump("node-a");
    let huge = c.dir.path().join("huge.yaml");
    let mut text = String::from("apiVersion: ovl/v1\ncluster:\n  name: x\nnodes:\n");
    while text.len() < 10 << 20 {
        text.push_str("  - name: n\n    address: 192.0.2.1\n");
    }
    std::fs::write(&huge, text).unwrap();
    let mut cases = corpus();
    cases.push(Case {
        file: huge,
        expect: "larger than".into(),
        location: "1:1".into(),
    });
    for case in &cases {
        for args in [
            vec!["apply", "-f"],
            vec!["apply", "--dry-run", "-f"],
            vec!["delete", "-f"],
        ] {
            let mut full = args.clone();
            full.push(case.file.to_str().unwrap());
            let out = c.ctl("node-a", &full);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?} {}: {}",
                case.file.display(),
                stderr(&out)
            );
            check_message(case, &stderr(&out));
        }
    }
    assert_eq!(c.kernel_dump("node-a"), before);
}

#[test]
fn spec_from_stdin_is_located_as_stdin() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf 'apiVersion: ovl/v1\\ncluster: {{name: x}}\\nnodes: []\\nbogus: 1\\n' | {BIN} validate -f -"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("<stdin>:"), "{}", stderr(&out));
    // A valid one is named the same way.
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/config/networks.yaml");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{BIN} validate -f - < {spec}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("<stdin>: valid"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["apply"],
        vec!["frobnicate"],
        vec!["status", "-o", "xml"],
        vec!["status", "--log-level", "bogus"],
        vec!["validate", "-f", "/nonexistent/spec.yaml"],
        vec![
            "validate",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/networks.yaml"),
            "--node",
            "no-such-node",
        ],
        // A --node the spec does not know, for delete as for apply (no agent answers
        // on that socket, so the command itself must refuse it).
        vec![
            "delete",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/networks.yaml"),
            "--node",
            "no-such-node",
            "--dry-run",
            "--socket",
            "/nonexistent/agent.sock",
        ],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn keygen_makes_missing_directories_for_root_only_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("etc/ovl-controller/node.key");
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let public = stdout(&out).trim().to_owned();
    assert_eq!(public.len(), 44, "{public:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(key.parent().unwrap()), 0o700);
    assert_eq!(mode(&dir.path().join("etc")), 0o700);
    let before = std::fs::read(&key).unwrap();
    let again = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    // Refusing to overwrite an identity is a usage error (exit 2).
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(&key).unwrap(), before);
    assert!(!stdout(&again).contains(&public));

    // The public key cannot be printed (a full disk behind stdout): a failure that says
    // where the private key went, not a silent success.
    let lost = dir.path().join("lost.key");
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&lost)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&lost.display().to_string()),
        "{}",
        stderr(&out)
    );
}

/// An error at a place in the spec starts with that place, as compilers write them
/// (the README's `net.yaml:12:10: ...`); other errors start with `error: `.
#[test]
fn spec_errors_start_with_their_place() {
    let case = corpus()
        .into_iter()
        .find(|c| c.location.contains(':'))
        .expect("a corpus case with a line and column");
    let out = Command::new(BIN)
        .args(["validate", "-f"])
        .arg(&case.file)
        .output()
        .unwrap();
    let err = stderr(&out);
    let place = format!("{}:{}: ", case.file.display(), case.location);
    assert!(err.starts_with(&place), "{place:?} first in: {err}");
    let out = Command::new(BIN)
        .args(["validate", "-f", "/nonexistent/net.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

/// Mistakes in the invocation exit 2 before anything runs: an agent's --key that
/// names no file (its node has a publicKey), a --state-dir that others may write to
/// (named in the message).
#[test]
fn a_missing_key_or_an_unsafe_state_dir_exits_2() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/config/networks.yaml");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let socket = dir.path().join("agent.sock");
    let missing = dir.path().join("missing.key");
    // `args`, then the state dir and socket of this test.
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let missing_path = missing.display().to_string();
    let out = run(&[
        "agent",
        "-f",
        spec,
        "--node",
        "node-a",
        "--key",
        &missing_path,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&missing_path), "{}", stderr(&out));

    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(&["apply", "-f", spec]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}: group or others may write", state.display())),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o777,
        "left as it was"
    );
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    // The reader is gone before the command writes: its output is dropped, its exit
    // code is its own (no panic, no 101).
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/config/networks.yaml");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; (sleep 0.3; exec {BIN} validate -f {spec}) | head -c 0"
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    // Output lost otherwise (a full disk behind `> file`) is a failure: exit 1, saying so.
    let out = Command::new(BIN)
        .args(["validate", "-f", spec])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot write the output"),
        "{}",
        stderr(&out)
    );
}
