//! man/kmsfs.1 documents exactly the commands and options the binary has: every subcommand
//! and long option of the clap definitions appears in it, and it names no option that does
//! not exist. `man -l` must also render it without warnings where man is installed.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;

use clap::CommandFactory;
use kmsfs::cli::Cli;

fn man_text() -> String {
    let raw = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/kmsfs.1")).unwrap();
    raw.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "")
}

#[test]
fn man_page_covers_every_command_and_option() {
    let man = man_text();
    let cli = Cli::command();
    let mut known = BTreeSet::from(["--help".to_string(), "--version".to_string()]);
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        assert!(
            man.contains(&format!(".SS \"kmsfs {name}")),
            "man page lacks a section for '{name}'"
        );
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                known.insert(format!("--{long}"));
                assert!(
                    man.contains(&format!("--{long}")),
                    "man page lacks --{long} of '{name}'"
                );
            }
        }
    }
    for word in man.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if word.starts_with("--") && word.len() > 2 {
            assert!(
                known.contains(word),
                "man page documents {word}, which kmsfs does not have"
            );
        }
    }
}

#[test]
fn man_page_renders_cleanly() {
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "man is required under CI=true"
        );
        eprintln!("man(1) is not installed; skipping the rendering check");
        return;
    }
    let out = std::process::Command::new("man")
        .args([
            "--warnings",
            "-l",
            concat!(env!("CARGO_MANIFEST_DIR"), "/man/kmsfs.1"),
        ])
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "man warnings: {stderr}");
    // Drop overstrike formatting ("E\x08E" for bold E).
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    assert!(text.contains("EXIT STATUS"), "{text}");
}
