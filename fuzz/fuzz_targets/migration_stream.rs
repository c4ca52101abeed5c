//! cargo-fuzz target `migration_stream`: see `vfio_bench::fuzz::migration_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::migration_stream(data));
