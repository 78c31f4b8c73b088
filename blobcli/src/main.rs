//! The `blobcli` binary: see the library crate for what it does.

fn main() {
    // Arguments that are not UTF-8 are taken lossily rather than refused with a panic.
    let args = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let code = blobcli::run(args);
    std::process::exit(code);
}
