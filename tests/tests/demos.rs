//! The demos in examples/, each run the way a user runs it (with the binaries this suite tests); each ends
//! with "== ok" only when its own checks passed.

use vos_tests::*;

fn demo(name: &str) {
    // A demo that hangs fails after 5 minutes instead of holding the suite.
    let o = std::process::Command::new("timeout")
        .args(["-k", "10", "300"])
        .arg(repo().join("examples").join(name).join("run.sh"))
        .env("VOS_BIN", bin_dir())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_ne!(o.status.code(), Some(124), "the {name} demo did not finish within 300 s: {out}");
    assert!(o.status.success() && out.contains("== ok"), "the {name} demo failed: {out}\n{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn quickstart() {
    demo("quickstart");
}

#[test]
fn sqlite_transaction() {
    demo("sqlite-transaction");
}

#[test]
fn migrate_redis() {
    demo("migrate-redis");
}

#[test]
fn bash_vim() {
    demo("bash-vim");
}

#[test]
fn python_numpy() {
    demo("python-numpy");
}

#[test]
fn python_repl() {
    demo("python-repl");
}

#[test]
fn java_threads() {
    demo("java-threads");
}

#[test]
fn make_project() {
    demo("make-project");
}
