//! The allocator's tuning against mimalloc itself, in processes of their own (this file is a
//! test binary with mimalloc as its global allocator, no harness; it runs itself as children):
//!
//! - a thread that allocates a burst, frees it and goes quiet leaves its pages resident, and
//!   with the memory-return thread running they go back within a few seconds;
//! - a heap of small blocks is held in transparent huge pages (where the kernel allows them)
//!   unless they are turned off, and with them off none is.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: meshsign_alloc::MiMalloc = meshsign_alloc::MiMalloc;

/// A field of /proc/self/status or smaps_rollup, in KiB.
fn kib(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_mib() -> u64 {
    kib("/proc/self/status", "VmRSS:") / 1024
}

/// A thread allocates ~`mib` MiB in 1 KiB strings, frees them, and stays parked.
fn burst_then_quiet(mib: usize) -> std::thread::JoinHandle<()> {
    let (done, wait) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let v: Vec<String> = (0..mib * 1024).map(|i| format!("{i:01024}")).collect();
        std::hint::black_box(&v);
        drop(v);
        let _ = done.send(());
        std::thread::park();
    });
    let _ = wait.recv();
    t
}

/// Child: a burst freed by a thread that goes quiet, without and then with the thread.
fn freed_memory_goes_back() {
    let base = rss_mib();
    let quiet = burst_then_quiet(200);
    std::thread::sleep(Duration::from_secs(3));
    let kept = rss_mib().saturating_sub(base);
    meshsign_alloc::return_freed_memory(Duration::from_millis(200)).expect("thread");
    let t = Instant::now();
    let mut now = kept;
    while t.elapsed() < Duration::from_secs(10) && now >= 40 {
        std::thread::sleep(Duration::from_millis(250));
        now = rss_mib().saturating_sub(base);
    }
    quiet.thread().unpark();
    println!(
        "freed 200 MiB: {kept} MiB still resident after 3 s without the thread, {now} MiB {:.1} s after it started",
        t.elapsed().as_secs_f64()
    );
    assert!(
        kept >= 150,
        "the control: a freed burst stays resident ({kept} MiB)"
    );
    assert!(now < 40, "freed memory handed back ({now} MiB left)");
}

/// Child: 64 MiB of live 1 KiB blocks; prints the KiB of huge pages they added (what the
/// process faulted in before `main`, the first of its heap among it, is not counted).
fn huge_pages(disable: bool) {
    if disable {
        meshsign_alloc::disable_huge_pages().expect("prctl");
    }
    let before = kib("/proc/self/smaps_rollup", "AnonHugePages:");
    let v: Vec<String> = (0..64 * 1024).map(|i| format!("{i:01024}")).collect();
    std::hint::black_box(&v);
    let after = kib("/proc/self/smaps_rollup", "AnonHugePages:");
    println!("{}", after.saturating_sub(before));
}

fn child(mode: &str) -> String {
    let exe = std::env::current_exe().expect("exe");
    let out = Command::new(exe).arg(mode).output().expect("child");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child {mode} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("freed") => return freed_memory_goes_back(),
        Some("thp-on") => return huge_pages(false),
        Some("thp-off") => return huge_pages(true),
        _ => {}
    }
    print!("{}", child("freed"));
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let off: u64 = child("thp-off").trim().parse().expect("a number");
    assert_eq!(off, 0, "huge pages with THP turned off: {off} KiB");
    if thp.contains("[never]") || thp.is_empty() {
        println!(
            "THP is off on this machine ({}): the control is skipped",
            thp.trim()
        );
    } else {
        let on: u64 = child("thp-on").trim().parse().expect("a number");
        println!(
            "64 MiB of 1 KiB blocks: {on} KiB in huge pages as mimalloc asks, {off} KiB with them turned off"
        );
        assert!(
            on > 0,
            "the control: mimalloc's heap in huge pages ({on} KiB)"
        );
    }
}
