//! A vfio-user server that shares, for a BAR, a file it can still shrink:
//! the VMM side (our client under `vfio-pci`) does not map it into the
//! guest but traps the range, and the guest's accesses reach the device
//! through REGION_READ / REGION_WRITE messages. Had it been mapped, the
//! server truncating the file would kill the next access with SIGBUS (or,
//! through a KVM memory slot, fail `KVM_RUN` with `EFAULT`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use vfio_backend::user::UserOptions;
use vfio_backend::{DeviceInfo, IrqInfo, Mapping, RegionInfo, Result, SparseArea, Vfio};
use vfio_bench::guest::enable_device;
use vfio_bench::user::serve_pair;
use vfio_bench::vmm::Vm;
use vfio_fake_device::{nvme_like, FakeDevice};

/// The nvme-like's data page in BAR 0: mmap-able, outside its registers.
const DATA: u64 = 0x2000;

/// The fake, except that BAR 0 is shared through `file`.
struct SharesFile {
    inner: Arc<FakeDevice>,
    file: File,
}

impl Vfio for SharesFile {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.inner.device_info()
    }
    fn region_info(&self, i: u32) -> Result<RegionInfo> {
        self.inner.region_info(i)
    }
    fn region_read(&self, i: u32, o: u64, d: &mut [u8]) -> Result<()> {
        self.inner.region_read(i, o, d)
    }
    fn region_write(&self, i: u32, o: u64, d: &[u8]) -> Result<()> {
        self.inner.region_write(i, o, d)
    }
    fn mmap_region(&self, i: u32, a: SparseArea) -> Result<Mapping> {
        self.inner.mmap_region(i, a)
    }
    fn irq_info(&self, i: u32) -> Result<IrqInfo> {
        self.inner.irq_info(i)
    }
    fn set_irq_eventfds(&self, i: u32, s: u32, f: &[Option<BorrowedFd<'_>>]) -> Result<()> {
        self.inner.set_irq_eventfds(i, s, f)
    }
    fn disable_irqs(&self, i: u32) -> Result<()> {
        self.inner.disable_irqs(i)
    }
    fn unmask_irq(&self, i: u32) -> Result<()> {
        self.inner.unmask_irq(i)
    }
    fn mask_irq(&self, i: u32) -> Result<()> {
        self.inner.mask_irq(i)
    }
    fn set_irq_unmask_eventfd(&self, i: u32, f: Option<BorrowedFd<'_>>) -> Result<()> {
        self.inner.set_irq_unmask_eventfd(i, f)
    }
    fn reset(&self) -> Result<()> {
        self.inner.reset()
    }
    fn iommu_domain(&self) -> std::sync::Arc<dyn vfio_backend::IommuDomain> {
        self.inner.iommu_domain()
    }
    fn region_mmap_fd(&self, i: u32) -> Option<(BorrowedFd<'_>, u64)> {
        (i == 0).then(|| (self.file.as_fd(), 0))
    }

    fn migration_flags(&self) -> Result<Option<vfio_backend::MigrationFlags>> {
        self.inner.migration_flags()
    }

    fn mig_state(&self) -> Result<vfio_backend::MigState> {
        self.inner.mig_state()
    }

    fn set_mig_state(
        &self,
        state: vfio_backend::MigState,
    ) -> Result<Option<Box<dyn vfio_backend::MigrationStream>>> {
        self.inner.set_mig_state(state)
    }

    fn mig_data_size(&self) -> Result<u64> {
        self.inner.mig_data_size()
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[vfio_backend::DirtyRange]) -> Result<()> {
        self.inner.dma_logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> Result<()> {
        self.inner.dma_logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        self.inner
            .dma_logging_report(iova, length, page_size, bitmap)
    }
}

/// A memfd of `size` bytes that its owner may still resize (no seals).
fn unsealed_memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

#[test]
fn a_bar_whose_file_the_server_may_shrink_is_trapped_not_mapped_and_still_works() {
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let file = unsealed_memfd(nvme_like::BAR0_SIZE);
    let server_side = file.try_clone().unwrap();
    let dev = Arc::new(SharesFile {
        inner: fake.clone(),
        file,
    });
    let served = serve_pair(
        dev,
        UserOptions::default().with_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let vm = Vm::new().unwrap();
    let pci = vm.attach(served.client.clone()).unwrap();
    enable_device(&pci).unwrap();
    let bar0 = pci
        .bars()
        .into_iter()
        .find(|b| b.index == vfio_pci::BarIndex::Bar(0))
        .unwrap();
    assert!(
        bar0.mapped.is_empty(),
        "a file the server may shrink was mapped into the guest: {:x?}",
        bar0.mapped
    );
    assert!(vm.mapper.live().is_empty(), "{:x?}", vm.mapper.live());
    // The hostile part: the server shrinks the file.
    server_side.set_len(0).unwrap();
    // The data page traps and reaches the device's memory both ways.
    fake.region_write(0, DATA, &0xfeed_f00du32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    pci.read_bar(vfio_pci::BarIndex::Bar(0), DATA, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xfeed_f00d);
    pci.write_bar(
        vfio_pci::BarIndex::Bar(0),
        DATA + 4,
        &0x0bad_cafeu32.to_le_bytes(),
    )
    .unwrap();
    fake.region_read(0, DATA + 4, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x0bad_cafe);
}
