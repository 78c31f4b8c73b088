//! Fuzzes the NBD client's decoders (`nbd_proto`): the greeting, option replies and info
//! payloads of `NBD_OPT_GO`, then simple replies, fed as a hostile server would send them.
//! Driver: `reliability::fuzz::nbd_client_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = reliability::fuzz::nbd_client_session(data);
});
