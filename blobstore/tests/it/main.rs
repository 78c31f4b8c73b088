//! The blobstore's integration tests, one binary; a module per behaviour.
//! `size_bounds` installs a counting global allocator for the whole binary; it counts per
//! thread, so other tests do not disturb its figures.

mod bad_input;
mod concurrent_allocations;
mod deferred_commit;
mod external_snapshots;
mod failure_paths;
mod lockfree_lookup;
mod on_disk_layout;
mod power_loss_sweep;
mod scenarios;
mod size_bounds;
mod spdk_fixtures;
mod stale_clusters;
