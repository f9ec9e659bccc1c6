//! The x86_64 boot contract: how guest memory is laid out, and what state a
//! 64-bit Linux kernel expects when rvm jumps to it with no firmware.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;
