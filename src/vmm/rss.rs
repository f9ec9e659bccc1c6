//! rvm's own memory overhead: peak RSS minus the guest RAM that was touched.

/// Peak resident set (VmHWM) of this process in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident KiB of the mappings that start at the given host addresses, from
/// /proc/self/smaps.
pub fn resident_kib_of(ranges: &[(usize, usize)]) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    sum_rss(&smaps, ranges)
}

fn sum_rss(smaps: &str, ranges: &[(usize, usize)]) -> u64 {
    let mut total = 0;
    let mut in_range = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        }) {
            in_range = ranges.iter().any(|&(s, len)| start >= s && end <= s + len);
        } else if in_range {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_only_guest_mappings() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 512 kB
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Rss:                 100 kB
";
        assert_eq!(sum_rss(smaps, &[(0x7f00_0000_0000, 0x10_0000)]), 512);
        assert_eq!(sum_rss(smaps, &[(0x7f00_0000_0000, 0x20_0000)]), 612);
        assert_eq!(sum_rss(smaps, &[]), 0);
        assert!(peak_rss_kib().unwrap() > 0);
    }
}
