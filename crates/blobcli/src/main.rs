//! The `blobcli` binary: see the library crate for what it does.

fn main() {
    let code = blobcli::run(std::env::args().collect());
    std::process::exit(code);
}
