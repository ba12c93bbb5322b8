//! Real programs on a real mount: git, tar, cp -a, rsync -a and sqlite3 work as on a local
//! directory, checked against the same work done on a plain directory (diff -r, git fsck,
//! sqlite's integrity check).
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::mount::{fuse_available, Mount};
use common::{sh, tools_present};

/// A source tree to copy around: this repository's own sources.
fn source_tree(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("src-tree");
    let repo = env!("CARGO_MANIFEST_DIR");
    sh(
        dir,
        &format!(
            "mkdir -p {t} && cp -r {repo}/src {repo}/tests {repo}/docs {repo}/Cargo.toml {t}/",
            t = tree.display()
        ),
    );
    tree
}

#[test]
fn git_init_and_commits() {
    if !fuse_available() || !tools_present(&["git"]) {
        return;
    }
    let m = Mount::new(4096, &[]);
    let tree = source_tree(m.dir.path());
    sh(
        &m.mnt,
        &format!(
            "git init -q repo && cd repo && git config user.email t@example.com && git config user.name t
             cp -r {tree}/src . && git add -A && git commit -qm one
             cp -r {tree}/tests . && git add -A && git commit -qm two
             echo change >> src/lib.rs && git commit -qam three
             git mv src/lib.rs src/library.rs && git commit -qm four
             git gc -q && git fsck --strict",
            tree = tree.display()
        ),
    );
    assert_eq!(sh(&m.p("repo"), "git log --oneline | wc -l").trim(), "4");
    assert_eq!(sh(&m.p("repo"), "git status --porcelain").trim(), "");
}

#[test]
fn tar_cp_rsync_round_trip() {
    if !fuse_available() || !tools_present(&["tar", "rsync", "diff"]) {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let tree = source_tree(m.dir.path());
    let t = tree.display();
    sh(m.dir.path(), &format!("tar -C {t} -cf tree.tar ."));
    sh(
        &m.mnt,
        &format!(
            "mkdir untar && tar -C untar -xf {}/tree.tar && diff -r {t} untar",
            m.dir.path().display()
        ),
    );
    sh(&m.mnt, &format!("cp -a {t} copied && diff -r {t} copied"));
    sh(
        &m.mnt,
        &format!("rsync -a {t}/ synced/ && diff -r {t} synced"),
    );
    sh(
        &m.mnt,
        &format!("rsync -a --delete {t}/ synced/ && diff -r {t} synced"),
    );
    m.remount();
    sh(
        &m.mnt,
        &format!("diff -r {t} untar && diff -r {t} copied && diff -r {t} synced"),
    );
    // And out again: a tar made from the mount extracts to the original.
    let out = m.dir.path().join("out");
    let o = out.display();
    sh(
        &m.mnt,
        &format!("mkdir {o} && tar -C copied -cf - . | tar -C {o} -xf - && diff -r {t} {o}"),
    );
}

#[test]
fn sqlite_thousands_of_transactions() {
    if !fuse_available() || !tools_present(&["sqlite3"]) {
        return;
    }
    let mut m = Mount::new(4096, &[]);
    let mut script = String::from("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);\n");
    for i in 0..3000 {
        script.push_str(&format!(
            "BEGIN; INSERT INTO t (v) VALUES ('value {i} {}'); COMMIT;\n",
            "y".repeat(i % 200)
        ));
    }
    script.push_str(
        "UPDATE t SET v = v || '!' WHERE id % 7 = 0;\nDELETE FROM t WHERE id % 11 = 0;\n",
    );
    std::fs::write(m.dir.path().join("script.sql"), &script).unwrap();
    sh(
        &m.mnt,
        &format!("sqlite3 db.sqlite < {}/script.sql", m.dir.path().display()),
    );
    m.remount();
    let out = sh(
        &m.mnt,
        "sqlite3 db.sqlite 'PRAGMA integrity_check; SELECT count(*) FROM t;'",
    );
    let want = 3000 - (1..=3000).filter(|i| i % 11 == 0).count();
    assert_eq!(out.trim(), format!("ok\n{want}"));
}
