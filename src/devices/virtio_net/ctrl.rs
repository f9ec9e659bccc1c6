//! The control queue: the driver's commands. RX mode and MAC filters are
//! acknowledged (a TAP delivers everything on the bridge's segment to rvm
//! anyway; filtering would not make the guest faster); with multiqueue,
//! VQ_PAIRS_SET sets the pairs in use ([`super::mq`]).

use vm_memory::{Bytes, GuestAddress};

use super::worker::{Worker, SIGNAL_CTRL};
use crate::net::counters::bump;
use crate::virtio::chain::MAX_IOV;
use crate::virtio::queue::{drain, Step};

const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_MQ: u8 = 4;
const MQ_VQ_PAIRS_SET: u8 = 0;
const OK: u8 = 0;
const ERR: u8 = 1;
/// The most of a command's readable bytes looked at: class, command and
/// the largest argument rvm reads (VQ_PAIRS_SET's le16).
const CMD_BYTES: usize = 4;

impl Worker {
    pub(super) fn process_ctrl(&mut self) {
        if !self.may_dma() {
            return;
        }
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        let stats = &self.stats;
        let mq = self.mq.as_ref().map(|(_, mq)| mq);
        let mut used = false;
        let mem = &self.mem;
        drain(mem, &mut ctrl.queue, &mut ctrl.used, |c, ret| {
            let head = c.head_index();
            // Readable part: class, command, data (the first CMD_BYTES of
            // it, across descriptors). Writable part: the ack. Only
            // buffers of at least a byte count, and a chain longer than
            // any command needs is refused without reading further.
            let mut cmd = [0u8; CMD_BYTES];
            let mut got = 0;
            let mut ack_at = None;
            let mut too_long = false;
            for (i, d) in c.enumerate() {
                if i >= MAX_IOV {
                    too_long = true;
                    break;
                }
                if d.len() == 0 {
                    continue;
                }
                if d.is_write_only() {
                    ack_at.get_or_insert(d.addr());
                } else if got < CMD_BYTES && ack_at.is_none() {
                    let n = (d.len() as usize).min(CMD_BYTES - got);
                    if mem.read_slice(&mut cmd[got..got + n], d.addr()).is_ok() {
                        got += n;
                    }
                }
            }
            if too_long {
                (got, ack_at) = (0, None);
            }
            let mut len = 0;
            match (got, ack_at) {
                (1.., Some(at)) => {
                    let ack = match (cmd[0], cmd[1], mq) {
                        (CLASS_RX | CLASS_MAC, _, _) => OK,
                        (CLASS_MQ, MQ_VQ_PAIRS_SET, Some(mq))
                            if got == CMD_BYTES
                                && mq.set_active(u16::from_le_bytes([cmd[2], cmd[3]])) =>
                        {
                            OK
                        }
                        _ => ERR,
                    };
                    if mem.write_obj(ack, GuestAddress(at.0)).is_ok() {
                        len = 1;
                    }
                }
                _ => bump(&stats.malformed, 1),
            }
            if !ret.put(head, len) {
                return Step::Done;
            }
            used = true;
            Step::Next
        });
        if used {
            self.signal(SIGNAL_CTRL);
        }
    }
}
