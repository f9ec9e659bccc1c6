//! Enslaving a TAP to an existing Linux bridge, and letting it go again.

use super::sys;
use super::tap::Tap;

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
    Ok(BridgePort {
        bridge: b,
        tap: t,
        ifindex,
    })
}

impl BridgePort {
    pub fn bridge(&self) -> &str {
        &self.bridge
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
