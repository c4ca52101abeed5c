//! cargo-fuzz target `msix`: see `vfio_bench::fuzz::msix`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_bench::fuzz::msix(data));
