//! Everything rvm sets up on the host for one NIC, owned in one place so
//! that it is undone in one place: a TAP (created or attached), its bridge
//! membership and its ifup/ifdown scripts.

use std::path::PathBuf;
use std::sync::Arc;

use super::bridge::{self, BridgeError, BridgePort};
use super::config::NetConfig;
use super::script::{self, ScriptError};
use super::tap::{self, Tap, TapError};

#[derive(Debug, thiserror::Error)]
pub enum HostNicError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Script(#[from] ScriptError),
}

pub struct HostNic {
    // Field order is drop order: the bridge port goes before the TAP.
    downscript: Option<PathBuf>,
    port: Option<BridgePort>,
    tap: Arc<Tap>,
}

impl HostNic {
    /// Opens the TAP, sets its buffers and MTU, enslaves it, brings it
    /// up and runs the ifup script. On any failure what was done is undone.
    pub fn setup(cfg: &NetConfig) -> Result<HostNic, HostNicError> {
        let tap = match (&cfg.tap, cfg.fd) {
            (_, Some(fd)) => Tap::from_fd(tap::take_fd(fd)?, cfg.vnet_hdr)?,
            (Some(name), None) => Tap::open(name, cfg.vnet_hdr)?,
            (None, None) => return Err(TapError::BadName(String::new()).into()),
        };
        if let Some(bytes) = cfg.sndbuf {
            tap.set_sndbuf(bytes)?;
        }
        if let Some(mtu) = cfg.mtu {
            tap.set_mtu(u32::from(mtu))?;
        }
        let port = match &cfg.bridge {
            Some(br) => Some(bridge::enslave(br, &tap)?),
            None => None,
        };
        tap.set_up()?;
        let mut nic = HostNic {
            downscript: None,
            port,
            tap: Arc::new(tap),
        };
        if let Some(up) = &cfg.script {
            // On failure `nic` drops here: off the bridge, TAP closed.
            script::run(up, nic.tap.name(), "script")?;
        }
        nic.downscript = cfg.downscript.clone();
        Ok(nic)
    }

    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    pub fn bridge(&self) -> Option<&str> {
        self.port.as_ref().map(|p| p.bridge())
    }
}

impl Drop for HostNic {
    fn drop(&mut self) {
        if let Some(down) = &self.downscript {
            if let Err(e) = script::run(down, self.tap.name(), "downscript") {
                log::warn!("{e}");
            }
        }
    }
}
