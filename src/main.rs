//! The `glued` binary: parse the command line, then run one mode.

fn main() {
    std::process::exit(glued::cli::main());
}
