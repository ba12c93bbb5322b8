//! The command line as a user meets it: the happy path, and bad input for every command.
//! Bad input must give exactly one line on stderr, a non-zero exit code, no panic, and
//! change nothing on disk (the backing directory and the key directory are snapshotted).
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

struct Env {
    dir: tempfile::TempDir,
}

struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Env {
    fn new() -> Self {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir(env.backing()).unwrap();
        env
    }

    fn backing(&self) -> PathBuf {
        self.dir.path().join("backing")
    }

    fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Where this environment's kmsfs processes keep their trust records.
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Out {
        self.run_in(&self.state_dir(), args, stdin)
    }

    /// As `run`, as another host would (its own trust records in `state`).
    fn run_in(&self, state: &Path, args: &[&str], stdin: &[u8]) -> Out {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kmsfs"))
            .args(args)
            .env("XDG_CONFIG_HOME", self.config_home())
            .env("KMSFS_STATE_DIR", state)
            .env_remove("RUST_LOG")
            // AWS settings that keep every request on this machine: no instance metadata
            // probe, and a KMS endpoint on a loopback port nothing listens on.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env_remove("AWS_PROFILE")
            .env_remove("KMSFS_KMS_ENDPOINTS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A command that fails early never reads its input.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().expect("exited, not killed"),
            stdout: out.stdout,
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    /// A volume with one file, `hello.txt`.
    fn volume(&self) -> &Self {
        let b = self.backing().display().to_string();
        let mut args = vec!["init", &b, "--block-size", "1K", "--context", "tenant=t1"];
        args.extend(common::names_args());
        let out = self.run(&args, b"");
        assert_eq!(out.code, 0, "{}", out.stderr);
        let out = self.run(&["import", &b, "hello.txt"], b"hello, kmsfs\n");
        assert_eq!(out.code, 0, "{}", out.stderr);
        self
    }

    /// The volume, opened here (through the key file its config names), to name stored paths.
    fn open(&self) -> kmsfs::core::Volume {
        kmsfs::core::Volume::open(&self.backing(), &Default::default()).unwrap()
    }

    /// Every file and directory under the temp dir: type, mode, size, content hash, mtime.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let mut desc = format!(
                    "{:o} {} {}.{}",
                    meta.mode(),
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec()
                );
                if meta.is_dir() {
                    walk(root, &path, out);
                } else if meta.is_file() {
                    desc += &format!(" {:x}", Sha256::digest(fs::read(&path).unwrap()));
                }
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), desc);
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }

    /// Runs a command that must fail cleanly, returning its one stderr line.
    fn fails(&self, args: &[&str], code: i32) -> String {
        self.fails_with(args, Some(code))
    }

    /// As `fails`, with any non-zero exit code when `code` is None.
    fn fails_with(&self, args: &[&str], code: Option<i32>) -> String {
        let before = self.snapshot();
        let out = self.run(args, b"some input");
        match code {
            Some(code) => assert_eq!(out.code, code, "{args:?}: stderr {}", out.stderr),
            None => assert_ne!(out.code, 0, "{args:?} succeeded: {}", out.stderr),
        }
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: stderr must be one line: {:?}",
            out.stderr
        );
        assert!(lines[0].starts_with("kmsfs: "), "{:?}", lines[0]);
        assert!(!out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"));
        assert_eq!(before, self.snapshot(), "{args:?} changed files on disk");
        lines[0].to_string()
    }
}

#[test]
fn init_import_cat_info_happy_path() {
    let env = Env::new();
    let b = env.backing().display().to_string();
    let out = env.run(&[&["init", &b][..], common::names_args()].concat(), b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key_line = stdout
        .lines()
        .find(|l| l.starts_with("created key file"))
        .expect(&stdout);
    let key_path = PathBuf::from(key_line.split_whitespace().nth(3).unwrap());
    assert!(
        key_path.starts_with(env.config_home().join("kmsfs/keys")),
        "{key_path:?}"
    );
    assert_eq!(fs::metadata(&key_path).unwrap().mode() & 0o777, 0o600);
    assert!(!key_path.starts_with(env.backing()));

    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(env.run(&["import", &b, "data.bin"], &data).code, 0);
    let out = env.run(&["cat", &b, "data.bin"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, data);

    let out = env.run(&["info", &b], b"");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("block size:  4096") && text.contains("config:      authenticated"),
        "{text}"
    );
    let names = if common::plaintext_names() {
        "names:       plaintext"
    } else {
        "names:       encrypted"
    };
    assert!(text.contains(names), "{text}");
    let out = env.run(
        &[
            "info",
            &b,
            "data.bin",
            "--key",
            &format!("local:{}", key_path.display()),
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("size:        100000 bytes in 25 blocks"),
        "{text}"
    );
    // The user's path, also where the envelope is bound (its stored path shown beside).
    assert!(
        text.contains("path:        /data.bin\n")
            && text.contains("bound to /data.bin\n")
            && text.contains("status:      authenticated"),
        "{text}"
    );
    let stored = common::stored(&env.open(), "data.bin");
    assert_eq!(
        text.contains(&format!("stored as:   {stored}\n")),
        !common::plaintext_names(),
        "{text}"
    );
    assert!(text.contains(&format!(
        "backing:     {}\n",
        env.backing().join(stored.to_relative_path()).display()
    )));
}

#[test]
fn info_and_cat_never_print_key_material() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let key_file = fs::read_dir(env.config_home().join("kmsfs/keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let master = fs::read(key_file).unwrap();
    let hex: String = master.iter().map(|x| format!("{x:02x}")).collect();
    for args in [
        vec!["info", &b],
        vec!["info", &b, "hello.txt"],
        vec!["cat", &b, "hello.txt"],
    ] {
        let out = env.run(&args, b"");
        let all = [out.stdout.clone(), out.stderr.into_bytes()].concat();
        assert!(!all.windows(32).any(|w| w == master.as_slice()));
        assert!(!String::from_utf8_lossy(&all).contains(&hex));
    }
}

#[test]
fn init_bad_input() {
    let env = Env::new();
    let b = env.backing().display().to_string();
    let msg = env.fails(&["init", &env.p("missing")], 1);
    assert!(msg.contains("does not exist"), "{msg}");
    fs::write(env.dir.path().join("plainfile"), b"x").unwrap();
    assert!(env
        .fails(&["init", &env.p("plainfile")], 1)
        .contains("not a directory"));
    assert!(env
        .fails(&["init", &b, "--context", "novalue"], 2)
        .contains("expected KEY=VALUE"));
    assert!(env
        .fails(&["init", &b, "--context", "kmsfs:path=x"], 2)
        .contains("reserved prefix"));
    assert!(env
        .fails(&["init", &b, "--block-size", "1000"], 2)
        .contains("invalid block size"));
    assert!(env
        .fails(&["init", &b, "--block-size", "big"], 2)
        .contains("not a size"));
    assert!(env
        .fails(&["init", &b, "--key", "mykey"], 2)
        .contains("unrecognized key"));
    let inside = format!("local:{}/../backing/k.key", b);
    assert!(env
        .fails(&["init", &b, "--key", &inside], 2)
        .contains("inside the backing directory"));
    let loose = env.dir.path().join("loose.key");
    fs::write(&loose, [7u8; 32]).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let msg = env.fails(
        &["init", &b, "--key", &format!("local:{}", loose.display())],
        4,
    );
    assert!(msg.contains("readable by group or others"), "{msg}");
    let empty = env.dir.path().join("empty.key");
    fs::write(&empty, b"").unwrap();
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(env
        .fails(
            &["init", &b, "--key", &format!("local:{}", empty.display())],
            4
        )
        .contains("exactly 32 bytes"));
    assert!(env
        .fails(&["init", &b, "--frobnicate"], 2)
        .contains("--frobnicate"));
    assert!(env.fails(&["init"], 2).contains("required"));
    // KMS unreachable: one line naming the call and the key, exit 4, nothing created.
    let msg = env.fails(&["init", &b, "--key", "alias/kmsfs"], 4);
    assert!(
        msg.contains("cannot reach the KMS endpoint")
            && msg.contains("DescribeKey with key alias/kmsfs"),
        "{msg}"
    );
    fs::write(env.backing().join("existing"), b"x").unwrap();
    assert!(env.fails(&["init", &b], 1).contains("is not empty"));
}

#[test]
fn init_twice_is_refused() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    assert!(env
        .fails(&["init", &b], 1)
        .contains("already a kmsfs volume"));
}

#[test]
fn commands_on_something_that_is_not_a_volume() {
    let env = Env::new();
    let b = env.backing().display().to_string();
    for cmd in ["info", "cat", "import"] {
        let mut args = vec![cmd, b.as_str()];
        if cmd != "info" {
            args.push("f");
        }
        assert!(env.fails(&args, 1).contains("is not a kmsfs volume"));
        let missing = env.p("missing");
        args[1] = &missing;
        assert!(env.fails(&args, 1).contains("does not exist"));
    }
    assert!(env.fails(&["bogus"], 2).contains("unrecognized subcommand"));
}

#[test]
fn wrong_missing_or_damaged_keys() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    // A pinned key the volume does not trust.
    let other = env.dir.path().join("other.key");
    let other_env = Env::new();
    let ob = other_env.backing().display().to_string();
    assert_eq!(
        other_env
            .run(
                &["init", &ob, "--key", &format!("local:{}", other.display())],
                b""
            )
            .code,
        0
    );
    let msg = env.fails(
        &[
            "cat",
            &b,
            "hello.txt",
            "--key",
            &format!("local:{}", other.display()),
        ],
        3,
    );
    assert!(msg.contains("is not protected by the key"), "{msg}");
    // The key file went missing.
    let keys = env.config_home().join("kmsfs/keys");
    let key_file = fs::read_dir(&keys).unwrap().next().unwrap().unwrap().path();
    let moved = env.dir.path().join("moved.key");
    fs::rename(&key_file, &moved).unwrap();
    let msg = env.fails(&["cat", &b, "hello.txt"], 4);
    assert!(
        msg.contains("does not exist") && msg.contains("--key"),
        "{msg}"
    );
    // ...and --key says where it went.
    let out = env.run(
        &[
            "cat",
            &b,
            "hello.txt",
            "--key",
            &format!("local:{}", moved.display()),
        ],
        b"",
    );
    assert_eq!(
        (out.code, out.stdout.as_slice()),
        (0, &b"hello, kmsfs\n"[..]),
        "{}",
        out.stderr
    );
    // An empty key file where the key should be.
    fs::write(&key_file, b"").unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(env.fails(&["info", &b], 4).contains("exactly 32 bytes"));
    // A key file others can read.
    fs::rename(&moved, &key_file).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(env.fails(&["info", &b], 4).contains("chmod 600"));
}

#[test]
fn damaged_configs_are_refused() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let cfg = env.backing().join(".kmsfs/config");
    let good = fs::read(&cfg).unwrap();
    // Truncated.
    fs::write(&cfg, &good[..good.len() / 2]).unwrap();
    assert!(env
        .fails(&["info", &b], 3)
        .contains("invalid volume config"));
    // Edited (the context value t1 -> t2).
    let mut edited = good.clone();
    let at = edited.windows(2).position(|w| w == b"t1").unwrap();
    edited[at + 1] = b'2';
    fs::write(&cfg, &edited).unwrap();
    assert!(env
        .fails(&["cat", &b, "hello.txt"], 3)
        .contains("authentication failed"));
    // An unknown feature flag (feature count at offset 32, each flag's length and name after
    // it; a volume with plaintext names has one already).
    let count = u16::from_be_bytes([good[32], good[33]]);
    assert_eq!(count, u16::from(common::plaintext_names()));
    let mut flagged = good[..32].to_vec();
    flagged.extend_from_slice(&(count + 1).to_be_bytes());
    flagged.extend_from_slice(&[0, 15]);
    flagged.extend_from_slice(b"future-features");
    flagged.extend_from_slice(&good[34..]);
    fs::write(&cfg, &flagged).unwrap();
    let msg = env.fails(&["info", &b], 3);
    assert!(
        msg.contains("unknown feature flag 'future-features'"),
        "{msg}"
    );
    fs::write(&cfg, &good).unwrap();
    assert_eq!(env.run(&["info", &b], b"").code, 0);
}

#[test]
fn cat_and_import_bad_paths() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    // Named by the user's paths (with encrypted names too).
    let msg = env.fails(&["cat", &b, "nope.txt"], 1);
    assert!(
        msg.contains("/nope.txt") && msg.contains("No such file"),
        "{msg}"
    );
    assert!(env.fails(&["cat", &b, "/"], 2).contains("volume root"));
    assert!(env.fails(&["cat", &b, "a/../hello.txt"], 2).contains(".."));
    assert!(env
        .fails(&["cat", &b, ".kmsfs/config"], 2)
        .contains("reserves"));
    let msg = env.fails(&["import", &b, "hello.txt"], 1);
    assert_eq!(msg, "kmsfs: /hello.txt already exists");
    let msg = env.fails(&["import", &b, "no/such/dir/f"], 1);
    assert_eq!(
        msg,
        "kmsfs: the parent directory of /no/such/dir/f does not exist"
    );
    let msg = env.fails(&["import", &b, "hello.txt/f"], 1);
    assert!(msg.contains("parent directory of /hello.txt/f"), "{msg}");
    assert!(env
        .fails(&["import", &b, "x", "--from", &env.p("missing")], 1)
        .contains("cannot open"));
}

#[test]
fn cat_of_tampered_or_moved_files_fails_with_the_reason() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let volume = env.open();
    let f = common::host_path(&volume, &env.backing(), "hello.txt");
    let mut raw = fs::read(&f).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    fs::write(&f, &raw).unwrap();
    // The user's paths, not the stored ones.
    let msg = env.fails(&["cat", &b, "hello.txt"], 3);
    assert_eq!(msg, "kmsfs: /hello.txt: authentication failed at block 0");
    raw[last] ^= 1;
    fs::write(&f, &raw).unwrap();
    // Moved within its directory, to the stored name of renamed.txt.
    let renamed = common::host_path(&volume, &env.backing(), "renamed.txt");
    fs::rename(&f, renamed).unwrap();
    let msg = env.fails(&["cat", &b, "renamed.txt"], 3);
    assert!(
        msg.starts_with("kmsfs: /renamed.txt: context mismatch")
            && msg.contains("bound to /hello.txt"),
        "{msg}"
    );
}

#[test]
fn completion_scripts_cover_every_command_and_bash_parses_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_kmsfs"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "init",
        "info",
        "cat",
        "import",
        "mount",
        "umount",
        "rewrap",
        "fsck",
        "adopt",
        "export",
        "status",
        "trust",
        "audit",
        "decode",
        "completions",
    ] {
        assert!(script.contains(cmd), "bash completion lacks {cmd}");
    }
    assert!(script.contains("--retire-old") && script.contains("--read-only"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kmsfs.bash");
    fs::write(&path, &script).unwrap();
    let st = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(st.success(), "bash -n rejects the script");
    for shell in ["zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kmsfs"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }
}

/// Every command, with each kind of bad input a user meets: nothing, a flag it does not know, a
/// backing directory that is a file or missing, a truncated config, an empty key file, and for
/// the mount commands a busy or missing mountpoint. Each gives one line, a non-zero exit and
/// leaves the disk as it was.
#[test]
fn every_command_refuses_bad_input_in_one_line() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let file = env.p("plainfile");
    fs::write(&file, b"not a directory").unwrap();
    let missing = env.p("missing");
    let dest = env.p("exported");
    let empty_key = env.dir.path().join("empty.key");
    fs::write(&empty_key, b"").unwrap();
    fs::set_permissions(&empty_key, fs::Permissions::from_mode(0o600)).unwrap();
    let empty_key = format!("local:{}", empty_key.display());
    let other_key = format!("local:{}", env.p("other.key"));
    // Each command with the arguments it needs after BACKING.
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("info", vec![]),
        ("cat", vec!["hello.txt"]),
        ("import", vec!["new.txt"]),
        ("mount", vec![&missing]),
        ("rewrap", vec!["--to-key", &other_key]),
        ("fsck", vec![]),
        ("adopt", vec!["hello.txt", "--from", "old.txt"]),
        ("export", vec![&dest]),
        ("audit", vec![]),
        ("decode", vec!["/x"]),
    ];
    for (cmd, rest) in &commands {
        env.fails(&[cmd], 2);
        env.fails(&[cmd, &b, "--no-such-flag"], 2);
        for backing in [&file, &missing] {
            let mut args = vec![*cmd, backing.as_str()];
            args.extend(rest);
            let msg = env.fails_with(&args, None);
            assert!(
                msg.contains("not a directory") || msg.contains("does not exist"),
                "{args:?}: {msg}"
            );
        }
        if *cmd != "mount" {
            let mut args = vec![*cmd, b.as_str()];
            args.extend(rest);
            args.extend(["--key", &empty_key]);
            let msg = env.fails_with(&args, None);
            assert!(
                msg.contains("32 bytes") || msg.contains("empty"),
                "{args:?}: {msg}"
            );
        }
    }
    for cmd in ["umount", "status"] {
        env.fails(&[cmd], 2);
        env.fails_with(&[cmd, &missing], None);
        env.fails_with(&[cmd, &b], None);
    }
    env.fails(&["completions", "no-such-shell"], 2);
    env.fails(&["no-such-command"], 2);

    // A truncated config: every command that opens the volume says so.
    let config = env.backing().join(".kmsfs/config");
    let whole = fs::read(&config).unwrap();
    fs::write(&config, &whole[..whole.len() / 2]).unwrap();
    for (cmd, rest) in &commands {
        if *cmd == "mount" {
            continue;
        }
        let mut args = vec![*cmd, b.as_str()];
        args.extend(rest);
        env.fails_with(&args, None);
    }
    fs::write(&config, &whole).unwrap();
}

/// `kmsfs mount` on a mountpoint that is already mounted is refused in one line.
#[test]
fn mounting_on_a_busy_mountpoint_is_refused() {
    if !std::path::Path::new("/dev/fuse").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/fuse missing under CI"
        );
        return;
    }
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let mnt = env.dir.path().join("busy");
    fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success());
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    let msg = env.fails_with(&["mount", &b, &mnt.display().to_string()], None);
    assert!(
        msg.contains("already") || msg.contains("busy") || msg.contains("mounted"),
        "{msg}"
    );
}

/// The trusted keys as `info` lists them (first: the key new files use).
fn trusted_ids(info_stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(info_stdout)
        .lines()
        .filter(|l| l.starts_with("  local:") || l.starts_with("  arn:"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

/// Without --key, init records the volume's keys on this host; a change made elsewhere (here
/// a rewrap run with another host's records) is refused by every command that opens the
/// volume, in one line saying what changed and how to approve it; `kmsfs trust` approves it;
/// a rewrap run here updates the record itself.
#[test]
fn every_command_refuses_a_key_set_changed_elsewhere_until_trust_approves_it() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let records = env.state_dir().join("volumes");
    assert_eq!(fs::read_dir(&records).unwrap().count(), 1, "init records");
    let old = trusted_ids(&env.run(&["info", &b], b"").stdout);
    // Another host rotates the key.
    let elsewhere = env.dir.path().join("elsewhere");
    let new_key = format!("local:{}", env.p("new.key"));
    let out = env.run_in(&elsewhere, &["rewrap", &b, "--to-key", &new_key], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let new = trusted_ids(&env.run_in(&elsewhere, &["info", &b], b"").stdout);
    assert_eq!(new[0..1], [new[0].clone()]);
    assert_ne!(new[0], old[0]);
    let expected = format!(
        "kmsfs: {b}: its trusted keys changed since this host recorded them (added {}; new files now use {}, not {}); if you made this change, approve it with 'kmsfs trust {b}'",
        new[0], new[0], old[0]
    );
    fs::create_dir(env.dir.path().join("mnt")).unwrap();
    let dest = env.p("exported");
    let mnt = env.p("mnt");
    for args in [
        vec!["info", &b],
        vec!["cat", &b, "hello.txt"],
        vec!["import", &b, "new.txt"],
        vec!["fsck", &b],
        vec!["export", &b, &dest],
        vec!["rewrap", &b, "--to-key", &new_key],
        vec!["adopt", &b, "hello.txt", "--from", "hello.txt"],
        vec!["mount", &b, &mnt, "--foreground"],
    ] {
        assert_eq!(env.fails(&args, 3), expected, "{args:?}");
    }
    // Approving: one line of what changed, and the commands work again.
    let out = env.run(&["trust", &b], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(
        said.contains(&format!(
            "approved: added {}; new files now use {}",
            new[0], new[0]
        )),
        "{said}"
    );
    let out = env.run(&["cat", &b, "hello.txt"], b"");
    assert_eq!(
        (out.code, out.stdout.as_slice()),
        (0, &b"hello, kmsfs\n"[..]),
        "{}",
        out.stderr
    );
    // A rewrap run here updates the record for its own change.
    let third = format!("local:{}", env.p("third.key"));
    let out = env.run(&["rewrap", &b, "--to-key", &third], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = env.run(&["info", &b], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(trusted_ids(&out.stdout).len(), 3);
    // A pin the config only lists (the old key, still trusted but no longer the first) is
    // refused: new files would not get their keys from it.
    let out = env.run_in(&elsewhere, &["info", &b, "--key", &new_key], b"");
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "kmsfs: {b}: new files would get their keys from {}, which is not pinned; pin it too (--key), or make a pinned key the first with 'kmsfs rewrap --to-key'",
            trusted_ids(&env.run(&["info", &b], b"").stdout)[0]
        )
    );
    // Positive control: the first key pinned.
    let out = env.run_in(&elsewhere, &["info", &b, "--key", &third], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// A `local:` key file inside the backing directory is refused, pinned or named by the
/// config; and the record never follows a locator the config wrote.
#[test]
fn a_key_file_inside_the_backing_directory_is_refused_when_pinned() {
    let env = Env::new();
    env.volume();
    let b = env.backing().display().to_string();
    let inside = env.backing().join("stolen.key");
    fs::write(&inside, [9u8; 32]).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o600)).unwrap();
    let msg = env.fails(
        &["info", &b, "--key", &format!("local:{}", inside.display())],
        2,
    );
    assert!(msg.contains("is inside the backing directory"), "{msg}");
    // Positive control: unpinned, through the record, the volume opens.
    assert_eq!(env.run(&["info", &b], b"").code, 0);
}

/// A CloudTrail event of a KMS call, in the format AWS documents for KMS's CloudTrail log
/// entries (userIdentity, requestParameters with the key and the encryption context, ...).
fn cloudtrail_event(
    name: &str,
    time: &str,
    user: &str,
    ip: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    serde_json::json!({
        "eventVersion": "1.11",
        "userIdentity": {
            "type": "IAMUser",
            "principalId": "AIDAEXAMPLEPRINCIPAL",
            "arn": format!("arn:aws:iam::111122223333:user/{user}"),
            "accountId": "111122223333",
            "accessKeyId": "AKIAEXAMPLEKEYID",
            "userName": user
        },
        "eventTime": time,
        "eventSource": "kms.amazonaws.com",
        "eventName": name,
        "awsRegion": "eu-west-1",
        "sourceIPAddress": ip,
        "userAgent": "aws-sdk-rust/1.3 os/linux lang/rust",
        "requestParameters": params,
        "responseElements": null,
        "additionalEventData": {
            "keyMaterialId": "123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0"
        },
        "requestID": "e0eb83e3-63bc-11e4-bc2b-4198b6150d5c",
        "eventID": "a9dea4f9-8395-46c0-942c-f509c02c2b71",
        "readOnly": true,
        "resources": [{ "accountId": "111122223333", "type": "AWS::KMS::Key", "ARN": key }],
        "eventType": "AwsApiCall",
        "managementEvent": true,
        "recipientAccountId": "111122223333",
        "eventCategory": "Management"
    })
}

const LONG_NAME: &str = "board-minutes-2026-q4-acquisition-of-initech-and-globex-subsidiaries-\
    final-redlined-version-approved-by-legal-and-finance-for-the-december-board-meeting-v3.docx";

/// CloudTrail records of calls on a real volume (encrypted names): `kmsfs audit` names the
/// files by their plaintext paths, which the records do not hold, in a gzipped log file and in
/// JSON lines on standard input; `kmsfs decode` maps one stored path back.
#[test]
fn audit_and_decode_show_the_plaintext_paths_cloudtrail_hides() {
    use serde_json::json;
    if common::plaintext_names() {
        eprintln!("skipping: this run makes volumes with plaintext names, nothing to decode");
        return;
    }
    let env = Env::new();
    let tv = common::TestVolume::new(4096);
    let b = tv.backing.display().to_string();
    let key = format!("local:{}", tv.key_path.display());
    let volume_id = tv.volume.id_hex();
    for d in ["acme-corp", "inbox", "old-reports"] {
        tv.mkdir(d);
    }
    let long = format!("acme-corp/{LONG_NAME}");
    assert!(LONG_NAME.len() >= 160, "a name stored under a side record");
    for f in [
        "acme-corp/payroll-2026-12.xlsx",
        "a",
        &long,
        "inbox/payroll-draft.xlsx",
        "old-reports/q3-board-deck.pdf",
    ] {
        tv.write(f, b"quarterly numbers");
    }
    let stored = |p: &str| tv.stored(p).to_string();
    let payroll = stored("acme-corp/payroll-2026-12.xlsx");
    let removed = stored("old-reports/q3-board-deck.pdf");
    // The directory goes after the calls were logged (rm -r through a mount).
    fs::remove_dir_all(tv.backing_file("old-reports")).unwrap();
    let context = |stored: &str| json!({ "kmsfs:volume": volume_id, "kmsfs:path": stored, "tenant_id": "acme" });
    let decrypt = |ctx: serde_json::Value| {
        json!({
            "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "keyId": "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "encryptionContext": ctx
        })
    };
    let mut denied = cloudtrail_event(
        "Decrypt",
        "2026-12-01T09:03:00Z",
        "mallory",
        "203.0.113.9",
        decrypt(context(&stored("a"))),
    );
    denied["errorCode"] = json!("AccessDeniedException");
    denied["errorMessage"] = json!("User is not authorized to perform: kms:Decrypt");
    let mut other_volume = context(&payroll);
    other_volume["kmsfs:volume"] = json!("0123456789abcdef0123456789abcdef");
    let records = vec![
        cloudtrail_event(
            "Decrypt",
            "2026-12-01T09:00:00Z",
            "kmsfs-host",
            "192.0.2.10",
            decrypt(json!({
                "kmsfs:volume": volume_id, "kmsfs:purpose": "volume-config", "tenant_id": "acme"
            })),
        ),
        cloudtrail_event(
            "GenerateDataKey",
            "2026-12-01T09:01:00Z",
            "kmsfs-host",
            "192.0.2.10",
            json!({ "keyId": "alias/kmsfs", "keySpec": "AES_256", "encryptionContext": context(&payroll) }),
        ),
        cloudtrail_event(
            "Decrypt",
            "2026-12-01T09:02:00Z",
            "alice",
            "198.51.100.7",
            decrypt(context(&stored(&long))),
        ),
        denied,
        cloudtrail_event(
            "ReEncrypt",
            "2026-12-01T09:04:00Z",
            "kmsfs-host",
            "192.0.2.10",
            json!({
                "sourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "sourceEncryptionContext": context(&stored("inbox/payroll-draft.xlsx")),
                "destinationKeyId": "1234abcd-12ab-34cd-56ef-1234567890ab",
                "destinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "destinationEncryptionContext": context(&payroll)
            }),
        ),
        cloudtrail_event(
            "Decrypt",
            "2026-12-01T09:05:00Z",
            "bob",
            "198.51.100.8",
            decrypt(context(&removed)),
        ),
        cloudtrail_event(
            "Decrypt",
            "2026-12-01T09:06:00Z",
            "someone-else",
            "192.0.2.99",
            decrypt(other_volume),
        ),
    ];
    let log = serde_json::to_vec(&json!({ "Records": records })).unwrap();
    let text = String::from_utf8(log.clone()).unwrap();
    assert!(tv.volume.encrypted_names());
    {
        for plain in [
            "payroll-2026-12",
            "acme-corp",
            LONG_NAME,
            "payroll-draft",
            "old-reports",
            "q3-board-deck",
        ] {
            assert!(!text.contains(plain), "CloudTrail names {plain}");
        }
    }
    let expected = [
        "2026-12-01T09:00:00Z arn:aws:iam::111122223333:user/kmsfs-host Decrypt ? (volume config) 192.0.2.10".to_string(),
        "2026-12-01T09:01:00Z arn:aws:iam::111122223333:user/kmsfs-host GenerateDataKey /acme-corp/payroll-2026-12.xlsx 192.0.2.10".to_string(),
        format!("2026-12-01T09:02:00Z arn:aws:iam::111122223333:user/alice Decrypt /acme-corp/{LONG_NAME} 198.51.100.7"),
        "2026-12-01T09:03:00Z arn:aws:iam::111122223333:user/mallory Decrypt(failed:AccessDeniedException) /a 203.0.113.9".to_string(),
        "2026-12-01T09:04:00Z arn:aws:iam::111122223333:user/kmsfs-host ReEncrypt /inbox/payroll-draft.xlsx -> /acme-corp/payroll-2026-12.xlsx 192.0.2.10".to_string(),
    ];
    let check_text = |out: &Out| {
        assert_eq!(out.code, 0, "{}", out.stderr);
        let stdout = String::from_utf8(out.stdout.clone()).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 6, "{stdout}");
        assert_eq!(lines[..5], expected, "{stdout}");
        assert!(
            lines[5].starts_with(
                "2026-12-01T09:05:00Z arn:aws:iam::111122223333:user/bob Decrypt ? (directory /old-reports no longer exists"
            ) && lines[5].ends_with(") 198.51.100.8"),
            "{}",
            lines[5]
        );
        assert!(!stdout.contains("someone-else"), "{stdout}");
        assert_eq!(
            out.stderr,
            "6 events for this volume, 1 skipped, 1 not decoded\n"
        );
    };
    // A gzipped log file, recognized by its bytes (no .gz in its name).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&log).unwrap();
    let gzipped = gz.finish().unwrap();
    let file = env
        .dir
        .path()
        .join("111122223333_CloudTrail_eu-west-1_20261201T0905Z_x");
    fs::write(&file, &gzipped).unwrap();
    check_text(&env.run(
        &["audit", &b, &file.display().to_string(), "--key", &key],
        b"",
    ));
    // The same events one a line on standard input (blank lines ignored), as JSON.
    let mut lines = Vec::new();
    for r in &records {
        lines.extend(serde_json::to_vec(r).unwrap());
        lines.extend(b"\n\n");
    }
    check_text(&env.run(&["audit", &b, "--key", &key], &lines));
    let out = env.run(&["audit", &b, "-", "--json", "--key", &key], &lines);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 6);
    let field = |i: usize, k: &str| events[i][k].clone();
    assert_eq!(field(0, "path"), json!(null));
    assert_eq!(field(0, "error"), json!("volume config"));
    assert_eq!(field(1, "path"), json!("/acme-corp/payroll-2026-12.xlsx"));
    assert_eq!(field(1, "stored_path"), json!(payroll));
    assert_eq!(field(1, "error"), json!(null));
    assert_eq!(field(1, "operation"), json!("GenerateDataKey"));
    assert_eq!(
        field(1, "principal"),
        json!("arn:aws:iam::111122223333:user/kmsfs-host")
    );
    assert_eq!(field(1, "source_ip"), json!("192.0.2.10"));
    assert_eq!(field(1, "time"), json!("2026-12-01T09:01:00Z"));
    assert_eq!(field(2, "path"), json!(format!("/acme-corp/{LONG_NAME}")));
    assert_eq!(field(3, "event_error"), json!("AccessDeniedException"));
    assert_eq!(field(3, "path"), json!("/a"));
    assert_eq!(field(4, "from_path"), json!("/inbox/payroll-draft.xlsx"));
    assert_eq!(
        field(4, "from_stored_path"),
        json!(stored("inbox/payroll-draft.xlsx"))
    );
    assert_eq!(field(4, "path"), json!("/acme-corp/payroll-2026-12.xlsx"));
    assert_eq!(field(5, "path"), json!(null));
    assert_eq!(field(5, "stored_path"), json!(removed));
    assert!(
        field(5, "error")
            .as_str()
            .unwrap()
            .contains("/old-reports no longer exists"),
        "{:?}",
        events[5]
    );

    // decode: one stored path back, with or without its leading '/'.
    let out = env.run(&["decode", &b, &payroll, "--key", &key], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, b"/acme-corp/payroll-2026-12.xlsx\n");
    let out = env.run(&["decode", &b, &stored(&long)[1..], "--key", &key], b"");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("/acme-corp/{LONG_NAME}\n")
    );
    let msg = env.fails(&["decode", &b, &removed, "--key", &key], 1);
    assert!(msg.contains("old-reports no longer exists"), "{msg}");
    let msg = env.fails(&["decode", &b, "/a//b", "--key", &key], 2);
    assert!(msg.contains("not a stored path"), "{msg}");
    // Malformed input: one line, exit 2, nothing printed.
    let msg = env.fails(&["audit", &b, "--key", &key], 2);
    assert!(msg.contains("not CloudTrail JSON"), "{msg}");
    fs::write(&file, br#"{"Events": []}"#).unwrap();
    let msg = env.fails(
        &["audit", &b, &file.display().to_string(), "--key", &key],
        2,
    );
    assert!(msg.contains("lookup-events"), "{msg}");
}
