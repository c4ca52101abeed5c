//! cargo-fuzz target `user_client`: see `vfio_bench::fuzz::user_client`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::user_client(data));
