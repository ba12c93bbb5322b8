//! The filesystem core: volumes and encrypted files on a backing directory.
//!
//! This layer joins the pure format to the key layer and to real files. It is what the CLI
//! commands and the FUSE adapter call, and it is tested without `/dev/fuse`. It returns plain
//! values and [`crate::error::Error`]; mapping errors to errno or exit codes happens once, at
//! the edges.

pub mod adopt;
pub mod audit;
pub mod export;
pub mod file;
pub mod fs;
pub mod fsck;
pub mod instance;
pub mod journal;
pub mod names;
pub mod renew;
pub mod rewrap;
pub mod trust;
pub mod volume;

pub use file::EncryptedFile;
pub use volume::{InitOptions, OpenOptions, Volume};

/// A file's access and modification times as `utimensat`/`futimens` take them.
pub(crate) fn times_of(meta: &std::fs::Metadata) -> [libc::timespec; 2] {
    use std::os::unix::fs::MetadataExt;
    [
        libc::timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        libc::timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    ]
}
