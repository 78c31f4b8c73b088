//! lvol: SPDK's logical volumes over the blobstore, and the lvol bdev module.
//!
//! Owns lvol stores ([`LvolStore`]: a blobstore of type `LVOLSTORE` whose super blob carries
//! the store's `name` and `uuid` xattrs exactly as SPDK writes them), lvols ([`Lvol`]: one blob
//! each, named and identified by xattrs), their block devices ([`LvolBdev`], registered in a
//! bdev-core [`bdev_core::Registry`] with name = UUID and alias `lvs/lvol`), tasting (an
//! examine hook that loads stores found on new bdevs), hot-removal of store bases, and the lvol
//! side of external snapshots: the esnap device factory, degraded mode with bounded retries,
//! surprise removal and healing of the base. [`BdevBsDev`] adapts a bdev descriptor to the
//! blobstore's device trait. [`rpc::LvolRpc`] serves the `bdev_lvol_*` JSON-RPC methods.
//!
//! It does not own the on-disk format (the blobstore does), the devices or the registry
//! (bdev-core does), or the socket (tgt does).
//!
//! Wiring: create one [`LvolModule`] per [`bdev_core::Registry`] (it installs the examine
//! hook, so stores on bdevs registered afterwards are tasted), and serve its RPC methods
//! with [`rpc::LvolRpc::new`]. Every operation (`create_lvstore`, `create_lvol`,
//! `create_snapshot`, `create_esnap_clone`, `delete_lvol`, ...) is a method of the module.
//!
//! Degraded mode: an lvol that depends on a missing external snapshot keeps its bdev. Reads
//! and writes of clusters it (or a snapshot below it) owns work; requests that need the base
//! are retried [`DEFAULT_ESNAP_RETRIES`] times, [`DEFAULT_ESNAP_RETRY_DELAY_MS`] ms apart
//! (see [`LvolModule::set_esnap_retry`]; one loop applies it: `retry.rs`), then fail with EIO. When the base bdev is removed,
//! its dependents switch to [`DegradedDev`] and the claim is released; when a bdev with the
//! missing UUID is registered, they are healed in place.

mod bs_dev;
mod error;
mod esnap;
mod listing;
mod lvol;
mod module;
mod retry;
pub mod rpc;
mod store;

pub use bs_dev::BdevBsDev;
pub use error::{LvolError, Result};
pub use esnap::{esnap_id_for, esnap_id_name, parse_esnap_id, DegradedDev};
pub use lvol::{Lvol, LvolBdev};
pub use module::{LvolModule, LvsClearMethod, LvsOpts, ShallowCopyState, ShallowCopyStatus};
pub use retry::{EsnapRetry, DEFAULT_ESNAP_RETRIES, DEFAULT_ESNAP_RETRY_DELAY_MS};
pub use store::{LvolStore, DEFAULT_CLUSTER_SIZE, DEFAULT_MD_PAGES_RATIO, LVS_BSTYPE, NAME_MAX};
