//! Drops the embedded eBPF object's pages from the agent's resident set
//! once the load has parsed it.
//!
//! The object (about 1.2 MB, most of it DWARF that only the build needs)
//! lives in the binary's read-only data. aya copies what it keeps out of
//! it, so after the load nothing reads it again, yet the parse left about
//! 0.8 MiB of it mapped (measured with /proc/PID/pagemap): resident memory
//! the agent carried for its whole life.

/// Tells the kernel that the whole pages inside `bytes` are not needed now.
/// `bytes` must lie in a read-only file mapping (a `static` of the binary):
/// such pages are never written, so a later read faults the same bytes back
/// in from the file. Partial pages at either end are left alone.
pub(super) fn drop_pages(bytes: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let Ok(page) = usize::try_from(page) else {
        return;
    };
    if page == 0 {
        return;
    }
    let start = bytes.as_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + bytes.len()) / page * page;
    if end <= first {
        return;
    }
    // SAFETY: [first, end) is whole pages of `bytes`, an immutable static
    // in a private read-only file mapping: MADV_DONTNEED only unmaps them,
    // and the next read maps the same file contents again. No other data
    // shares those pages. A failure only leaves them resident.
    unsafe {
        libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    /// Several pages of known bytes in the binary's read-only data.
    static DATA: [u8; 5 * 4096] = {
        let mut d = [0u8; 5 * 4096];
        let mut i = 0;
        while i < d.len() {
            d[i] = (i % 251) as u8;
            i += 1;
        }
        d
    };

    #[test]
    fn the_bytes_read_the_same_after_their_pages_are_dropped() {
        let before: u64 = DATA.iter().map(|b| u64::from(*b)).sum();
        super::drop_pages(&DATA);
        let after: u64 = DATA.iter().map(|b| u64::from(*b)).sum();
        assert_eq!(before, after);
        assert!(DATA
            .iter()
            .enumerate()
            .all(|(i, b)| usize::from(*b) == i % 251));
    }
}
