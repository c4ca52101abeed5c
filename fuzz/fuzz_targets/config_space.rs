//! cargo-fuzz target `config_space`: see `vfio_bench::fuzz::config_space`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::config_space(data));
