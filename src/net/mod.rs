//! The host side of a NIC: the TAP (our own ioctls, because the `tun-tap`
//! crate cannot set IFF_VNET_HDR, the vnet header size, offloads or the
//! send buffer), bridge membership, ifup/ifdown scripts, and the NIC
//! options as the user writes them.

pub mod assembly;
pub mod backend;
pub mod bridge;
pub mod capture;
pub mod config;
pub mod counters;
pub mod csum;
pub mod egress;
pub mod host_nic;
pub mod nic_loop;
pub mod passt;
pub mod rate_limit;
pub mod script;
pub mod socket;
pub mod stage;
pub mod sys;
pub mod tap;
#[cfg(test)]
mod test_util;
pub mod vhost;

pub use config::{MacAddr, NetConfig, NicModel, Peer, VhostMode};
pub use counters::{NetCounters, NetStats, NicStats};
pub use host_nic::{HostNic, HostNicError};
pub use passt::HostFwd;
