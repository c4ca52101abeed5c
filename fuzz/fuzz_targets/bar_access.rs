//! cargo-fuzz target `bar_access`: see `vfio_bench::fuzz::bar_access`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::bar_access(data));
