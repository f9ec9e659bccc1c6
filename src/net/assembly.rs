//! From a NIC's options and its host side to what the machine plugs: the
//! MAC, the MTU offered to the guest, and the data path (vhost-net or
//! userspace, by the `vhost=` policy). The machine (src/vmm) only chooses
//! the device model's slot; every networking decision is made here.

use std::sync::Arc;

use super::backend::NetBackend;
use super::config::{NetConfig, NicModel, VhostMode};
use super::host_nic::HostNic;
use super::stage::Stages;
use super::vhost::VhostNet;
use crate::error::{Error, Result};
use crate::vmm::memory::GuestRam;

/// One NIC, ready to plug.
pub struct NicParts {
    pub model: NicModel,
    /// One per queue pair (one for the e1000).
    pub backends: Vec<Arc<dyn NetBackend>>,
    pub mac: [u8; 6],
    /// What the guest is told the MTU is (virtio-net's config space).
    pub mtu: u16,
    /// The kernel's data path, one device per queue pair, when the policy
    /// and the host allow it (else none).
    pub vhost: Vec<VhostNet>,
    /// The host interface's name, for the exit log line.
    pub name: String,
    /// The TAP's name as the user gave it (the e1000 uses it for the
    /// link state it reports).
    pub tap_name: Option<String>,
}

/// Checks that `vhost=on` can work on this host, before anything is
/// created (so a refusal leaves nothing behind).
pub fn check_vhost_policy(cfg: &NetConfig) -> Result<()> {
    if cfg.vhost == VhostMode::On {
        super::vhost::probe(cfg.vnet_hdr).map_err(|source| Error::Vhost {
            nic: cfg.label(),
            source,
        })?;
    }
    Ok(())
}

/// The parts of the NIC `cfg` describes, on its host side `host`.
/// `validate_all` has run, so the MAC is set.
pub fn assemble(cfg: &NetConfig, host: &HostNic, memory: &GuestRam) -> Result<NicParts> {
    let mac = cfg.mac.map(|m| m.0).unwrap_or(DEFAULT_MAC);
    let backends = host.backends();
    let (mtu, vhost) = match cfg.model {
        // The e1000 has no MTU field and no vhost path.
        NicModel::E1000 => (1500, Vec::new()),
        NicModel::Virtio => (
            cfg.mtu
                .unwrap_or_else(|| host.mtu().map(|m| m.min(65535) as u16).unwrap_or(1500)),
            vhost_for(cfg, host, memory, backends.len())?,
        ),
    };
    Ok(NicParts {
        model: cfg.model,
        backends,
        mac,
        mtu,
        vhost,
        name: host.name(),
        tap_name: cfg.tap.clone(),
    })
}

/// `vhost=on` asks that the kernel move the NIC's frames; a stage that
/// needs them in rvm cannot be served then. Checked before the guest
/// starts, so the conflict is an error, not a stage bypassed in silence.
pub fn check_stages_against_vhost(nic: &str, vhost_required: bool, stages: &Stages) -> Result<()> {
    match stages.needs_userspace() {
        Some(stage) if vhost_required => Err(Error::StageNeedsUserspace {
            nic: nic.to_string(),
            stage,
        }),
        _ => Ok(()),
    }
}

/// A locally administered MAC, only for a config that skipped validation.
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

/// One vhost-net device per queue pair, or none.
fn vhost_for(
    cfg: &NetConfig,
    host: &HostNic,
    memory: &GuestRam,
    pairs: usize,
) -> Result<Vec<VhostNet>> {
    if host.tap().is_none() {
        // (validate_all refused vhost=on without a TAP.)
        log::info!(
            "{}: a user-mode network has no TAP for vhost-net; data path: userspace",
            cfg.label()
        );
        return Ok(Vec::new());
    }
    let open_all = || {
        (0..pairs)
            .map(|_| VhostNet::open(memory, cfg.vnet_hdr))
            .collect::<std::result::Result<Vec<_>, _>>()
    };
    if cfg.vhost == VhostMode::Auto && !cfg.limits.is_none() {
        // (validate_all refused vhost=on with limits.)
        log::info!(
            "{}: vhost=auto: rate limits hold frames back in rvm, which vhost-net cannot; data path: userspace",
            cfg.label()
        );
        return Ok(Vec::new());
    }
    Ok(match cfg.vhost {
        VhostMode::Off => Vec::new(),
        VhostMode::On => open_all().map_err(|source| Error::Vhost {
            nic: cfg.label(),
            source,
        })?,
        VhostMode::Auto => match open_all() {
            Ok(v) => v,
            Err(e) => {
                log::info!("{}: vhost=auto: {e}; data path: userspace", cfg.label());
                Vec::new()
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::stage::testing::DropFirstByte;
    use crate::net::stage::Direction;

    #[test]
    fn vhost_on_with_a_userspace_stage_fails_with_both_named() {
        let stages = Stages::new();
        check_stages_against_vhost("tap0", true, &stages).unwrap();
        stages
            .push(Box::new(DropFirstByte {
                dir: Direction::Tx,
                first: 0,
            }))
            .unwrap();
        check_stages_against_vhost("tap0", false, &stages).unwrap();
        let e = check_stages_against_vhost("tap0", true, &stages).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NIC tap0: vhost=on, but the drop-first-byte stage needs the frames in rvm; use vhost=auto (falls back to rvm's data path) or vhost=off"
        );
    }
}
