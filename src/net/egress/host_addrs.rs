//! Every IP address of the host's interfaces (in rvm's network namespace):
//! the sandbox default refuses them all, whatever network they are on.

use std::net::IpAddr;

/// The addresses, each once; empty if the kernel cannot list them (then
/// the fixed ranges of the preset still hold; the failure is logged).
pub fn all() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated to `list`, which we
    // free below with freeifaddrs and do not use afterwards.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        log::warn!(
            "egress: cannot list the host's addresses: {}; the sandbox default refuses its fixed ranges only",
            std::io::Error::last_os_error()
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not
        // yet freed; its ifa_addr is null or points to a sockaddr whose
        // family says which sockaddr_* it is.
        let (next, addr) = unsafe {
            let ifa = &*cur;
            let addr = if ifa.ifa_addr.is_null() {
                None
            } else {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            };
            (ifa.ifa_next, addr)
        };
        if let Some(a) = addr {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        cur = next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    #[test]
    fn the_same_addresses_as_ip_addr_lists() {
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show"])
            .output()
            .expect("ip (iproute2) runs");
        let mut want: Vec<IpAddr> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|&x| x == "inet" || x == "inet6")?;
                w.next()?.split('/').next()?.parse().ok()
            })
            .collect();
        want.sort();
        want.dedup();
        let mut got = super::all();
        got.sort();
        assert!(!want.is_empty(), "ip lists no address at all");
        assert_eq!(got, want);
    }
}
