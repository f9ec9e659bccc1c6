//! What a NIC model needs from the host side of the wire: a pollable fd
//! that moves whole frames with one readv or writev each, optionally with a
//! virtio-net header in front (IFF_VNET_HDR).

use std::os::fd::{AsFd, AsRawFd};

/// TUNSETOFFLOAD flags: what the host may hand the guest unfinished.
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// `AsFd` lets a kernel data path (vhost-net) take the same TAP.
pub trait NetBackend: AsRawFd + AsFd + Send + Sync {
    /// Reads one frame into `iov`; WouldBlock when there is none.
    fn readv(&self, iov: &[libc::iovec]) -> std::io::Result<usize>;
    /// Writes one frame gathered from `iov`.
    fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize>;
    /// Whether frames carry a virtio-net header.
    fn vnet_hdr(&self) -> bool;
    /// Sets the header size and the offloads the guest accepted. Only
    /// called when `vnet_hdr()` is true.
    fn configure_offloads(&self, hdr_len: usize, flags: u32) -> std::io::Result<()>;
}
