//! Whatever a checkpoint accepts, a restore restores: jobs with thousands of fds and hundreds of thousands of
//! memory mappings.

use vos_tests::*;

#[test]
fn seven_thousand_fds_come_back() {
    let w = Work::new("manyfds");
    let prog = gcc("manyfds");
    twice("manyfds", &[prog.to_str().unwrap(), "7000", "120"], 120, &w);
}

/// The kernel's limit on mappings per process, raised for the test and put back.
struct MapCount(String);

impl MapCount {
    fn raise(to: u64) -> MapCount {
        let old = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap();
        if old.trim().parse::<u64>().unwrap() < to {
            std::fs::write("/proc/sys/vm/max_map_count", to.to_string()).unwrap();
        }
        MapCount(old)
    }
}

impl Drop for MapCount {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/max_map_count", self.0.trim());
    }
}

#[test]
fn a_hundred_thousand_mappings_come_back() {
    let _limit = MapCount::raise(300_000);
    let w = Work::new("manymaps");
    let prog = gcc("manymaps");
    twice("manymaps", &[prog.to_str().unwrap(), "100000", "80"], 80, &w);
}
