//! Work spread over the machine's cores, results in order: checking many signatures (a batch's
//! files) or many audit entries (an export) is independent work per item.

/// `f` over `items` on up to one thread per core, results in order: checking the signatures
/// and SETs of a batch's files, parsing and hashing the entries of an audit export.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    // Read once: the standard library reads the cgroup's quota files on every call.
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if items.len() < 16 {
        return items.iter().map(&f).collect();
    }
    let threads = *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(16)
    });
    if threads < 2 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // A panicking check is a bug, not bad input: it is raised here as in the caller.
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
