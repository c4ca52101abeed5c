//! cargo-fuzz target `backend_parsers`: see `vfio_bench::fuzz::backend_parsers`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::backend_parsers(data));
