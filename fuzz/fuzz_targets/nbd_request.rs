//! Fuzzes the NBD handshake (client flags, option headers and payloads) and the transmission
//! request parser and checks of the server (`nbd_proto`). Driver:
//! `reliability::fuzz::nbd_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = reliability::fuzz::nbd_session(data);
});
