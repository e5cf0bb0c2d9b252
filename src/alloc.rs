//! The process's allocator: mimalloc, reached through its plain entry points wherever they give
//! the alignment Rust asks for.
//!
//! The `mimalloc` crate hands every allocation to `mi_malloc_aligned`. In mimalloc 3 that call
//! takes its fast path only for blocks of at most 1 KiB, and above that skips over-allocating
//! only when the rounded block size is a power of two of at most 4 KiB; any other block (a boxed
//! request future of 5 KB, a header map's entries, a 64 KiB read buffer) goes through the
//! over-allocating aligned path, at several times the instructions of `mi_malloc` (callgrind, a
//! node under load: 26 allocations per request, about 5 of them there, 2.6k of the node's 44k
//! instructions per request in the allocator). Upstream: the open pull request
//! purpleprotocol/mimalloc_rust#170.
//!
//! On 64-bit targets `mi_malloc` aligns every block to 16 bytes (`MI_MAX_ALIGN_SIZE`), except
//! the 8-byte ones, which are aligned to 8: its size classes are multiples of 16 above 8 bytes,
//! and a page's first block is 16-aligned (without the debug build's guard pages, which this
//! build does not enable). So a layout whose alignment is at most 16 and at most its size
//! takes the plain calls; others (tokio's task cells ask for 128) keep the aligned ones. Each
//! plain block's address is checked all the same, and one that came back misaligned (not
//! expected with this build of mimalloc) is replaced by an aligned one.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment `mi_malloc` gives every block of at least this many bytes.
const PLAIN_ALIGN: usize = 16;

pub struct MiMalloc;

/// Whether the plain calls give a block of `size` bytes the alignment `align`.
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

fn aligned(p: *mut c_void, align: usize) -> bool {
    (p as usize) & (align - 1) == 0
}

/// A new block for `layout`: from `plain_call` when that aligns it enough (checked; a misaligned
/// block goes back), else from `aligned_call`. Inlined, so the calls are direct ones.
#[inline(always)]
#[allow(unsafe_code)]
fn allocate(
    layout: Layout,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    if plain(size, align) {
        // SAFETY: mimalloc's allocating calls take any size.
        let p = unsafe { plain_call(size) };
        if aligned(p, align) {
            return p.cast();
        }
        // SAFETY: `p` came from mimalloc just now and is not null (null is aligned).
        unsafe { mi::mi_free(p) };
    }
    // SAFETY: `align` is a power of two (a `Layout`'s always is).
    unsafe { aligned_call(size, align) }.cast()
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks from
// either kind of call); a block handed out is at least `layout.size()` bytes and aligned to
// `layout.align()`: the plain calls' blocks are checked, and replaced by an aligned call's when
// not; a null pointer (memory exhausted) is returned as such, which the trait allows.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator handed out.
        unsafe { mi::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if plain(new_size, align) {
            // SAFETY: the caller passes a block this allocator handed out, and `new_size` is not
            // zero (the trait's contract). On failure the block stays where it was.
            let p = unsafe { mi::mi_realloc(ptr.cast(), new_size) };
            if aligned(p, align) {
                return p.cast();
            }
            // Not expected (see the module's note): the data is in `p` now; it moves to an
            // aligned block. Returning null here would tell the caller its old block still holds
            // the data, which it no longer does, so running out of memory ends the process.
            // SAFETY: as in `allocate`.
            let q = unsafe { mi::mi_malloc_aligned(new_size, align) };
            if q.is_null() {
                std::process::abort();
            }
            // SAFETY: both blocks hold at least `new_size` bytes of which the first
            // `min(old, new)` are the data, and they are distinct blocks.
            unsafe {
                std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), layout.size().min(new_size));
                mi::mi_free(p);
            }
            return q.cast();
        }
        // SAFETY: as above, with the alignment the block was made with.
        unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, align) }.cast()
    }
}
