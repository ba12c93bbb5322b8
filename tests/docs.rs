//! The documents name real tests: every `file::name` in docs/SECURITY.md is a test function in
//! `tests/file.rs` (or in `src/...` when the file part is a path), and a `file::prefix_*` or
//! `file::*` matches at least one.
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

use std::fs;

fn functions(file: &str) -> Vec<String> {
    let path = if file.starts_with("src/") {
        file.to_string()
    } else {
        format!("tests/{file}.rs")
    };
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix("fn ")
                .or_else(|| l.strip_prefix("pub fn "))?;
            Some(rest.split(['(', '<']).next()?.to_string())
        })
        .collect()
}

#[test]
fn every_test_security_md_names_exists() {
    let doc = fs::read_to_string("docs/SECURITY.md").unwrap();
    let mut checked = 0;
    for span in doc.split('`').skip(1).step_by(2) {
        let Some((file, name)) = span.rsplit_once("::") else {
            continue;
        };
        if file.contains(' ') || name.contains(' ') || file.is_empty() {
            continue;
        }
        let file = file.trim_end_matches(".rs");
        let file = if file.starts_with("src/") {
            format!("{file}.rs")
        } else {
            file.to_string()
        };
        let fns = functions(&file);
        let found = match name.strip_suffix('*') {
            Some(prefix) => fns.iter().any(|f| f.starts_with(prefix)),
            None => fns.iter().any(|f| f == name),
        };
        assert!(
            found,
            "docs/SECURITY.md names {file}::{name}, which does not exist"
        );
        checked += 1;
    }
    assert!(checked > 40, "only {checked} test names found");
}
