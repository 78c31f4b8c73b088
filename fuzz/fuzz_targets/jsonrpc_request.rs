//! Fuzzes the JSON-RPC stream parser and request checks of the target (`tgt::jsonrpc`), fed
//! in chunks as a socket delivers them. Driver: `reliability::fuzz::jsonrpc_stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = reliability::fuzz::jsonrpc_stream(data);
});
