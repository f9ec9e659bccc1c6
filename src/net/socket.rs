//! A NIC's wire as a UNIX socket to a user-mode network stack (passt,
//! gvproxy, socket_vmnet): no TAP, no privilege. Two framings, QEMU's:
//! `stream` (SOCK_STREAM: each frame after its length, 4 bytes big-endian)
//! and `dgram` (SOCK_SEQPACKET or SOCK_DGRAM: one frame per message). No
//! virtio-net header crosses the socket: the NIC models offer the guest no
//! offload, and the guest finishes every frame.
//!
//! A stream has no frame boundaries, so a read may end inside a frame and a
//! write may take only part of one. Reads go through a buffer (one recv
//! brings many small frames; a frame's bytes are handed out once whole), and
//! the unsent tail of a frame is kept and sent before anything else: the
//! frame counts as written, and the next write waits (WouldBlock) until the
//! tail is gone, which parks the NIC's TX on the socket's room.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;

use super::backend::NetBackend;

/// The longest frame a peer may announce: a 64 KiB IP packet with an
/// Ethernet header and a VLAN tag. A longer length means the stream is not
/// in QEMU's framing (or lost its place), and nothing after it can be
/// trusted.
pub const MAX_FRAME: usize = 65_535 + 14 + 4;
/// The stream's read buffer: several maximal frames, so that one recv
/// brings many small ones.
const READ_BUF: usize = 4 * MAX_FRAME;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A 4-byte big-endian length, then the frame (QEMU `-netdev stream`).
    Stream,
    /// One frame per message (QEMU `-netdev dgram`).
    Dgram,
}

pub struct SocketBackend {
    fd: OwnedFd,
    framing: Framing,
    rx: Mutex<ReadBuf>,
    /// The part of the last frame the socket did not take (stream only).
    tx_tail: Mutex<Vec<u8>>,
}

/// Bytes read from a stream and not yet handed out: `buf[start..end]`.
struct ReadBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The peer sent a length beyond MAX_FRAME: the stream is unusable.
    broken: bool,
}

impl SocketBackend {
    /// Wraps a connected socket; it is made non-blocking.
    pub fn new(fd: OwnedFd, framing: Framing) -> std::io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(SocketBackend {
            fd,
            framing,
            rx: Mutex::new(ReadBuf {
                buf: vec![
                    0u8;
                    if framing == Framing::Stream {
                        READ_BUF
                    } else {
                        0
                    }
                ]
                .into_boxed_slice(),
                start: 0,
                end: 0,
                broken: false,
            }),
            tx_tail: Mutex::new(Vec::new()),
        })
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Sends what is left of a frame the socket took only part of;
    /// WouldBlock while some is left. (The next write does it first too.)
    pub fn flush(&self) -> std::io::Result<()> {
        flush_tail(&self.fd, &mut crate::lock_or_recover(&self.tx_tail))
    }

    /// Ends the connection both ways while the fd stays open (the device
    /// may still hold it): the peer sees its client gone.
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on the socket this backend owns.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Reads one frame of a stream into `iov`: from the buffer when a whole
    /// one is there, else after one more recv.
    ///
    /// # Safety
    /// As [`NetBackend::readv`].
    unsafe fn read_stream(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let mut rb = crate::lock_or_recover(&self.rx);
        loop {
            if rb.broken {
                return Err(std::io::Error::from_raw_os_error(libc::EBADFD));
            }
            let have = &rb.buf[rb.start..rb.end];
            if have.len() >= 4 {
                let len = u32::from_be_bytes([have[0], have[1], have[2], have[3]]) as usize;
                if len > MAX_FRAME {
                    rb.broken = true;
                    log::error!(
                        "user-mode network: the peer sent a {len}-byte frame length (at most {MAX_FRAME}): not QEMU's stream framing; the NIC's connection is closed"
                    );
                    // Nothing after it can be framed: end the connection,
                    // so the peer sees it and the NIC's loop takes the
                    // backend as failed (it stops watching it) instead of
                    // retrying a read that can never succeed.
                    self.shutdown();
                    continue;
                }
                if have.len() >= 4 + len {
                    // SAFETY: the caller's promise (NetBackend::readv).
                    unsafe { scatter(&have[4..4 + len], iov) };
                    rb.start += 4 + len;
                    if rb.start == rb.end {
                        rb.start = 0;
                        rb.end = 0;
                    }
                    // The whole length, as tun returns it: a caller whose
                    // buffers were shorter sees that the frame was cut.
                    return Ok(len);
                }
            }
            // Room for at least one whole frame after what is there.
            if rb.buf.len() - rb.end < 4 + MAX_FRAME {
                let (start, end) = (rb.start, rb.end);
                rb.buf.copy_within(start..end, 0);
                rb.end = end - start;
                rb.start = 0;
            }
            let end = rb.end;
            let free = &mut rb.buf[end..];
            // SAFETY: recv into a buffer this function borrows mutably, of
            // the length given.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    free.as_mut_ptr().cast(),
                    free.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                // The peer closed: nothing more will come (the NIC loop
                // sees the hang-up and stops watching).
                0 => return Err(std::io::ErrorKind::WouldBlock.into()),
                n if n < 0 => return Err(std::io::Error::last_os_error()),
                n => rb.end += n as usize,
            }
        }
    }

    /// Writes one frame to a stream: its length, then the frame, with one
    /// sendmsg; what the socket does not take is kept and goes first next
    /// time.
    ///
    /// # Safety
    /// As [`NetBackend::writev`].
    unsafe fn write_stream(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let mut tail = crate::lock_or_recover(&self.tx_tail);
        flush_tail(&self.fd, &mut tail)?;
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let Some(header) = u32::try_from(len).ok().filter(|_| len <= MAX_FRAME) else {
            return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
        };
        let header = header.to_be_bytes();
        let mut all = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_SEND_IOV];
        if iov.len() + 1 > all.len() {
            // A frame in more pieces than we send at once (a guest's
            // choice): gathered into the tail buffer and sent from there.
            tail.extend_from_slice(&header);
            // SAFETY: the caller's promise (NetBackend::writev).
            unsafe { gather(iov, &mut tail) };
            let n = send(&self.fd, &tail).or_else(would_block_is_zero)?;
            tail.drain(..n);
            return Ok(len);
        }
        all[0] = libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: 4,
        };
        all[1..=iov.len()].copy_from_slice(iov);
        let all = &all[..=iov.len()];
        // SAFETY: the header is a live local; the other iovecs are the
        // caller's promise (NetBackend::writev); sendmsg only reads them.
        let sent = unsafe { sendmsg(&self.fd, all) }?;
        if sent < 4 + len {
            // Part of the frame went: the rest must follow before any
            // other byte, or the peer loses the framing.
            let mut skip = sent;
            for v in all {
                let piece = if skip >= v.iov_len {
                    skip -= v.iov_len;
                    continue;
                } else {
                    // SAFETY: as for sendmsg above: readable for v.iov_len.
                    unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }
                };
                tail.extend_from_slice(&piece[skip..]);
                skip = 0;
            }
        }
        Ok(len)
    }
}

/// Sends what is left of the last frame; WouldBlock while some is left.
fn flush_tail(fd: &OwnedFd, tail: &mut Vec<u8>) -> std::io::Result<()> {
    if !tail.is_empty() {
        let n = send(fd, tail)?;
        tail.drain(..n);
        if !tail.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
    }
    Ok(())
}

/// Iovecs one sendmsg takes at most (the header's and the frame's).
const MAX_SEND_IOV: usize = 64;

fn would_block_is_zero(e: std::io::Error) -> std::io::Result<usize> {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Copies `src` into the iovecs, as far as they reach.
///
/// # Safety
/// Each iovec must point to `iov_len` bytes valid for writes and not
/// otherwise referenced during the call.
unsafe fn scatter(src: &[u8], iov: &[libc::iovec]) {
    let mut rest = src;
    for v in iov {
        if rest.is_empty() {
            break;
        }
        let n = v.iov_len.min(rest.len());
        // SAFETY: the caller promises `v` is writable for iov_len >= n
        // bytes; `rest` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast(), n) };
        rest = &rest[n..];
    }
}

/// Appends the bytes the iovecs point to.
///
/// # Safety
/// Each iovec must point to `iov_len` readable bytes.
unsafe fn gather(iov: &[libc::iovec], out: &mut Vec<u8>) {
    for v in iov {
        // SAFETY: the caller promises readable memory of iov_len bytes.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
    }
}

fn send(fd: &OwnedFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: send from a live buffer of the length given; MSG_NOSIGNAL: a
    // peer gone is an error, not a SIGPIPE.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// # Safety
/// Each iovec must point to `iov_len` readable bytes.
unsafe fn sendmsg(fd: &OwnedFd, iov: &[libc::iovec]) -> std::io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // SAFETY: the iovecs are readable (the caller's promise); the kernel
    // checks their count.
    let n = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SocketBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetBackend for SocketBackend {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        match self.framing {
            // SAFETY: the caller's promise, passed on.
            Framing::Stream => unsafe { self.read_stream(iov) },
            Framing::Dgram => {
                // SAFETY: an all-zero msghdr is valid.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len();
                // SAFETY: the iovecs are writable for the call (the
                // caller's promise). MSG_TRUNC: the message's whole length
                // even when cut, as tun returns it.
                let n = unsafe {
                    libc::recvmsg(
                        self.fd.as_raw_fd(),
                        &mut msg,
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        }
    }

    unsafe fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        match self.framing {
            // SAFETY: the caller's promise, passed on.
            Framing::Stream => unsafe { self.write_stream(iov) },
            Framing::Dgram => {
                // SAFETY: the caller's promise, passed on.
                match unsafe { sendmsg(&self.fd, iov) } {
                    // A full peer queue (ENOBUFS on some sockets) waits
                    // for room like EAGAIN.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        Err(std::io::ErrorKind::WouldBlock.into())
                    }
                    r => r,
                }
            }
        }
    }

    fn vnet_hdr(&self) -> bool {
        false
    }

    fn configure_offloads(&self, _hdr_len: usize, _flags: u32) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "a socket backend carries no virtio-net header",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixDatagram, UnixStream};

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    fn iov_mut(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    fn stream() -> (SocketBackend, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (SocketBackend::new(a.into(), Framing::Stream).unwrap(), b)
    }

    fn read(be: &SocketBackend, buf: &mut [u8]) -> std::io::Result<usize> {
        let v = [iov_mut(buf)];
        // SAFETY: `buf` is a live buffer borrowed mutably for the call.
        unsafe { be.readv(&v) }
    }

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn stream_frames_come_whole_however_the_bytes_arrive() {
        let (be, mut peer) = stream();
        let mut buf = [0u8; 2048];
        assert_eq!(
            read(&be, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        // Two frames, the second cut after two bytes of its length and
        // again inside its body.
        let mut bytes = framed(&[1u8; 60]);
        bytes.extend(framed(&[2u8; 1000]));
        peer.write_all(&bytes[..66]).unwrap();
        assert_eq!(read(&be, &mut buf).unwrap(), 60);
        assert_eq!(&buf[..60], &[1u8; 60][..]);
        assert_eq!(
            read(&be, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        peer.write_all(&bytes[66..500]).unwrap();
        assert_eq!(
            read(&be, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        peer.write_all(&bytes[500..]).unwrap();
        assert_eq!(read(&be, &mut buf).unwrap(), 1000);
        assert!(buf[..1000].iter().all(|&b| b == 2));
    }

    #[test]
    fn a_stream_frame_longer_than_the_buffers_says_its_whole_length() {
        let (be, mut peer) = stream();
        peer.write_all(&framed(&[7u8; 300])).unwrap();
        peer.write_all(&framed(&[8u8; 10])).unwrap();
        let mut small = [0u8; 100];
        // As tun: the whole length, so the NIC sees the frame was cut.
        assert_eq!(read(&be, &mut small).unwrap(), 300);
        // The next frame is intact.
        assert_eq!(read(&be, &mut small).unwrap(), 10);
        assert_eq!(&small[..10], &[8u8; 10]);
    }

    #[test]
    fn a_length_beyond_any_frame_stops_the_stream_for_good() {
        let (be, mut peer) = stream();
        peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
        peer.write_all(&framed(&[1u8; 10])).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let e = read(&be, &mut buf).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADFD));
        }
        // The connection is ended: the peer reads EOF, and our side polls
        // as hung up (the NIC's loop then takes the backend as failed).
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut peer, &mut b).unwrap(), 0);
        let mut pfd = libc::pollfd {
            fd: be.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one live pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
        assert_ne!(pfd.revents & libc::POLLHUP, 0, "revents {:#x}", pfd.revents);
    }

    #[test]
    fn stream_writes_keep_the_framing_when_the_socket_is_full() {
        let (be, mut peer) = stream();
        // A small send buffer: the socket fills after a few frames.
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt with a live int of the size given.
        let r = unsafe {
            libc::setsockopt(
                be.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(r, 0);
        // Frames larger than the socket's buffer: it takes a part of one.
        let frame: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let (head, tail) = frame.split_at(14);
        // SAFETY: both halves are live buffers for the call.
        let write = || unsafe { be.writev(&[iov(head), iov(tail)]) };
        let mut sent = 0;
        loop {
            match write() {
                Ok(n) => {
                    assert_eq!(n, frame.len());
                    sent += 1;
                }
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                    break;
                }
            }
            assert!(sent < 1000, "the socket never filled");
        }
        // The socket took part of the last frame (a unix stream takes
        // what fits): the rest is kept.
        assert!(!be.tx_tail.lock().unwrap().is_empty());
        // The peer drains; 20 more frames go as room comes, then the rest
        // of the last one.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        let mut more = 0;
        while more < 20 {
            match write() {
                Ok(_) => more += 1,
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        while be.flush().is_err() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        be.shutdown();
        let got = reader.join().unwrap();
        // Every frame whole and in order, the ones cut by a full socket too.
        assert_eq!(got.len(), (sent + more) * (frame.len() + 4));
        for f in got.chunks(frame.len() + 4) {
            assert_eq!(&f[..4], &(frame.len() as u32).to_be_bytes());
            assert_eq!(&f[4..], &frame[..]);
        }
    }

    #[test]
    fn dgram_is_a_frame_per_message_with_the_whole_length() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let be = SocketBackend::new(a.into(), Framing::Dgram).unwrap();
        b.send(&[3u8; 200]).unwrap();
        let mut small = [0u8; 64];
        assert_eq!(read(&be, &mut small).unwrap(), 200);
        let mut buf = [0u8; 64];
        assert_eq!(
            read(&be, &mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        let frame = [9u8; 60];
        // SAFETY: a live buffer for the call.
        assert_eq!(
            unsafe { be.writev(&[iov(&frame[..10]), iov(&frame[10..])]) }.unwrap(),
            60
        );
        let mut got = [0u8; 128];
        assert_eq!(b.recv(&mut got).unwrap(), 60);
    }
}
