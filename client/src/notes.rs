//! Notes for the person running a command: progress ("enrolled as …") and warnings that do not
//! fail it. They go to stderr, never to stdout, which carries only the command's output.

/// Prints `msg` on stderr as `meshsign: msg`.
pub fn note(msg: &str) {
    eprintln!("meshsign: {msg}");
}
