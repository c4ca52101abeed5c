//! cargo-fuzz target `user_server`: see `vfio_bench::fuzz::user_server`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::user_server(data));
