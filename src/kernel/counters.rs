//! Usage counters of our SAs (bytes, packets, age) for `status` and metrics, and the
//! kernel's XFRM error counters. The SA counters come from a dump of their own
//! (`xfrm::sa_counters`, on our own socket, replies zeroed in place), kept apart from
//! [`super::Kernel::dump`]: counters change with every packet and must never make a plan
//! differ.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaCounters {
    pub bytes: u64,
    pub packets: u64,
    /// When the kernel added the SA, in seconds since the Unix epoch.
    pub added_at: u64,
}

/// The kernel's XFRM error counters of this namespace (`/proc/net/xfrm_stat`), as
/// (name, value) pairs in the kernel's order. Empty when the file is missing.
pub fn xfrm_stat() -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/xfrm_stat") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}
