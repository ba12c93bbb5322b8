//! `mount.kmsfs`: the helper mount(8) runs for `mount -t kmsfs` and `/etc/fstab` lines of type
//! `kmsfs` (install it as a symlink to `kmsfs`). It turns
//! `mount.kmsfs BACKING MOUNTPOINT [-sfnv] [-o OPTIONS]` into a `kmsfs mount` command line.

use std::ffi::OsString;

use crate::error::{Error, Result};

/// Options mount(8) or fstab pass that mean nothing to kmsfs (or that a FUSE mount always has).
const IGNORED: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "nofail",
    "_netdev",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "async",
    "sync",
];

/// The `kmsfs` arguments (after the program name) for a `mount.kmsfs` invocation.
pub fn translate(args: &[OsString]) -> Result<Vec<OsString>> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "-o" {
            let opts = it
                .next()
                .ok_or_else(|| Error::Usage("-o needs a list of options".into()))?;
            options.extend(
                opts.to_string_lossy()
                    .split(',')
                    .filter(|o| !o.is_empty())
                    .map(str::to_string),
            );
        } else if let Some(rest) = s.strip_prefix("-o") {
            options.extend(
                rest.split(',')
                    .filter(|o| !o.is_empty())
                    .map(str::to_string),
            );
        } else if s == "-t" {
            it.next();
        } else if s.starts_with('-') {
            // -s (sloppy), -f (fake), -n (no mtab), -v (verbose): nothing to do here.
        } else {
            positional.push(a.clone());
        }
    }
    let [backing, mountpoint] = positional.as_slice() else {
        return Err(Error::Usage(
            "usage: mount.kmsfs BACKING MOUNTPOINT [-o OPTIONS]".into(),
        ));
    };
    let mut out: Vec<OsString> = vec!["mount".into(), backing.clone(), mountpoint.clone()];
    for o in options {
        let (name, value) = match o.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (o.as_str(), None),
        };
        match (name, value) {
            ("ro", None) => out.push("--read-only".into()),
            ("allow_other", None) => out.push("--allow-other".into()),
            ("no_xattrs", None) => out.push("--no-xattrs".into()),
            (
                "key" | "key_cache_entries" | "key_cache_ttl" | "kms_concurrency" | "key_prefetch"
                | "pending_creates" | "cache_timeout",
                Some(v),
            ) => {
                out.push(format!("--{}", name.replace('_', "-")).into());
                out.push(v.into());
            }
            (n, _) if IGNORED.contains(&n) || n.starts_with("x-") || n.starts_with("comment=") => {}
            _ => {
                return Err(Error::Usage(format!(
                    "unknown mount option '{o}' (kmsfs takes ro, allow_other, no_xattrs, key=KEY, \
                     key_cache_entries=N, key_cache_ttl=DURATION, kms_concurrency=N, key_prefetch=N, \
                     pending_creates=N, cache_timeout=DURATION)"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(args: &[&str]) -> Result<Vec<String>> {
        translate(&args.iter().map(OsString::from).collect::<Vec<_>>())
            .map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn fstab_options_become_mount_flags() {
        assert_eq!(
            t(&[
                "/srv/b",
                "/mnt/s",
                "-o",
                "rw,ro,allow_other,key=local:/k,nofail,x-systemd.automount"
            ])
            .unwrap(),
            [
                "mount",
                "/srv/b",
                "/mnt/s",
                "--read-only",
                "--allow-other",
                "--key",
                "local:/k"
            ]
        );
        assert_eq!(
            t(&[
                "-n",
                "/srv/b",
                "/mnt/s",
                "-okey_cache_ttl=10m,kms_concurrency=8,no_xattrs"
            ])
            .unwrap(),
            [
                "mount",
                "/srv/b",
                "/mnt/s",
                "--key-cache-ttl",
                "10m",
                "--kms-concurrency",
                "8",
                "--no-xattrs"
            ]
        );
    }

    #[test]
    fn unknown_options_and_missing_paths_are_refused() {
        assert!(t(&["/srv/b", "/mnt/s", "-o", "bogus"]).is_err());
        assert!(t(&["/srv/b"]).is_err());
        assert!(t(&["/srv/b", "/mnt/s", "-o"]).is_err());
    }
}
