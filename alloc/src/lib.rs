//! meshsignd's global allocator, and what keeps its resident memory to what it uses.
//!
//! meshsignd allocates through mimalloc ([`MiMalloc`]): the Sign path's small per-request
//! buffers cost about half what they cost in glibc's allocator (BENCHMARKS.md, issue 27). The
//! `meshsign` CLI does too (its global allocator only; it starts no thread): an audit export
//! of 10⁶ entries cost its process ~17 % less CPU than through glibc, whose trimmed buffers
//! were faulted in again page by page (BENCHMARKS.md, issue 30, session 31).
//! Two of mimalloc v3's defaults (what `libmimalloc-sys` builds) made a site's RSS follow the
//! work it had done rather than what it holds (issue 30: a 10⁷-entry site at rest 85–105 MiB,
//! a 10⁴-entry one 70 MiB; BENCHMARKS.md, "Issue 30, session 22"):
//!
//! - **Transparent huge pages.** mimalloc asks the kernel for huge pages on its arenas
//!   (`MADV_HUGEPAGE`, honoured where THP is `madvise` or `always`). A 2 MiB page is resident
//!   whole as soon as one byte of it is touched: at rest 53 of the 10⁷-entry site's 76 MiB of
//!   heap were huge pages. [`disable_huge_pages`] turns them
//!   off for the process (`prctl(PR_SET_THP_DISABLE)`): Sign @64 RSS 83 → 31 MiB, server CPU
//!   per Sign unchanged (0.0879 vs 0.0880 s per 1,000, medians of four A/B pairs).
//! - **Purges that wait for a caller.** Freed memory goes back to the OS after `purge_delay`
//!   (1 s), but that delay is not a timer: the purge runs when some thread next takes one of the
//!   allocator's slow paths. Memory a thread freed before going quiet (a start's background
//!   read, a housekeeping pass, an export) stayed resident. [`return_freed_memory`] runs a thread
//!   that asks for the due purges once a second. `purge_delay = 0` (purge at every free) was
//!   measured too and not taken: ~9 % more server CPU per Sign, pages freed and reused under
//!   load being decommitted and faulted in again each time.
//!
//! This crate holds the workspace's only `unsafe` code: the call of `mi_collect`, an FFI
//! function that takes a bool and may be called from any thread at any time.

use std::time::Duration;

pub use mimalloc::MiMalloc;

/// Asks mimalloc to run what is due: the calling thread's retired pages, and the purges of
/// freed memory (process-wide) whose delay has passed. Not forced: memory freed less than
/// `purge_delay` ago is left for a later call, so a burst that is about to be reused is not
/// decommitted under it.
pub fn collect() {
    #[allow(unsafe_code)]
    // SAFETY: `mi_collect` takes no pointer and reads no caller state; mimalloc documents it as
    // callable from any thread at any time (it works on the calling thread's heap and on the
    // shared arenas under their own locks).
    unsafe {
        libmimalloc_sys::mi_collect(false)
    }
}

/// Turns transparent huge pages off for this process (all its threads, and memory mapped
/// before the call: the kernel checks the flag at each fault). Call first thing in `main`.
pub fn disable_huge_pages() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}

/// Starts a thread (`mem-return`) that calls [`collect`] every `every`, for the life of the
/// process. Call once, at start, from a binary whose global allocator is [`MiMalloc`] (in
/// any other process it does nothing but wake).
pub fn return_freed_memory(every: Duration) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mem-return".into())
        .spawn(move || {
            // mimalloc sets up a thread's heap at its first allocation, and `mi_collect` on a
            // thread without one returns at once: allocate once.
            drop(std::hint::black_box(Box::new(0u64)));
            loop {
                std::thread::sleep(every);
                collect();
            }
        })
}
