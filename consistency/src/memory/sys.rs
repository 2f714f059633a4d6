//! The only `unsafe` of giving memory back: the C library's call that returns freed heap
//! pages to the system.

#![allow(unsafe_code)]

/// Returns the freed pages of every heap of the allocator to the system (glibc); elsewhere a
/// no-op.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn trim() {
    // SAFETY: malloc_trim takes a plain integer (the padding to leave at the top of the main
    // heap), touches only the allocator's own state under its own locks, and may be called
    // from any thread at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn trim() {}
