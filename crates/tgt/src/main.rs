//! tgt (to be written).

fn main() {
    eprintln!("tgt: not built yet");
    std::process::exit(1);
}
