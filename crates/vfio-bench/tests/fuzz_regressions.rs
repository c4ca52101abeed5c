//! The fuzz corpora, replayed: every committed seed and every input that
//! once crashed a fuzz target runs through the target's body here, so that
//! `cargo test` keeps them fixed without cargo-fuzz. Plus the regression
//! tests written for what the fuzzers found.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vfio_backend::user::UserOptions;
use vfio_backend::Vfio;
use vfio_bench::fuzz::{seeds, TARGETS};
use vfio_bench::guest::*;
use vfio_bench::malformed::PatchedDevice;
use vfio_bench::user::{memfd, serve_pair};
use vfio_bench::vmm::Vm;
use vfio_fake_device::{nvme_like, FakeDevice};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_committed_seed_and_crash_input_runs_clean_through_its_target() {
    let mut ran = 0;
    for (target, body) in TARGETS {
        for (path, data) in inputs(target) {
            eprintln!("{target}: {}", path.display());
            body(&data);
            ran += 1;
        }
    }
    assert!(ran >= TARGETS.len(), "the seed corpora are missing");
}

#[test]
fn the_generated_seeds_run_clean_through_their_targets() {
    for (target, name, data) in seeds() {
        let (_, body) = TARGETS.iter().find(|t| t.0 == target).unwrap();
        eprintln!("{target}/{name}: {} bytes", data.len());
        assert!(!data.is_empty(), "{target}/{name} is empty");
        body(&data);
    }
}

/// Regenerates `fuzz/corpus/` from [`seeds`]:
/// `cargo test -p vfio-bench --test fuzz_regressions -- --ignored write_seed_corpora`.
#[test]
#[ignore]
fn write_seed_corpora() {
    for (target, name, data) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// A server that shares, for BAR 0, a file smaller than the region it
/// describes.
struct ShortFile {
    inner: PatchedDevice,
    file: std::fs::File,
}

impl Vfio for ShortFile {
    fn device_info(&self) -> vfio_backend::Result<vfio_backend::DeviceInfo> {
        self.inner.device_info()
    }
    fn region_info(&self, i: u32) -> vfio_backend::Result<vfio_backend::RegionInfo> {
        self.inner.region_info(i)
    }
    fn region_read(&self, i: u32, o: u64, d: &mut [u8]) -> vfio_backend::Result<()> {
        self.inner.region_read(i, o, d)
    }
    fn region_write(&self, i: u32, o: u64, d: &[u8]) -> vfio_backend::Result<()> {
        self.inner.region_write(i, o, d)
    }
    fn mmap_region(
        &self,
        i: u32,
        a: vfio_backend::SparseArea,
    ) -> vfio_backend::Result<vfio_backend::Mapping> {
        self.inner.mmap_region(i, a)
    }
    fn irq_info(&self, i: u32) -> vfio_backend::Result<vfio_backend::IrqInfo> {
        self.inner.irq_info(i)
    }
    fn set_irq_eventfds(
        &self,
        i: u32,
        s: u32,
        f: &[Option<BorrowedFd<'_>>],
    ) -> vfio_backend::Result<()> {
        self.inner.set_irq_eventfds(i, s, f)
    }
    fn disable_irqs(&self, i: u32) -> vfio_backend::Result<()> {
        self.inner.disable_irqs(i)
    }
    fn unmask_irq(&self, i: u32) -> vfio_backend::Result<()> {
        self.inner.unmask_irq(i)
    }
    fn mask_irq(&self, i: u32) -> vfio_backend::Result<()> {
        self.inner.mask_irq(i)
    }
    fn set_irq_unmask_eventfd(
        &self,
        i: u32,
        f: Option<BorrowedFd<'_>>,
    ) -> vfio_backend::Result<()> {
        self.inner.set_irq_unmask_eventfd(i, f)
    }
    fn reset(&self) -> vfio_backend::Result<()> {
        self.inner.reset()
    }
    fn iommu_domain(&self) -> Arc<dyn vfio_backend::IommuDomain> {
        self.inner.iommu_domain()
    }
    fn region_mmap_fd(&self, i: u32) -> Option<(BorrowedFd<'_>, u64)> {
        (i == 0).then(|| (self.file.as_fd(), 0))
    }

    fn migration_flags(&self) -> vfio_backend::Result<Option<vfio_backend::MigrationFlags>> {
        self.inner.migration_flags()
    }

    fn mig_state(&self) -> vfio_backend::Result<vfio_backend::MigState> {
        self.inner.mig_state()
    }

    fn set_mig_state(
        &self,
        state: vfio_backend::MigState,
    ) -> vfio_backend::Result<Option<Box<dyn vfio_backend::MigrationStream>>> {
        self.inner.set_mig_state(state)
    }

    fn mig_data_size(&self) -> vfio_backend::Result<u64> {
        self.inner.mig_data_size()
    }

    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[vfio_backend::DirtyRange],
    ) -> vfio_backend::Result<()> {
        self.inner.dma_logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> vfio_backend::Result<()> {
        self.inner.dma_logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> vfio_backend::Result<()> {
        self.inner
            .dma_logging_report(iova, length, page_size, bitmap)
    }
}

#[test]
fn a_vfio_user_server_sharing_a_file_smaller_than_its_region_cannot_crash_the_vmm() {
    // nvme-like BAR 0 is 16 KiB with an mmap-able page at 0x2000; the
    // server shares a 4 KiB file for it. Touching a mapping past the end
    // of its file raises SIGBUS, which would kill this test process.
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let dev = Arc::new(ShortFile {
        inner: PatchedDevice::new(fake.clone()),
        file: memfd(c"short", 0x1000).unwrap(),
    });
    let served = serve_pair(
        dev,
        UserOptions::default().with_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let vm = Vm::new().unwrap();
    let pci = vm.attach(served.client.clone()).unwrap();
    enable_device(&pci).unwrap();
    // The page at 0x2000 is not mapped into the guest: it traps, and reads
    // the device's memory through the server.
    let bar0 = pci
        .bars()
        .into_iter()
        .find(|b| b.index == vfio_pci::BarIndex::Bar(0))
        .unwrap();
    let base = bar0.base.unwrap();
    assert!(
        bar0.mapped
            .iter()
            .all(|&(gpa, len)| !(gpa..gpa + len).contains(&(base + 0x2000))),
        "a mapping past the end of the server's file reached the guest: {:x?}",
        bar0.mapped
    );
    fake.region_write(0, 0x2000, &0xfeed_f00du32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    pci.read_bar(vfio_pci::BarIndex::Bar(0), 0x2000, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xfeed_f00d);
    let _ = nvme_like::BAR0_SIZE;
}
