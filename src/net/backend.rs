//! What a NIC model needs from the host side of the wire: a pollable fd
//! that moves whole frames with one readv or writev each, optionally with a
//! virtio-net header in front (IFF_VNET_HDR).

use std::os::fd::{AsFd, AsRawFd};

/// The per-frame header both NIC models and the TAP agree on, when the TAP
/// has IFF_VNET_HDR: struct virtio_net_hdr_v1 (TUNSETVNETHDRSZ 12), the
/// size every VERSION_1 virtio driver uses too.
pub const VNET_HDR_LEN: usize = 12;

/// TUNSETOFFLOAD flags: what the host may hand the guest unfinished.
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// `AsFd` lets a kernel data path (vhost-net) take the same TAP.
///
/// Frames move through raw iovecs (the NICs build them over guest RAM, so
/// that no frame is copied), which a safe function could not check; so
/// [`NetBackend::readv`] and [`NetBackend::writev`] are `unsafe`, and their
/// callers promise what the iovecs point to:
///
/// ```compile_fail
/// # fn read(tap: &dyn rvm::net::backend::NetBackend) {
/// let mut buf = [0u8; 64];
/// let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
/// let _ = tap.readv(&iov); // refused: readv is unsafe
/// # }
/// ```
///
/// ```
/// # fn read(tap: &dyn rvm::net::backend::NetBackend) {
/// let mut buf = [0u8; 64];
/// let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
/// // SAFETY: `buf` is a live local buffer of iov_len bytes, borrowed by
/// // nothing else during the call.
/// let _ = unsafe { tap.readv(&iov) };
/// # }
/// ```
pub trait NetBackend: AsRawFd + AsFd + Send + Sync {
    /// Reads one frame into `iov`; WouldBlock when there is none.
    ///
    /// # Safety
    /// Each iovec must point to `iov_len` bytes that are valid for writes
    /// for the whole call and that no Rust reference reads or writes
    /// meanwhile (guest RAM kept mapped by the caller, or a buffer the
    /// caller borrows mutably for the call).
    unsafe fn readv(&self, iov: &[libc::iovec]) -> std::io::Result<usize>;
    /// Writes one frame gathered from `iov`.
    ///
    /// # Safety
    /// Each iovec must point to `iov_len` bytes that are valid for reads
    /// for the whole call.
    unsafe fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize>;
    /// Whether frames carry a virtio-net header.
    fn vnet_hdr(&self) -> bool;
    /// Sets the header size and the offloads the guest accepted. Only
    /// called when `vnet_hdr()` is true.
    fn configure_offloads(&self, hdr_len: usize, flags: u32) -> std::io::Result<()>;
    /// Turns this queue of a multi-queue backend on or off: while off the
    /// host sends it no frames (its pair is one the guest does not use),
    /// and its fd must not be polled (a detached TAP queue polls as an
    /// error). Already so is not an error. A one-queue backend has
    /// nothing to do.
    fn set_queue_enabled(&self, _on: bool) -> std::io::Result<()> {
        Ok(())
    }
}
