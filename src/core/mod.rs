//! The filesystem core: volumes and encrypted files on a backing directory.
//!
//! This layer joins the pure format to the key layer and to real files. It is what the CLI
//! commands and the FUSE adapter call, and it is tested without `/dev/fuse`. It returns plain
//! values and [`crate::error::Error`]; mapping errors to errno or exit codes happens once, at
//! the edges.

pub mod adopt;
pub mod export;
pub mod file;
pub mod fs;
pub mod fsck;
pub mod instance;
pub mod journal;
pub mod rewrap;
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

/// Sets the times of the entry at `path` itself (a symlink is not followed).
pub(crate) fn set_times_at(
    path: &std::ffi::CStr,
    times: &[libc::timespec; 2],
) -> std::io::Result<()> {
    // SAFETY: a valid C string and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
