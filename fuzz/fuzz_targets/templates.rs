//! cargo-fuzz target `templates`: see `vfio_bench::fuzz::templates`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::templates(data));
