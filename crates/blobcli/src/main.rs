//! blobcli (to be written).

fn main() {
    eprintln!("blobcli: not built yet");
    std::process::exit(1);
}
