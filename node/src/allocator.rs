//! The member's memory allocator: mimalloc, but for the store's page buffers.
//!
//! Every request allocates its messages, headers and buffers; glibc's malloc spent about a
//! tenth of a loaded leader's samples (see the README's profile), so mimalloc serves nearly
//! everything. redb, though, keeps each page it caches or writes in an `Arc<[u8]>`: a 4 KiB
//! page takes 4,112 bytes (the page and two reference counts), which mimalloc serves from its
//! 5 KiB size class (its classes are a quarter apart), so a cache of 100,000 pages took 522
//! MiB for 390 MiB of pages. glibc's malloc rounds to 16 bytes: 395 MiB. Page buffers are few
//! and large next to a request's allocations, so they go to glibc.

use std::alloc::{GlobalAlloc, Layout, System};

/// mimalloc, and glibc's malloc for allocations shaped like a cached page.
pub struct MemberAllocator;

/// What an `Arc` adds before its data: the strong and weak counts.
const ARC_COUNTS: usize = 2 * std::mem::size_of::<usize>();

/// Whether an allocation of `size` bytes is a page of the store (4 KiB up to 256 KiB, redb's
/// page sizes are powers of two) behind an `Arc`'s counts.
fn is_page_buffer(size: usize) -> bool {
    size.checked_sub(ARC_COUNTS)
        .is_some_and(|page| page.is_power_of_two() && (4 << 10..=256 << 10).contains(&page))
}

// SAFETY: every call goes to the allocator that `is_page_buffer` picks for its size, which
// the layout given back to `dealloc` and `realloc` still has, so memory is always returned to
// the allocator it came from; a `realloc` that changes allocator copies through a new block.
unsafe impl GlobalAlloc for MemberAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            if is_page_buffer(layout.size()) {
                System.alloc(layout)
            } else {
                mimalloc::MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            if is_page_buffer(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                mimalloc::MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout, so from this allocator.
        unsafe {
            if is_page_buffer(layout.size()) {
                System.dealloc(ptr, layout)
            } else {
                mimalloc::MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (from_system, to_system) = (is_page_buffer(layout.size()), is_page_buffer(new_size));
        // SAFETY: the caller's contract, passed on; across allocators, the new block holds
        // the smaller of the two sizes before the old one is returned where it came from.
        unsafe {
            match (from_system, to_system) {
                (true, true) => System.realloc(ptr, layout, new_size),
                (false, false) => mimalloc::MiMalloc.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

/// Hands what this thread's mimalloc heap keeps of the memory it freed back to the system.
///
/// mimalloc keeps a thread's freed memory until that thread allocates again or exits. A
/// blocking thread that applied a large request (`etcdctl check perf --load=l` ends with a
/// delete of every key) may then sit idle for up to a second, holding 150-200 MB per member
/// (`BLOCKING_THREAD_KEEP_ALIVE` in main.rs).
pub fn release_freed() {
    // SAFETY: `mi_collect` only frees and unmaps memory mimalloc itself holds unused; it is
    // safe to call on any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_page_behind_an_arcs_counts_goes_to_glibc() {
        for page in [4 << 10, 8 << 10, 64 << 10, 256 << 10] {
            assert!(is_page_buffer(page + ARC_COUNTS), "{page}");
            assert!(!is_page_buffer(page), "{page}: a bare page");
        }
        for other in [0, 16, 2 << 10, (2 << 10) + ARC_COUNTS, 4113, (512 << 10) + ARC_COUNTS] {
            assert!(!is_page_buffer(other), "{other}");
        }
    }

    #[test]
    fn a_page_buffer_takes_little_more_than_its_page() {
        let layout = Layout::from_size_align(4096 + ARC_COUNTS, 8).expect("layout");
        // SAFETY: a valid layout; the block is freed with it.
        unsafe {
            let block = MemberAllocator.alloc(layout);
            assert!(!block.is_null());
            // Only glibc's blocks have a usable size glibc can tell.
            let usable = libc::malloc_usable_size(block.cast());
            assert!((layout.size()..layout.size() + 32).contains(&usable), "{usable} bytes");
            MemberAllocator.dealloc(block, layout);
        }
    }

    #[test]
    fn a_block_keeps_its_bytes_when_it_grows_or_shrinks_into_the_other_allocator() {
        let small = Layout::from_size_align(4000, 8).expect("layout");
        let page = 4096 + ARC_COUNTS;
        // SAFETY: each block is used within its current size and freed with its layout.
        unsafe {
            let block = MemberAllocator.alloc(small);
            for i in 0..small.size() {
                *block.add(i) = i as u8;
            }
            let grown = MemberAllocator.realloc(block, small, page);
            assert!((0..small.size()).all(|i| *grown.add(i) == i as u8), "bytes lost moving to glibc");
            let grown_layout = Layout::from_size_align(page, 8).expect("layout");
            let shrunk = MemberAllocator.realloc(grown, grown_layout, 100);
            assert!((0..100).all(|i| *shrunk.add(i) == i as u8), "bytes lost moving to mimalloc");
            MemberAllocator.dealloc(shrunk, Layout::from_size_align(100, 8).expect("layout"));
        }
    }
}
