//! vbdev-ro integration tests, one binary; each module is one behaviour: the public API
//! (pass-through reads, refused writes, claims, removal, resize, config, RPC), the ro bdev
//! over the real backends, and the ro bdev as the base of esnap clones.

mod common;

mod as_esnap_base;
mod over_real_backends;
mod public_api;
