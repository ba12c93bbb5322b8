//! adopt: the deliberate way to accept a file moved on the backing store (restored from a
//! backup to another place, say). The file's envelopes for the path it was bound to are
//! re-encrypted by the key service from that path's context to the new one (`ReEncrypt`,
//! which the key service logs with both contexts), so the key service itself checks the
//! claim: an `--from` that is not where the file was bound fails there, and before it, here.

use crate::error::{Error, Result};
use crate::format::context::CanonicalPath;
use crate::format::envelope::Envelope;

use super::file::{update_envelopes_of_moved, EncryptedFile};
use super::volume::Volume;

/// Rebinds the file now at `path` from `from` to `path`; returns the envelopes re-encrypted.
pub fn adopt(volume: &Volume, path: &CanonicalPath, from: &CanonicalPath) -> Result<usize> {
    if path == from {
        return Err(Error::Usage(
            "--from names the path the file is at; nothing to adopt".into(),
        ));
    }
    let file = crate::core::file::open_backing(volume, path, true)?;
    let mut moved = 0;
    update_envelopes_of_moved(volume, &file, path, |slots| {
        // Checked under the lock, against the slot in force.
        let current = slots[0];
        if !current.iter().any(|e| &e.path == from) {
            // Named as the user knows them (where they still decrypt).
            let mut bound: Vec<String> =
                current.iter().map(|e| volume.shown_path(&e.path)).collect();
            bound.dedup();
            return Err(Error::Integrity(format!(
                "{} is not bound to {} (it is bound to {}); refusing to adopt",
                volume.shown_path(path),
                volume.shown_path(from),
                bound.join(", ")
            )));
        }
        let mut out: Vec<Envelope> = current
            .iter()
            .filter(|e| &e.path != from && &e.path != path)
            .cloned()
            .collect();
        // (Again from zero should the header have grown and this run twice.)
        moved = 0;
        for e in current.iter().filter(|e| &e.path == from) {
            let key = volume.rewrap_for_path(&e.key, from, path)?;
            moved += 1;
            out.push(Envelope {
                path: path.clone(),
                key,
            });
        }
        Ok(Some(out))
    })?;
    drop(file);
    // The file now opens where it is (commitment, MAC and final block checked).
    EncryptedFile::open(volume, path, false)?.verify_last_block()?;
    Ok(moved)
}
