//! kmsfs: a directory encrypted at rest with KMS envelope encryption.
//!
//! The crate is layered so that each layer can be tested without the ones above it:
//!
//! * [`format`] — the pure, byte-exact on-disk format (volume config, file header, blocks,
//!   encryption context). No I/O, no KMS, no FUSE.
//! * [`keys`] — the [`keys::KeyProvider`] trait, its providers (local master key file, a
//!   fault-injecting wrapper for tests), the volume's keyring and the bounded plaintext key cache.
//! * [`core`] — volumes and encrypted files on a backing directory, built on the two layers
//!   above; usable without `/dev/fuse`.
//! * [`cli`] — one module per command.
//!
//! Secrets (data keys, derived keys) live in [`secret`] types that zeroize on drop and never
//! print.

pub mod backing;
pub mod cli;
pub mod core;
pub mod error;
pub mod format;
pub mod fuse;
pub mod keys;
pub mod log;
pub mod secret;
