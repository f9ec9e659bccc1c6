//! Enslaving a TAP to an existing Linux bridge, and letting it go again.

use super::sys;
use super::tap::Tap;
use super::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge {0} does not exist: create it with `ip link add {0} type bridge && ip link set {0} up`")]
    Missing(String),
    #[error("{0} is not a bridge (`ip -d link show {0}` tells what it is)")]
    NotBridge(String),
    #[error(
        "no permission to add {tap} to bridge {bridge}: run rvm as root or with CAP_NET_ADMIN"
    )]
    Permission { bridge: String, tap: String },
    #[error("cannot add {tap} to bridge {bridge}: {source}")]
    Other {
        bridge: String,
        tap: String,
        source: std::io::Error,
    },
}

/// The TAP's membership of a bridge; dropping it takes the TAP off.
#[derive(Debug)]
pub struct BridgePort {
    bridge: String,
    tap: String,
    ifindex: i32,
    /// The bridge's Ethernet address before and after the TAP joined,
    /// when joining changed it.
    moved: Option<([u8; 6], [u8; 6])>,
}

/// A bridge whose address nobody set takes the lowest of its ports'; a
/// port joining (or leaving) with a lower one changes it, and every host
/// and guest that cached the old one in its ARP table loses the host
/// until that entry expires (half a minute and more: a TCP stream stalls).
/// rvm gives the TAPs it creates high addresses (`tap_hwaddr`), so that a
/// bridge with an uplink keeps its own; one with only guests on it moves,
/// and then rvm says so, once per NIC. (An all-zero old address is a
/// bridge whose last port left: nobody can have cached it.)
fn warn_if_moved(bridge: &str, tap: &str, moved: Option<([u8; 6], [u8; 6])>) {
    if let Some((old, new)) = moved.filter(|(old, _)| *old != [0; 6]) {
        log::warn!(
            "bridge {bridge} changed its address from {} to {}'s {}: a bridge whose \
             address nobody set changes it as ports come and go, and hosts and guests \
             that cached the old one lose contact for half a minute or more; give it \
             a fixed one (`ip link set {bridge} address {}`)",
            MacAddr(old),
            tap,
            MacAddr(new),
            MacAddr(new)
        );
    }
}

/// The Ethernet address rvm gives a TAP it creates for a guest with
/// address `guest`: the guest's with the first byte 0xfe (locally
/// administered, unicast), as libvirt does. It is then higher than any
/// ordinary address, so a bridge never takes it as its own (see
/// `warn_if_moved`), and it differs from the guest's, whose frames the
/// bridge would otherwise keep for the host.
pub fn tap_hwaddr(guest: [u8; 6]) -> [u8; 6] {
    let mut m = guest;
    m[0] = 0xfe;
    m
}

pub fn enslave(bridge: &str, tap: &Tap) -> Result<BridgePort, BridgeError> {
    if !super::tap::valid_ifname(bridge) || !sys::exists(bridge) {
        return Err(BridgeError::Missing(bridge.into()));
    }
    let (b, t) = (bridge.to_string(), tap.name().to_string());
    let ifindex = tap.ifindex().map_err(|e| BridgeError::Other {
        bridge: b.clone(),
        tap: t.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let before = sys::hwaddr(bridge).ok();
    sys::bridge_port(bridge, ifindex, true).map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => BridgeError::NotBridge(b.clone()),
        Some(libc::ENODEV) => BridgeError::Missing(b.clone()),
        Some(libc::EPERM) | Some(libc::EACCES) => BridgeError::Permission {
            bridge: b.clone(),
            tap: t.clone(),
        },
        _ => BridgeError::Other {
            bridge: b.clone(),
            tap: t.clone(),
            source: e,
        },
    })?;
    let moved = match (before, sys::hwaddr(bridge).ok()) {
        (Some(old), Some(new)) if old != new => Some((old, new)),
        _ => None,
    };
    warn_if_moved(&b, &t, moved);
    Ok(BridgePort {
        bridge: b,
        tap: t,
        ifindex,
        moved,
    })
}

impl BridgePort {
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address before and after this TAP joined, if it moved.
    pub fn moved(&self) -> Option<([u8; 6], [u8; 6])> {
        self.moved
    }
}

impl Drop for BridgePort {
    fn drop(&mut self) {
        if let Err(e) = sys::bridge_port(&self.bridge, self.ifindex, false) {
            // Gone already (the TAP or the bridge was deleted): fine.
            if !matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::EINVAL)) {
                log::warn!("cannot take {} off bridge {}: {e}", self.tap, self.bridge);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::backend::NetBackend;
    use crate::net::test_util::*;
    use std::time::{Duration, Instant};

    #[test]
    fn tap_joins_and_leaves_the_bridge() {
        in_fresh_netns(|| {
            add_bridge("rvmbr0");
            let tap = Tap::open("rvmport0", false).unwrap();
            let port = enslave("rvmbr0", &tap).unwrap();
            assert_eq!(port.bridge(), "rvmbr0");
            assert!(in_bridge("rvmport0", "rvmbr0"));
            drop(port);
            assert!(!in_bridge("rvmport0", "rvmbr0"));
            assert!(exists("rvmport0"), "leaving the bridge deleted the TAP");
            // And it can join again.
            let _port = enslave("rvmbr0", &tap).unwrap();
            assert!(in_bridge("rvmport0", "rvmbr0"));
        });
    }

    #[test]
    fn leaving_after_the_tap_or_bridge_is_gone_is_quiet() {
        in_fresh_netns(|| {
            add_bridge("rvmbr1");
            // A fixed address: its moves are another test's.
            ip(&["link", "set", "rvmbr1", "address", "02:00:00:00:00:01"]);
            let warned = warnings_of(|| {
                let tap = Tap::open("rvmport1", false).unwrap();
                let port = enslave("rvmbr1", &tap).unwrap();
                drop(tap);
                assert!(gone_soon("rvmport1"));
                drop(port);

                let tap = Tap::open("rvmport1", false).unwrap();
                let port = enslave("rvmbr1", &tap).unwrap();
                ip(&["link", "del", "rvmbr1"]);
                drop(port);
            });
            assert_eq!(warned, Vec::<String>::new());

            // A removal that really fails is reported, and the TAP stays a
            // port (shown here by taking away the right to remove it).
            add_bridge("rvmbr1");
            let tap = Tap::open("rvmport1", false).unwrap();
            let port = enslave("rvmbr1", &tap).unwrap();
            drop_cap_net_admin();
            let warned = warnings_of(|| drop(port));
            assert_eq!(warned.len(), 1, "{warned:?}");
            assert!(
                warned[0].starts_with("cannot take rvmport1 off bridge rvmbr1"),
                "{warned:?}"
            );
            assert!(in_bridge("rvmport1", "rvmbr1"));
        });
    }

    #[test]
    fn second_enslave_is_refused_and_keeps_the_first() {
        in_fresh_netns(|| {
            add_bridge("rvmbr2");
            add_bridge("rvmbr2b");
            let tap = Tap::open("rvmport2", false).unwrap();
            let port = enslave("rvmbr2", &tap).unwrap();
            for br in ["rvmbr2", "rvmbr2b"] {
                let err = enslave(br, &tap).unwrap_err();
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!("cannot add rvmport2 to bridge {br}")),
                    "{msg}"
                );
                assert!(in_bridge("rvmport2", "rvmbr2"), "{br}");
                assert!(!in_bridge("rvmport2", "rvmbr2b"), "{br}");
            }
            drop(port);
            assert!(!in_bridge("rvmport2", "rvmbr2"));
        });
    }

    #[test]
    fn missing_or_wrong_bridge_says_what_to_do() {
        in_fresh_netns(|| {
            let tap = Tap::open("rvmport3", false).unwrap();
            let err = enslave("rvmnobr", &tap).unwrap_err();
            assert!(matches!(err, BridgeError::Missing(_)), "{err}");
            // tests/net.rs looks for "ip link add nobr type bridge".
            assert_eq!(
                err.to_string(),
                "bridge rvmnobr does not exist: create it with \
                 `ip link add rvmnobr type bridge && ip link set rvmnobr up`"
            );
            let err = enslave("bad/name", &tap).unwrap_err();
            assert!(matches!(err, BridgeError::Missing(_)), "{err}");

            let other = Tap::open("rvmport3b", false).unwrap();
            for not_bridge in ["lo", other.name()] {
                let err = enslave(not_bridge, &tap).unwrap_err();
                assert!(matches!(err, BridgeError::NotBridge(_)), "{err}");
                // tests/net.rs looks for "is not a bridge".
                assert!(
                    err.to_string()
                        .starts_with(&format!("{not_bridge} is not a bridge")),
                    "{err}"
                );
            }
            assert_eq!(ip(&["-o", "link", "show", "master", "lo"]), "");
        });
    }

    /// Reads frames from `tap` into a 12-byte header buffer and a data
    /// buffer until one has the test EtherType, skipping the IPv6 chatter
    /// the namespace may produce. Returns the total length.
    fn read_test_frame(tap: &Tap, hdr: &mut [u8; 12], data: &mut [u8]) -> usize {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            // SAFETY: `hdr` and `data` are borrowed mutably for the call.
            match unsafe { tap.readv(&[iov_mut(hdr), iov_mut(data)]) } {
                Ok(n) if n >= 12 + 14 && data[12..14] == [0x88, 0xb5] => return n,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("readv: {e}"),
            }
        }
        panic!("no frame came out of {}", tap.name());
    }

    #[test]
    fn frame_crosses_the_bridge_with_vnet_headers() {
        in_fresh_netns(|| {
            add_bridge("rvmbr4");
            let a = Tap::open("rvma", true).unwrap();
            let b = Tap::open("rvmb", true).unwrap();
            for t in [&a, &b] {
                t.configure_offloads(12, 0).unwrap();
                t.set_up().unwrap();
            }
            let _pa = enslave("rvmbr4", &a).unwrap();
            let _pb = enslave("rvmbr4", &b).unwrap();

            // A zeroed virtio_net_hdr_mrg_rxbuf: no checksum or GSO work.
            let hdr = [0u8; 12];
            let frame = test_frame(0xa5);
            let (f1, f2) = frame.split_at(20);
            // SAFETY: the buffers are live locals borrowed for the call.
            let n = unsafe { a.writev(&[iov(&hdr), iov(f1), iov(f2)]) }.unwrap();
            assert_eq!(n, hdr.len() + frame.len());

            // The header lands in its own buffer, as virtio-net wants it.
            let mut rx_hdr = [0xeeu8; 12];
            let mut data = [0u8; 2048];
            let n = read_test_frame(&b, &mut rx_hdr, &mut data);
            assert_eq!(n, 12 + frame.len());
            assert_eq!(&data[..frame.len()], &frame[..]);
            // flags and gso_type are zero: nothing was left to offload.
            assert_eq!(&rx_hdr[..2], &[0, 0]);
        });
    }
}
