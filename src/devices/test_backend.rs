//! A stand-in for the TAP in device unit tests: one end of a
//! SOCK_SEQPACKET socketpair (frame boundaries kept, like a TAP), the
//! other end is the "host". Also the fuzz targets' TAP (feature `fuzzing`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::net::backend::NetBackend;

pub const T: Duration = Duration::from_secs(5);

/// A SOCK_SEQPACKET socketpair: frame boundaries kept, like a TAP.
pub struct FakeTap {
    pub fd: OwnedFd,
    pub vnet: bool,
    pub offloads: Mutex<Option<(usize, u32)>>,
    /// Every set_queue_enabled call, in order (a multi-queue TAP's queue
    /// turned on or off).
    pub queue_on: Mutex<Vec<bool>>,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for FakeTap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetBackend for FakeTap {
    /// As tun does: copies what fits and returns the frame's whole length
    /// (MSG_TRUNC), so a short copy shows only as a length beyond the
    /// buffers.
    unsafe fn readv(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        // SAFETY: the caller promises writable memory (NetBackend::readv)
        // behind the iovecs; msg points at them and lives for the call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    unsafe fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller promises readable memory (NetBackend::writev).
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn vnet_hdr(&self) -> bool {
        self.vnet
    }
    fn configure_offloads(&self, hdr_len: usize, flags: u32) -> std::io::Result<()> {
        *self.offloads.lock().unwrap() = Some((hdr_len, flags));
        Ok(())
    }
    fn set_queue_enabled(&self, on: bool) -> std::io::Result<()> {
        self.queue_on.lock().unwrap().push(on);
        Ok(())
    }
}

impl FakeTap {
    /// Whether the last set_queue_enabled turned the queue on (never
    /// called: on, as a TAP queue starts).
    pub fn queue_is_on(&self) -> bool {
        self.queue_on
            .lock()
            .unwrap()
            .last()
            .copied()
            .unwrap_or(true)
    }
}

/// A FakeTap (with or without a vnet header) and the host's end.
pub fn fake_tap(vnet: bool) -> (Arc<FakeTap>, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tap = Arc::new(FakeTap {
        fd: a,
        vnet,
        offloads: Mutex::new(None),
        queue_on: Mutex::new(Vec::new()),
    });
    (tap, b)
}

pub fn peer_recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    let end = std::time::Instant::now() + T;
    loop {
        // SAFETY: buf is a live, writable buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn peer_recv_nothing(fd: &OwnedFd) -> bool {
    std::thread::sleep(Duration::from_millis(50));
    let mut b = [0u8; 16];
    // SAFETY: b is a live buffer of the given length.
    unsafe { libc::recv(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) < 0 }
}

/// Sends one frame from the host's end; false when the socket has no room
/// for it (a fuzzer sends whatever it likes and cannot assert on that).
pub fn peer_try_send(fd: &OwnedFd, data: &[u8]) -> bool {
    // SAFETY: data is a live buffer of the given length.
    let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    n >= 0 && n as usize == data.len()
}

/// Sends one frame from the device's end, as its writev would, without
/// blocking; false once the host end's queue is full (what a TAP with a
/// small sndbuf answers with EAGAIN).
pub fn device_try_send(tap: &FakeTap, data: &[u8]) -> bool {
    // SAFETY: data is a live buffer of the given length.
    let n = unsafe {
        libc::send(
            tap.fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
        )
    };
    n >= 0 && n as usize == data.len()
}

/// Sends from the device's end until the host end's queue is full, so
/// that the device's next write would block; returns how many frames of
/// `len` bytes that took.
pub fn fill_until_blocked(tap: &FakeTap, len: usize) -> usize {
    let filler = vec![0u8; len];
    let mut n = 0;
    while device_try_send(tap, &filler) {
        n += 1;
        assert!(n < 100_000, "the socket never filled");
    }
    n
}

/// The host reads the `queued` filler frames, then must find `frames`,
/// whole and in order: what a device held back while its writes blocked.
pub fn expect_after_filler(peer: &OwnedFd, queued: usize, frames: &[Vec<u8>]) {
    for _ in 0..queued {
        assert!(peer_recv(peer).is_some(), "filler frame missing");
    }
    for f in frames {
        assert_eq!(peer_recv(peer).as_deref(), Some(&f[..]), "in order, whole");
    }
}

pub fn peer_send(fd: &OwnedFd, data: &[u8]) {
    assert!(peer_try_send(fd, data), "the host end could not send");
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
