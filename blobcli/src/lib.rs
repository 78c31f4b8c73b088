//! blobcli: SPDK's blob command-line tool (`examples/blob/cli`), with the same options,
//! script and shell modes and output lines, plus offline inspection of lvol stores and
//! esnap clones (`--image`, `-l lvols`, `-d lvs/lvol`, `--output json`, `--check`).
//!
//! Owns: argument parsing, the SPDK JSON config replay (through `bdev_core::config`), the
//! read-only overlay under inspection sessions, the esnap factory that finds external
//! snapshots among the configured bdevs, and every output format.
//! Does not own: the on-disk format or any blobstore logic (`blobstore`, including the
//! `--check` scan), the bdevs (`bdev-core`, `vbdev-ro`), the descriptor-to-`BsDev` adapter
//! (`lvol::BdevBsDev`).

pub mod bsdev;
pub mod cli;
pub mod config;
pub mod dump;
pub mod lvols;
pub mod opts;
pub mod progress;

pub use cli::run;
