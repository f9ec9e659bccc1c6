//! Everything rvm sets up on the host for one NIC, owned in one place so
//! that it is undone in one place: a TAP (created or attached), its bridge
//! membership and its ifup/ifdown scripts; or, for a NIC without a TAP,
//! the socket to a user-mode network and the passt rvm started for it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::NetBackend;
use super::bridge::{self, BridgeError, BridgePort};
use super::config::{NetConfig, Peer};
use super::egress::{EgressControl, NftError};
use super::passt::{Passt, PasstError, PASST_MTU};
use super::script::{self, ScriptError};
use super::socket::{Framing, SocketBackend};
use super::tap::{self, Tap, TapError};

#[derive(Debug, thiserror::Error)]
pub enum HostNicError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Passt(#[from] PasstError),
    #[error(transparent)]
    Egress(#[from] NftError),
    #[error("cannot connect to the user-mode network at {path}: {source} (is its stack, such as `passt -s {path}` or gvproxy, running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
}

pub struct HostNic {
    // Field order is drop order: the bridge port goes before the TAP.
    /// The egress policy in the kernel, taken away first.
    egress: Arc<EgressControl>,
    downscript: Option<PathBuf>,
    port: Option<BridgePort>,
    /// One fd per queue pair, all of one TAP; none for a user-mode NIC.
    taps: Vec<Arc<Tap>>,
    /// The wire of a NIC without a TAP.
    user: Option<UserNet>,
}

/// A NIC's socket to a user-mode network, and passt when rvm runs it.
struct UserNet {
    socket: Arc<SocketBackend>,
    /// What the exit log calls the NIC's host side.
    name: String,
    /// The MTU the stack takes (passt's), if known.
    mtu: Option<u16>,
    /// Held to be reaped when the NIC goes (after the socket closed).
    _passt: Option<Passt>,
}

impl Drop for UserNet {
    /// The device may still hold the socket: shut it down, so that passt
    /// sees its client go now and ends (its own drop reaps it).
    fn drop(&mut self) {
        // The rest of a frame the socket took part of, if it takes it now.
        let _ = self.socket.flush();
        self.socket.shutdown();
    }
}

impl UserNet {
    fn setup(peer: &Peer) -> Result<UserNet, HostNicError> {
        let connect_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| HostNicError::Connect { path, source }
        };
        let (fd, framing, name, mtu, passt): (OwnedFd, _, _, _, _) = match peer {
            Peer::Passt { hostfwd } => {
                let (passt, fd) = Passt::start(hostfwd)?;
                let name = format!("passt (pid {})", passt.pid());
                (fd, Framing::Stream, name, Some(PASST_MTU), Some(passt))
            }
            Peer::Stream(path) => {
                let s = std::os::unix::net::UnixStream::connect(path).map_err(connect_err(path))?;
                let name = format!("stream {}", path.display());
                (s.into(), Framing::Stream, name, None, None)
            }
            Peer::Dgram(path) => {
                let s = dgram_socket(path).map_err(connect_err(path))?;
                let name = format!("dgram {}", path.display());
                (s.into(), Framing::Dgram, name, None, None)
            }
        };
        let socket = SocketBackend::new(fd, framing).map_err(|source| HostNicError::Connect {
            path: name.clone(),
            source,
        })?;
        Ok(UserNet {
            socket: Arc::new(socket),
            name,
            mtu,
            _passt: passt,
        })
    }
}

/// A datagram socket connected to `path`, with an address of its own (an
/// abstract one, unique to this process and NIC) for the peer to answer
/// to: an unbound UNIX datagram socket cannot be answered.
fn dgram_socket(path: &Path) -> std::io::Result<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "rvm-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let s = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
    s.connect(path)?;
    Ok(s)
}

/// What setup changed on a TAP rvm did not create, to put back when a
/// later step fails: that TAP outlives the failure. (One rvm created needs
/// nothing: closing it deletes it.) The send buffer belongs to rvm's fd.
#[derive(Default)]
struct Undo {
    mtu: Option<u32>,
    take_down: bool,
}

impl Undo {
    fn apply(&self, tap: &Tap) {
        if self.take_down {
            if let Err(e) = tap.set_down() {
                log::warn!("undoing the setup of {}: {e}", tap.name());
            }
        }
        if let Some(mtu) = self.mtu {
            if let Err(e) = tap.set_mtu(mtu) {
                log::warn!("undoing the setup of {}: {e}", tap.name());
            }
        }
    }
}

impl HostNic {
    /// Opens the TAP, sets its buffers and MTU, enslaves it, brings it
    /// up and runs the ifup script. On any failure what was done is undone.
    pub fn setup(cfg: &NetConfig) -> Result<HostNic, HostNicError> {
        if let Some(peer) = &cfg.peer {
            let peer_policy = &cfg.egress;
            return Ok(HostNic {
                egress: Arc::new(EgressControl::start(None, peer_policy.clone(), false)?),
                downscript: None,
                port: None,
                taps: Vec::new(),
                user: Some(UserNet::setup(peer)?),
            });
        }
        let pairs = usize::from(cfg.queues.pairs());
        let taps = match (&cfg.tap, cfg.fd, cfg.fds.is_empty()) {
            (_, Some(fd), _) => vec![Tap::from_fd(tap::take_fd(fd)?, cfg.vnet_hdr)?],
            (_, None, false) => from_fds(&cfg.fds, cfg.vnet_hdr)?,
            (Some(name), None, true) => Tap::open_queues(name, cfg.vnet_hdr, pairs)?,
            (None, None, true) => return Err(TapError::BadName(String::new()).into()),
        };
        let mut undo = Undo::default();
        match configure(&taps, cfg, &mut undo) {
            Ok((port, egress)) => Ok(HostNic {
                egress: Arc::new(egress),
                downscript: cfg.downscript.clone(),
                port,
                taps: taps.into_iter().map(Arc::new).collect(),
                user: None,
            }),
            Err(e) => {
                // The bridge port is gone already; the TAP closes after this.
                undo.apply(&taps[0]);
                Err(e)
            }
        }
    }

    /// The TAP (its first queue); None for a user-mode NIC.
    pub fn tap(&self) -> Option<&Arc<Tap>> {
        self.taps.first()
    }

    /// The NIC's wire, one per queue pair.
    pub fn backends(&self) -> Vec<Arc<dyn NetBackend>> {
        match &self.user {
            Some(u) => vec![u.socket.clone() as Arc<dyn NetBackend>],
            None => self
                .taps
                .iter()
                .map(|t| t.clone() as Arc<dyn NetBackend>)
                .collect(),
        }
    }

    /// What the host side is called in logs: the TAP's name, or the
    /// user-mode network.
    pub fn name(&self) -> String {
        match (&self.user, self.taps.first()) {
            (Some(u), _) => u.name.clone(),
            (None, Some(t)) => t.name().to_string(),
            (None, None) => String::new(),
        }
    }

    /// The MTU of the wire, where it has one to tell.
    pub fn mtu(&self) -> Option<u32> {
        match (&self.user, self.taps.first()) {
            (Some(u), _) => u.mtu.map(u32::from),
            (None, Some(t)) => t.mtu().ok(),
            (None, None) => None,
        }
    }

    /// The TAP's interface index (a kernel-side capture needs it).
    pub fn ifindex(&self) -> Option<i32> {
        self.taps.first().and_then(|t| t.ifindex().ok())
    }

    /// The NIC's egress policy (what changes it while the VM runs).
    pub fn egress(&self) -> Arc<EgressControl> {
        self.egress.clone()
    }

    pub fn bridge(&self) -> Option<&str> {
        self.port.as_ref().map(|p| p.bridge())
    }
}

/// The TAP behind `fds` (fds=A:B:...): all of one TAP, a multi-queue one
/// when there are several.
fn from_fds(fds: &[i32], vnet_hdr: bool) -> Result<Vec<Tap>, HostNicError> {
    let mut taps = Vec::with_capacity(fds.len());
    for &fd in fds {
        taps.push(Tap::from_fd(tap::take_fd(fd)?, vnet_hdr)?);
    }
    let first = taps[0].name().to_string();
    if let Some(t) = taps.iter().find(|t| t.name() != first) {
        return Err(TapError::BadFd(
            t.as_raw_fd(),
            std::io::Error::other(format!(
                "fds= must all be queues of one TAP: {} is not {first}",
                t.name()
            )),
        )
        .into());
    }
    if taps.len() > 1 && !taps[0].multi_queue() {
        return Err(TapError::NotMultiQueue(first).into());
    }
    Ok(taps)
}

/// The steps after opening the TAP (`taps`: its queues). An early return
/// drops the bridge port, taking the TAP off the bridge, and the egress
/// policy; `undo` collects the rest.
fn configure(
    taps: &[Tap],
    cfg: &NetConfig,
    undo: &mut Undo,
) -> Result<(Option<BridgePort>, EgressControl), HostNicError> {
    let tap = &taps[0];
    if let Some(bytes) = cfg.sndbuf {
        // The send buffer is each queue's own.
        for t in taps {
            t.set_sndbuf(bytes)?;
        }
    }
    if let Some(mtu) = cfg.mtu.map(u32::from) {
        if !tap.created() {
            let old = tap.mtu()?;
            if old != mtu {
                undo.mtu = Some(old);
            }
        }
        tap.set_mtu(mtu)?;
    }
    if tap.created() {
        // Before it joins a bridge, or a script adds it to one: a TAP
        // with the kernel's random address could become the bridge's.
        let base = match cfg.mac {
            Some(m) => m.0,
            None => tap.hwaddr()?,
        };
        tap.set_hwaddr(bridge::tap_hwaddr(base))?;
    }
    let port = match &cfg.bridge {
        Some(br) => Some(bridge::enslave(br, tap)?),
        None => None,
    };
    // In place before the TAP is up, so before the guest's first frame.
    // A TAP rvm did not create (an fd, a persistent TAP of the user's) may
    // come without the right to program nftables: then rvm's stage.
    let egress = EgressControl::start(Some(tap.name()), cfg.egress.clone(), !tap.created())?;
    if !tap.created() && !tap.is_up()? {
        undo.take_down = true;
    }
    tap.set_up()?;
    if let Some(up) = &cfg.script {
        script::run(up, tap.name(), "script")?;
    }
    Ok((port, egress))
}

impl Drop for HostNic {
    fn drop(&mut self) {
        // A controller the embedder keeps must not keep the policy alive.
        self.egress.close();
        if let Some(down) = &self.downscript {
            if let Err(e) = script::run(down, &self.name(), "downscript") {
                log::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::backend::NetBackend;
    use crate::net::test_util::*;
    use crate::net::MacAddr;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn full_setup_and_teardown() {
        in_fresh_netns(|| {
            add_bridge("rvmbr0");
            let dir = TempDir::new();
            // The scripts record $1 and the link as they see it, to show
            // that they run with the TAP up and in the bridge.
            let show =
                |file: &str| format!("ip -o link show \"$1\" > '{}'", dir.path(file).display());
            let nic = HostNic::setup(&NetConfig {
                bridge: Some("rvmbr0".into()),
                sndbuf: Some(1 << 20),
                mtu: Some(1400),
                script: Some(dir.script("ifup", &show("up"))),
                downscript: Some(dir.script("ifdown", &show("down"))),
                ..NetConfig::tap("rvmnic0")
            })
            .unwrap();
            assert!(nic.tap().unwrap().created());
            assert!(nic.tap().unwrap().vnet_hdr());
            assert_eq!(nic.bridge(), Some("rvmbr0"));
            assert_eq!(mtu_of("rvmnic0"), 1400);
            assert!(is_up("rvmnic0"));
            assert!(in_bridge("rvmnic0", "rvmbr0"));
            let up = dir.read("up");
            assert!(
                up.starts_with(&format!("{}: rvmnic0:", index_of("rvmnic0"))),
                "{up}"
            );
            assert!(up.contains(",UP"), "{up}");
            assert!(up.contains("master rvmbr0"), "{up}");
            assert_eq!(dir.read("down"), "");

            drop(nic);
            // The downscript saw the NIC as it was.
            let down = dir.read("down");
            assert!(down.contains(",UP"), "{down}");
            assert!(down.contains("master rvmbr0"), "{down}");
            assert!(gone_soon("rvmnic0"));
            assert_eq!(ports_of("rvmbr0"), "");
        });
    }

    #[test]
    fn persistent_tap_stays_but_leaves_the_bridge() {
        in_fresh_netns(|| {
            add_bridge("rvmbr1");
            add_persistent_tap("rvmnic1");
            let nic = HostNic::setup(&NetConfig {
                bridge: Some("rvmbr1".into()),
                vnet_hdr: false,
                ..NetConfig::tap("rvmnic1")
            })
            .unwrap();
            assert!(!nic.tap().unwrap().created());
            assert!(in_bridge("rvmnic1", "rvmbr1"));
            drop(nic);
            assert!(exists("rvmnic1"));
            assert!(!in_bridge("rvmnic1", "rvmbr1"));
        });
    }

    /// A bridge whose lowest port is an uplink at fc:00:00:00:00:01, as
    /// a host's bridge with its physical NIC in it.
    fn bridge_with_uplink(bridge: &str, uplink: &str) {
        add_bridge(bridge);
        add_persistent_tap(uplink);
        ip(&["link", "set", uplink, "address", "fc:00:00:00:00:01"]);
        ip(&["link", "set", uplink, "master", bridge]);
    }

    #[test]
    fn a_created_tap_never_takes_the_bridge_address() {
        // The kernel gives a TAP a random address, most often lower than
        // the uplink's: the bridge took it, and every neighbour's ARP
        // entry for the host went stale (the load test's streams stalled).
        in_fresh_netns(|| {
            bridge_with_uplink("rvmbr8", "rvmup8");
            let before = crate::net::sys::hwaddr("rvmbr8").unwrap();
            assert_eq!(before, [0xfc, 0, 0, 0, 0, 1]);
            let mac = MacAddr([0x02, 0, 0, 0, 0, 5]);
            let nic = HostNic::setup(&NetConfig {
                bridge: Some("rvmbr8".into()),
                mac: Some(mac),
                ..NetConfig::tap("rvmnic8")
            })
            .unwrap();
            assert_eq!(nic.tap().unwrap().hwaddr().unwrap(), [0xfe, 0, 0, 0, 0, 5]);
            assert_eq!(crate::net::sys::hwaddr("rvmbr8").unwrap(), before);
            assert_eq!(nic.port.as_ref().and_then(|p| p.moved()), None);
            // Without a MAC the kernel's address keeps its last five bytes.
            let bare = HostNic::setup(&NetConfig {
                bridge: Some("rvmbr8".into()),
                ..NetConfig::tap("rvmnic9")
            })
            .unwrap();
            assert_eq!(bare.tap().unwrap().hwaddr().unwrap()[0], 0xfe);
            assert_eq!(crate::net::sys::hwaddr("rvmbr8").unwrap(), before);
        });
    }

    #[test]
    fn a_bridge_that_moves_its_address_is_reported_and_a_fixed_one_stays() {
        in_fresh_netns(|| {
            // No port and no address set: the bridge takes the TAP's.
            add_bridge("rvmbr6");
            let before = crate::net::sys::hwaddr("rvmbr6").unwrap();
            let mut nic = None;
            let warned = crate::logging::capture::warnings_of(|| {
                nic = Some(
                    HostNic::setup(&NetConfig {
                        bridge: Some("rvmbr6".into()),
                        ..NetConfig::tap("rvmnic6")
                    })
                    .unwrap(),
                )
            });
            let nic = nic.unwrap();
            let own = nic.tap().unwrap().hwaddr().unwrap();
            assert_eq!(
                nic.port.as_ref().and_then(|p| p.moved()),
                Some((before, own))
            );
            let fix = format!("`ip link set rvmbr6 address {}`", MacAddr(own));
            assert!(warned.len() == 1 && warned[0].contains(&fix), "{warned:?}");
            // An address set by hand is the bridge's for good.
            add_bridge("rvmbr7");
            ip(&["link", "set", "rvmbr7", "address", "fe:ff:ff:ff:ff:ff"]);
            let nic = HostNic::setup(&NetConfig {
                bridge: Some("rvmbr7".into()),
                ..NetConfig::tap("rvmnic7")
            })
            .unwrap();
            assert_eq!(nic.port.as_ref().and_then(|p| p.moved()), None);
            assert_eq!(
                crate::net::sys::hwaddr("rvmbr7").unwrap(),
                [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]
            );
        });
    }

    #[test]
    fn missing_bridge_leaves_no_tap_behind() {
        in_fresh_netns(|| {
            let err = expect_err(HostNic::setup(&NetConfig {
                bridge: Some("rvmnobr".into()),
                ..NetConfig::tap("rvmnic2")
            }));
            assert!(matches!(err, HostNicError::Bridge(_)), "{err}");
            assert!(
                err.to_string()
                    .contains("`ip link add rvmnobr type bridge && ip link set rvmnobr up`"),
                "{err}"
            );
            assert!(gone_soon("rvmnic2"));
        });
    }

    #[test]
    fn failing_script_undoes_everything() {
        in_fresh_netns(|| {
            add_bridge("rvmbr3");
            let dir = TempDir::new();
            let up = dir.script("up", "exit 7");
            let down = dir.script("down", &format!("touch '{}'", dir.path("ran").display()));
            let err = expect_err(HostNic::setup(&NetConfig {
                bridge: Some("rvmbr3".into()),
                script: Some(up.clone()),
                downscript: Some(down),
                ..NetConfig::tap("rvmnic3")
            }));
            assert!(matches!(err, HostNicError::Script(_)), "{err}");
            assert_eq!(
                err.to_string(),
                format!("script {} rvmnic3 failed: exit status: 7", up.display())
            );
            assert!(gone_soon("rvmnic3"));
            assert_eq!(ports_of("rvmbr3"), "");
            // The ifup never succeeded: nothing for the ifdown to undo.
            assert!(!dir.path("ran").exists());
        });
    }

    /// A TAP rvm did not create outlives a failed setup, so it gets back
    /// what setup changed: MTU, link state and bridge membership.
    #[test]
    fn failed_setup_puts_a_persistent_tap_back_as_it_was() {
        in_fresh_netns(|| {
            add_bridge("rvmbr4");
            let dir = TempDir::new();
            let fail = dir.script("up", "exit 1");
            add_persistent_tap("rvmnic4");
            let old_mtu = mtu_of("rvmnic4");
            let new_mtu = u16::try_from(old_mtu).unwrap() + 100;
            for (bridge, script) in [
                // Fails after MTU, bridge and link up.
                (Some("rvmbr4"), Some(fail.clone())),
                // Fails right after the MTU.
                (Some("rvmnobr"), None),
            ] {
                assert!(!is_up("rvmnic4"));
                let err = expect_err(HostNic::setup(&NetConfig {
                    bridge: bridge.map(String::from),
                    mtu: Some(new_mtu),
                    script,
                    vnet_hdr: false,
                    ..NetConfig::tap("rvmnic4")
                }));
                assert!(
                    matches!(err, HostNicError::Script(_) | HostNicError::Bridge(_)),
                    "{err}"
                );
                assert!(exists("rvmnic4"));
                assert_eq!(mtu_of("rvmnic4"), old_mtu, "{err}");
                assert!(!is_up("rvmnic4"), "{err}");
                assert_eq!(ports_of("rvmbr4"), "", "{err}");
            }
            // A link that was up before stays up.
            ip(&["link", "set", "rvmnic4", "up"]);
            expect_err(HostNic::setup(&NetConfig {
                mtu: Some(new_mtu),
                script: Some(fail),
                vnet_hdr: false,
                ..NetConfig::tap("rvmnic4")
            }));
            assert!(is_up("rvmnic4"));
            assert_eq!(mtu_of("rvmnic4"), old_mtu);
        });
    }

    #[test]
    fn tap_from_an_inherited_fd() {
        in_fresh_netns(|| {
            let vnet = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            let fd = raw_tun("rvmnic5", vnet).into_raw_fd();
            let dir = TempDir::new();
            let fds = dir.path("fds");
            let up = dir.script("up", &format!("ls -l /proc/$$/fd/ > '{}'", fds.display()));
            let nic = HostNic::setup(&NetConfig {
                tap: None,
                fd: Some(fd),
                script: Some(up),
                ..NetConfig::tap("")
            })
            .unwrap();
            // The script must not hold the TAP: it could outlive rvm.
            let seen = dir.read("fds");
            assert!(seen.contains("/dev/null"), "{seen}");
            assert!(!seen.contains("/dev/net/tun"), "{seen}");
            assert_eq!(nic.tap().unwrap().name(), "rvmnic5");
            assert_eq!(nic.tap().unwrap().as_raw_fd(), fd);
            assert!(!nic.tap().unwrap().created());
            assert!(is_up("rvmnic5"));
            drop(nic);
            // The fd was the TAP's only holder and the TAP is not
            // persistent, so closing it deletes the TAP.
            assert!(gone_soon("rvmnic5"));
        });
    }

    #[test]
    fn queues_make_a_multi_queue_tap_with_one_fd_each() {
        in_fresh_netns(|| {
            add_bridge("rvmbr10");
            let nic = HostNic::setup(&NetConfig {
                bridge: Some("rvmbr10".into()),
                queues: crate::net::config::Queues::Pairs(3),
                sndbuf: Some(1 << 20),
                ..NetConfig::tap("rvmmq10")
            })
            .unwrap();
            assert_eq!(nic.taps.len(), 3);
            assert!(nic.taps.iter().all(|t| t.multi_queue()));
            assert!(tun_details("rvmmq10").contains("multi_queue"));
            assert!(in_bridge("rvmmq10", "rvmbr10"));
            drop(nic);
            assert!(gone_soon("rvmmq10"));
        });
    }

    #[test]
    fn fds_must_be_queues_of_one_multi_queue_tap() {
        in_fresh_netns(|| {
            let mq = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
            let fds: Vec<i32> = (0..2)
                .map(|_| raw_tun("rvmmq11", mq).into_raw_fd())
                .collect();
            let nic = HostNic::setup(&NetConfig {
                tap: None,
                fds: fds.clone(),
                queues: crate::net::config::Queues::Pairs(2),
                ..NetConfig::tap("")
            })
            .unwrap();
            assert_eq!(nic.taps.len(), 2);
            assert_eq!(nic.taps[1].as_raw_fd(), fds[1]);
            drop(nic);
            assert!(gone_soon("rvmmq11"));

            // Two different TAPs, or two fds of a single-queue one: no.
            let one = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            let two = vec![
                raw_tun("rvmmq12", mq).into_raw_fd(),
                raw_tun("rvmmq13", mq).into_raw_fd(),
            ];
            let e = expect_err(HostNic::setup(&NetConfig {
                tap: None,
                fds: two,
                queues: crate::net::config::Queues::Pairs(2),
                ..NetConfig::tap("")
            }));
            assert!(
                e.to_string().contains("must all be queues of one TAP"),
                "{e}"
            );
            let single = raw_tun("rvmmq14", one);
            let again = single.try_clone().unwrap().into_raw_fd();
            let e = expect_err(HostNic::setup(&NetConfig {
                tap: None,
                fds: vec![single.into_raw_fd(), again],
                queues: crate::net::config::Queues::Pairs(2),
                ..NetConfig::tap("")
            }));
            assert!(e.to_string().contains("not a multi-queue TAP"), "{e}");
        });
    }

    #[test]
    fn a_nic_needs_a_tap_or_an_open_fd() {
        in_fresh_netns(|| {
            let none = NetConfig {
                tap: None,
                ..NetConfig::tap("")
            };
            let err = expect_err(HostNic::setup(&none));
            assert!(
                matches!(err, HostNicError::Tap(TapError::BadName(_))),
                "{err}"
            );
            let err = expect_err(HostNic::setup(&NetConfig {
                fd: Some(1 << 30),
                ..none
            }));
            assert!(
                matches!(err, HostNicError::Tap(TapError::BadFd(..))),
                "{err}"
            );
            assert_eq!(ip(&["-o", "link"]).lines().count(), 1, "only lo");
        });
        // Both at once never reach setup: the option parser refuses them.
        let err = "tap=rvmnic6,fd=3".parse::<NetConfig>().unwrap_err();
        assert!(
            matches!(err, crate::net::config::NetConfigError::TapAndFd(_)),
            "{err}"
        );
    }

    #[test]
    fn bad_mtu_leaves_no_tap_behind() {
        in_fresh_netns(|| {
            let err = expect_err(HostNic::setup(&NetConfig {
                mtu: Some(10),
                ..NetConfig::tap("rvmnic7")
            }));
            assert!(matches!(err, HostNicError::Tap(_)), "{err}");
            assert!(err.to_string().contains("rvmnic7"), "{err}");
            assert!(gone_soon("rvmnic7"));
        });
    }
}
