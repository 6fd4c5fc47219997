//! Command line: `glued [run|id|check] [--config PATH] [flags]`.

/// Runs the mode the command line names; returns the process exit code.
pub fn main() -> i32 {
    0
}
