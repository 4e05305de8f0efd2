//! Fresh read buffers with their pages populated by one system call.
//!
//! Why: a restore reads ~189 MB of KV (a 4,096-token cache of the default model) into new
//! buffers; touching them page by page costs one page fault per 4 KiB, which was the largest
//! single cost of a restore on the development VM. A block's buffer (11.8 MB for the default
//! model) is first advised to use transparent huge pages (`MADV_HUGEPAGE`: 2 MiB pages where
//! the system allows them, the 4 KiB edges aside), then `MADV_POPULATE_WRITE` (Linux 5.14)
//! maps it at once; elsewhere, or when either fails, the pages fault in as usual.

// The two `madvise` calls below, on memory this module just allocated.
#![allow(unsafe_code)]

/// A zeroed buffer of `len` bytes whose pages are already mapped where the OS allows it.
pub fn zeroed(len: usize) -> Vec<u8> {
    // `vec![0; n]` takes fresh (zero) pages from the allocator without writing them.
    let buf = vec![0u8; len];
    #[cfg(target_os = "linux")]
    populate(&buf);
    buf
}

#[cfg(target_os = "linux")]
fn populate(buf: &[u8]) {
    const PAGE: usize = 4096;
    const HUGE_PAGE: usize = 2 << 20;
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    if buf.len() < 16 * PAGE {
        return;
    }
    let start = buf.as_ptr() as usize;
    let (huge_first, huge_end) = (
        start.div_ceil(HUGE_PAGE) * HUGE_PAGE,
        (start + buf.len()) / HUGE_PAGE * HUGE_PAGE,
    );
    if huge_end > huge_first {
        // SAFETY: [huge_first, huge_end) lies within `buf`'s allocation and is aligned;
        // MADV_HUGEPAGE only changes how its (still unmapped, zero) pages are backed and
        // fails harmlessly where transparent huge pages are off.
        let _ = unsafe {
            libc::madvise(
                huge_first as *mut libc::c_void,
                huge_end - huge_first,
                libc::MADV_HUGEPAGE,
            )
        };
    }
    let first = start.div_ceil(PAGE) * PAGE;
    let end = (start + buf.len()) / PAGE * PAGE;
    if end <= first {
        return;
    }
    // SAFETY: [first, end) lies within `buf`'s allocation and is page-aligned;
    // MADV_POPULATE_WRITE only maps its pages (writable, contents unchanged: zero) and
    // fails harmlessly (EINVAL on older kernels) without touching anything.
    let _ = unsafe { libc::madvise(first as *mut libc::c_void, end - first, MADV_POPULATE_WRITE) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn buffers_are_zeroed_and_sized() {
        for len in [0, 1, 4096, 100_000, 1 << 20] {
            let b = super::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
    }
}
