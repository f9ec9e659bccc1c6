//! The control queue: the driver's commands (RX mode, MAC filters) are
//! read and acknowledged. A TAP delivers everything on the bridge's
//! segment to rvm anyway; filtering would not make the guest faster.

use vm_memory::{Bytes, GuestAddress};

use super::worker::{Worker, SIGNAL_CTRL};
use crate::net::counters::bump;
use crate::virtio::chain::MAX_IOV;
use crate::virtio::queue::{drain, pop, put_used, Step};

const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const OK: u8 = 0;
const ERR: u8 = 1;

impl Worker {
    pub(super) fn process_ctrl(&mut self) {
        if !self.may_dma() {
            return;
        }
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        let stats = &self.stats;
        let mut used = false;
        drain(&self.mem, &mut ctrl.queue, |q, mem| {
            let Some(c) = pop(q, mem) else {
                return Step::Done;
            };
            let head = c.head_index();
            // Readable part: class, command, data. Writable part: the ack.
            // Only buffers of at least a byte count, and a chain longer
            // than any command needs is refused without reading further.
            let mut class = None;
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
                } else if class.is_none() {
                    class = mem.read_obj::<u8>(d.addr()).ok();
                }
            }
            if too_long {
                (class, ack_at) = (None, None);
            }
            let mut len = 0;
            match (class, ack_at) {
                (Some(class), Some(at)) => {
                    let ack = if matches!(class, CLASS_RX | CLASS_MAC) {
                        OK
                    } else {
                        ERR
                    };
                    if mem.write_obj(ack, GuestAddress(at.0)).is_ok() {
                        len = 1;
                    }
                }
                _ => bump(&stats.malformed, 1),
            }
            if !put_used(q, mem, head, len) {
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
