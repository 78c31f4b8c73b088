//! blobcli: SPDK's blob command-line tool (`examples/blob/cli`), with the same options,
//! script and shell modes and output lines, plus offline inspection of lvol stores and
//! esnap clones (`--image`, `-l lvols`, `-d lvs/lvol`, `--output json`, `--check`).
//!
//! Owns: argument parsing, the SPDK JSON config reader (malloc, aio and read-only bdevs), the
//! adapter from a bdev descriptor to the blobstore's device trait, the esnap factory that
//! finds external snapshots among the configured bdevs, and every output format.
//! Does not own: the on-disk format or any blobstore logic (the `blobstore` crate), the
//! bdevs themselves (`bdev-core`).

pub mod bsdev;
pub mod cli;
pub mod config;
pub mod dump;
pub mod lvols;
pub mod opts;
pub mod progress;

pub use cli::run;
