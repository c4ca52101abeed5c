//! Our vfio-user client against our vfio-user server, serving a small
//! memory-backed device written here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfio_backend::user::{ServerOptions, UserDevice, UserOptions, UserServer};
use vfio_backend::{
    device_flags, irq_flags, region_flags, DeviceInfo, DmaFile, DmaSource, DomainId, Error,
    IommuDomain, IrqInfo, Mapping, RegionCap, RegionInfo, Result, SparseArea, Vfio,
};

const BAR0_SIZE: usize = 0x4000;
/// Writing a vector number here makes the device signal that MSI-X vector.
const DOORBELL_IRQ: u64 = 0x3f00;
/// Writing an IOVA here makes the device DMA 16 bytes of BAR0 (offset 0) there.
const DOORBELL_DMA: u64 = 0x3f08;
/// Writing an IOVA here makes the device read 16 bytes there, through a
/// range mapped without a file, inside the write (what a device must not do).
const DOORBELL_REMOTE_READ: u64 = 0x3f10;
const BAR2_SIZE: u64 = 0x2000;

struct Dma {
    iova: u64,
    size: u64,
    host_addr: u64,
    read_only: bool,
}

/// A memory-backed device: BAR0 in memory with two doorbells, BAR2 in a
/// memfd the client may mmap (upper half only), 8 MSI-X vectors.
struct MemDevice {
    bar0: Mutex<Vec<u8>>,
    bar2: std::fs::File,
    msix: Mutex<Vec<Option<OwnedFd>>>,
    dma: Arc<MemDomain>,
    resets: Mutex<u32>,
    disabled: Mutex<Vec<u32>>,
}

/// The device's IOMMU domain: a table of what was mapped.
struct MemDomain {
    id: DomainId,
    table: Mutex<Vec<Dma>>,
    /// The last range mapped without a file, reached by asking the client.
    remote: Mutex<Option<Arc<dyn vfio_backend::RemoteDma>>>,
}

fn memfd(size: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// A memfd sealed against shrinking, as QEMU's `memory-backend-memfd`
/// makes guest RAM: the server may map it.
fn sealed_memfd(size: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"sealed".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // SAFETY: F_ADD_SEALS on a descriptor we own; no pointer involved.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0);
    f
}

impl MemDevice {
    fn new() -> Arc<MemDevice> {
        Arc::new(MemDevice {
            bar0: Mutex::new(vec![0; BAR0_SIZE]),
            // Sized for good, as our client requires of a region file it maps.
            bar2: sealed_memfd(BAR2_SIZE),
            msix: Mutex::new((0..8).map(|_| None).collect()),
            dma: Arc::new(MemDomain {
                id: DomainId::new_unique(),
                table: Mutex::new(Vec::new()),
                remote: Mutex::new(None),
            }),
            resets: Mutex::new(0),
            disabled: Mutex::new(Vec::new()),
        })
    }

    fn signal(&self, vector: usize) {
        let msix = self.msix.lock().unwrap();
        if let Some(Some(fd)) = msix.get(vector) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live 8-byte buffer to an eventfd we hold.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    fn dma_out(&self, iova: u64) -> Result<()> {
        let data: Vec<u8> = self.bar0.lock().unwrap()[..16].to_vec();
        let dma = self.dma.table.lock().unwrap();
        let d = dma
            .iter()
            .find(|d| iova >= d.iova && iova + 16 <= d.iova + d.size && !d.read_only)
            .ok_or_else(|| Error::InvalidArgument("DMA outside mappings".into()))?;
        if d.host_addr == 0 {
            // This device only does loads and stores.
            return Err(Error::Unsupported("DMA to memory not mapped here".into()));
        }
        let dst = (d.host_addr + (iova - d.iova)) as *mut u8;
        // SAFETY: dst lies inside a DMA range the server mapped for us and keeps mapped until dma_unmap, which needs the dma lock we hold; the bounds were checked just above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, 16) };
        Ok(())
    }
}

fn bad(what: &str) -> Error {
    Error::InvalidArgument(what.into())
}

impl Vfio for MemDevice {
    fn device_info(&self) -> Result<DeviceInfo> {
        Ok(DeviceInfo {
            flags: device_flags::PCI | device_flags::RESET,
            num_regions: 9,
            num_irqs: 5,
        })
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let rw = region_flags::READ | region_flags::WRITE;
        Ok(match index {
            0 => RegionInfo {
                index,
                flags: rw,
                size: BAR0_SIZE as u64,
                offset: 0,
                caps: vec![],
            },
            2 => RegionInfo {
                index,
                flags: rw | region_flags::MMAP,
                size: BAR2_SIZE,
                offset: 0,
                caps: vec![RegionCap::SparseMmap(vec![SparseArea {
                    offset: 0x1000,
                    size: 0x1000,
                }])],
            },
            1 | 3..=8 => RegionInfo {
                index,
                ..Default::default()
            },
            _ => return Err(bad("no such region")),
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        match index {
            0 => {
                let bar = self.bar0.lock().unwrap();
                let src = bar
                    .get(offset as usize..offset as usize + data.len())
                    .ok_or_else(|| bad("read past BAR0"))?;
                data.copy_from_slice(src);
                Ok(())
            }
            2 => self
                .bar2
                .read_exact_at(data, offset)
                .map_err(|e| Error::io("bar2", e)),
            _ => Err(bad("region not readable")),
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        match (index, offset) {
            (0, DOORBELL_IRQ) => {
                self.signal(data[0] as usize);
                Ok(())
            }
            (0, DOORBELL_DMA) => self.dma_out(u64::from_le_bytes(data.try_into().unwrap())),
            (0, DOORBELL_REMOTE_READ) => {
                let remote = self
                    .dma
                    .remote
                    .lock()
                    .unwrap()
                    .clone()
                    .ok_or_else(|| bad("no map"))?;
                let mut buf = [0u8; 16];
                remote.read(u64::from_le_bytes(data.try_into().unwrap()), &mut buf)
            }
            (0, _) => {
                let mut bar = self.bar0.lock().unwrap();
                let dst = bar
                    .get_mut(offset as usize..offset as usize + data.len())
                    .ok_or_else(|| bad("write past BAR0"))?;
                dst.copy_from_slice(data);
                Ok(())
            }
            (2, _) => self
                .bar2
                .write_all_at(data, offset)
                .map_err(|e| Error::io("bar2", e)),
            _ => Err(bad("region not writable")),
        }
    }

    fn mmap_region(&self, _index: u32, _area: SparseArea) -> Result<Mapping> {
        Err(Error::Unsupported("test device".into()))
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        match index {
            0 => Ok(IrqInfo {
                index,
                flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                count: 1,
            }),
            2 => Ok(IrqInfo {
                index,
                flags: irq_flags::EVENTFD | irq_flags::NORESIZE,
                count: 8,
            }),
            1 | 3 | 4 => Ok(IrqInfo {
                index,
                flags: 0,
                count: 0,
            }),
            _ => Err(bad("no such irq index")),
        }
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        if index != 2 {
            return Err(bad("only MSI-X"));
        }
        let mut msix = self.msix.lock().unwrap();
        if start as usize + fds.len() > msix.len() {
            return Err(bad("vector out of range"));
        }
        for (i, fd) in fds.iter().enumerate() {
            msix[start as usize + i] = fd.map(|f| f.try_clone_to_owned().unwrap());
        }
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.disabled.lock().unwrap().push(index);
        if index == 2 {
            self.msix.lock().unwrap().iter_mut().for_each(|v| *v = None);
        }
        Ok(())
    }

    fn unmask_irq(&self, _index: u32) -> Result<()> {
        Ok(())
    }

    fn mask_irq(&self, _index: u32) -> Result<()> {
        Ok(())
    }

    fn set_irq_unmask_eventfd(&self, _index: u32, _fd: Option<BorrowedFd<'_>>) -> Result<()> {
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        *self.resets.lock().unwrap() += 1;
        self.bar0.lock().unwrap().iter_mut().for_each(|b| *b = 0);
        Ok(())
    }

    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        self.dma.clone()
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        (index == 2).then(|| (self.bar2.as_fd(), 0))
    }
}

impl IommuDomain for MemDomain {
    fn id(&self) -> DomainId {
        self.id
    }

    /// # Safety
    /// As [`IommuDomain::map`]: the device stores at `host_addr`.
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        self.table.lock().unwrap().push(Dma {
            iova,
            size,
            host_addr: host.host_addr,
            read_only: host.read_only,
        });
        Ok(())
    }

    fn map_remote(
        &self,
        _iova: u64,
        _size: u64,
        _read_only: bool,
        remote: Arc<dyn vfio_backend::RemoteDma>,
    ) -> Result<()> {
        *self.remote.lock().unwrap() = Some(remote);
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        let mut dma = self.table.lock().unwrap();
        let before = dma.len();
        dma.retain(|d| !(d.iova == iova && d.size == size));
        if dma.len() == before {
            return Err(bad("no such mapping"));
        }
        Ok(())
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        Ok(vec![0..=u64::MAX])
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    device: Arc<MemDevice>,
    server: Option<UserServer>,
    client: UserDevice,
}

fn setup(options: ServerOptions) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.sock");
    let device = MemDevice::new();
    let server = UserServer::bind(&path, device.clone(), options).unwrap();
    let client = UserDevice::connect_with_options(
        &path,
        UserOptions::default().with_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    Setup {
        _dir: dir,
        device,
        server: Some(server),
        client,
    }
}

fn small_transfers() -> ServerOptions {
    ServerOptions::default()
        .with_max_data_xfer_size(4096)
        .with_max_msg_fds(2)
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn read_eventfd(fd: &OwnedFd) -> Option<u64> {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live 8-byte buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    (n == 8).then(|| u64::from_ne_bytes(b))
}

/// Maps through the client's domain.
fn map(client: &UserDevice, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
    // SAFETY: every host address the tests map is a mapping or buffer that
    // outlives the client (declared before the test's `Setup` drops, or
    // unmapped first), touched by the test through file I/O or after the
    // device's stores only.
    unsafe { client.iommu_domain().map(iova, size, host) }
}

#[test]
fn negotiation_reports_server_capabilities_and_device_info() {
    let s = setup(small_transfers());
    let caps = s.client.server_capabilities();
    assert_eq!(caps.max_data_xfer_size, 4096);
    assert_eq!(caps.max_msg_fds, 2);
    assert_eq!(s.client.protocol_version(), (0, 1));
    let info = s.client.device_info().unwrap();
    assert!(info.supports_reset() && info.is_pci());
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let msix = s.client.irq_info(2).unwrap();
    assert_eq!(
        (msix.count, msix.flags),
        (8, irq_flags::EVENTFD | irq_flags::NORESIZE)
    );
}

#[test]
fn transfers_larger_than_max_data_xfer_size_are_split_and_arrive_whole() {
    let s = setup(small_transfers());
    let data: Vec<u8> = (0..10000u32).map(|i| (i * 7 + 3) as u8).collect();
    s.client.region_write(0, 0x100, &data).unwrap();
    assert_eq!(
        &s.device.bar0.lock().unwrap()[0x100..0x100 + 10000],
        &data[..]
    );
    let mut back = vec![0u8; 10000];
    s.client.region_read(0, 0x100, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn device_errors_come_back_as_refused_with_their_errno() {
    let s = setup(ServerOptions::default());
    let mut b = [0u8; 4];
    // Region 20 is beyond what the device reports: the device refuses it.
    let e = s.client.region_read(20, 0, &mut b).unwrap_err();
    assert!(
        matches!(e, Error::Refused { errno, .. } if errno == libc::EINVAL),
        "{e:?}"
    );
    // An access past the end of a known region is refused locally.
    let e = s
        .client
        .region_read(0, BAR0_SIZE as u64 - 2, &mut b)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    // The connection is still fine.
    s.client.region_read(0, 0, &mut b).unwrap();
}

#[test]
fn sparse_mmap_region_is_shared_through_its_fd() {
    let s = setup(ServerOptions::default());
    let info = s.client.region_info(2).unwrap();
    assert!(info.mmappable());
    assert_eq!(
        info.sparse_areas().unwrap(),
        &[SparseArea {
            offset: 0x1000,
            size: 0x1000
        }]
    );
    assert!(s.client.region_mmap_fd(2).is_some());
    assert!(s.client.region_mmap_fd(0).is_none());
    // Only the sparse area may be mapped.
    let outside = s.client.mmap_region(
        2,
        SparseArea {
            offset: 0,
            size: 0x1000,
        },
    );
    match outside {
        Err(e @ Error::InvalidArgument(_)) => assert_eq!(e.errno(), Some(libc::EINVAL)),
        other => panic!("expected InvalidArgument, got {:?}", other.err()),
    }
    let m = s
        .client
        .mmap_region(
            2,
            SparseArea {
                offset: 0x1000,
                size: 0x1000,
            },
        )
        .unwrap();
    s.device.bar2.write_all_at(&[0xde, 0xad], 0x1010).unwrap();
    // SAFETY: the mapping is 0x1000 bytes long and alive.
    let seen = unsafe { [*m.as_ptr().add(0x10), *m.as_ptr().add(0x11)] };
    assert_eq!(seen, [0xde, 0xad]);
}

#[test]
fn eventfds_across_a_batch_boundary_reach_the_device_and_fire() {
    let s = setup(small_transfers());
    let efds: Vec<_> = (0..5).map(|_| eventfd()).collect();
    let fds: Vec<_> = efds.iter().map(|e| Some(e.as_fd())).collect();
    // Vectors 1..=5 with max_msg_fds 2: three messages.
    s.client.set_irq_eventfds(2, 1, &fds).unwrap();
    {
        let msix = s.device.msix.lock().unwrap();
        assert!(msix[0].is_none() && msix[6].is_none());
        assert!(msix[1..=5].iter().all(Option::is_some));
    }
    s.client.region_write(0, DOORBELL_IRQ, &[5]).unwrap();
    assert_eq!(read_eventfd(&efds[4]), Some(1));
    assert_eq!(read_eventfd(&efds[3]), None);
    // Detach vector 5 only.
    s.client.set_irq_eventfds(2, 5, &[None]).unwrap();
    assert!(s.device.msix.lock().unwrap()[5].is_none());
    assert!(s.device.msix.lock().unwrap()[4].is_some());
    s.client.disable_irqs(2).unwrap();
    assert!(s.device.msix.lock().unwrap().iter().all(Option::is_none));
}

#[test]
fn device_dma_into_a_sealed_memfd_mapping_is_seen_by_the_client() {
    let s = setup(ServerOptions::default());
    let guest = sealed_memfd(0x10000);
    let local = Mapping::map_fd(
        guest.as_fd(),
        0,
        0x10000,
        libc::PROT_READ | libc::PROT_WRITE,
    )
    .unwrap();
    map(
        &s.client,
        0x100000,
        0x8000,
        DmaSource {
            host_addr: local.as_ptr() as u64 + 0x4000,
            file: Some(DmaFile {
                fd: guest.as_fd(),
                offset: 0x4000,
            }),
            read_only: false,
        },
    )
    .unwrap();
    assert_eq!(s.device.dma.table.lock().unwrap().len(), 1);
    let pattern: Vec<u8> = (0..16u8).map(|i| i ^ 0x5a).collect();
    s.client.region_write(0, 0, &pattern).unwrap();
    s.client
        .region_write(0, DOORBELL_DMA, &0x100040u64.to_le_bytes())
        .unwrap();
    let mut seen = [0u8; 16];
    guest.read_exact_at(&mut seen, 0x4040).unwrap();
    assert_eq!(&seen[..], &pattern[..]);
    s.client.iommu_domain().unmap(0x100000, 0x8000).unwrap();
    assert!(s.device.dma.table.lock().unwrap().is_empty());
    // Unmapping again is refused by the server.
    assert!(matches!(
        s.client.iommu_domain().unmap(0x100000, 0x8000),
        Err(Error::Refused { .. })
    ));
}

#[test]
fn dma_map_maps_only_files_sealed_against_shrinking_into_the_server() {
    let s = setup(ServerOptions::default());
    fn src(f: &std::fs::File) -> DmaSource<'_> {
        DmaSource {
            host_addr: 0,
            file: Some(DmaFile {
                fd: f.as_fd(),
                offset: 0,
            }),
            read_only: false,
        }
    }
    let plain = memfd(0x1000);
    let sealed = sealed_memfd(0x1000);
    map(&s.client, 0x1000, 0x1000, src(&plain)).unwrap();
    map(&s.client, 0x2000, 0x1000, src(&sealed)).unwrap();
    let dma = s.device.dma.table.lock().unwrap();
    let host = |iova| dma.iter().find(|d| d.iova == iova).unwrap().host_addr;
    // A file the client could shrink is not mapped: the device must use
    // file I/O, which cannot raise SIGBUS.
    assert_eq!(host(0x1000), 0);
    assert_ne!(host(0x2000), 0);
}

#[test]
fn dma_map_of_a_file_shorter_than_offset_plus_size_is_refused_with_einval() {
    let s = setup(ServerOptions::default());
    for (file_len, offset, size) in [
        (0x1000, 0, 0x2000),
        (0x2000, 0x1000, 0x2000),
        (0, 0, 0x1000),
    ] {
        let guest = memfd(file_len);
        let r = map(
            &s.client,
            0x10000,
            size,
            DmaSource {
                host_addr: 0,
                file: Some(DmaFile {
                    fd: guest.as_fd(),
                    offset,
                }),
                read_only: true,
            },
        );
        assert!(
            matches!(
                r,
                Err(Error::Refused {
                    errno: libc::EINVAL,
                    ..
                })
            ),
            "file {file_len:#x}, {size:#x} at {offset:#x}: {r:?}"
        );
    }
    // offset + size wraps.
    let guest = memfd(0x1000);
    let r = map(
        &s.client,
        0x10000,
        0x1000,
        DmaSource {
            host_addr: 0,
            file: Some(DmaFile {
                fd: guest.as_fd(),
                offset: u64::MAX - 0xfff,
            }),
            read_only: true,
        },
    );
    assert!(
        matches!(
            r,
            Err(Error::Refused {
                errno: libc::EINVAL,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(s.device.dma.table.lock().unwrap().is_empty());
}

#[test]
fn dma_map_of_a_file_that_is_not_a_regular_file_is_refused_with_einval() {
    let s = setup(ServerOptions::default());
    // mmap takes /dev/zero, but it is no client memory.
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/zero")
        .unwrap();
    let res = map(
        &s.client,
        0x10000,
        0x1000,
        DmaSource {
            host_addr: 0,
            file: Some(DmaFile {
                fd: r.as_fd(),
                offset: 0,
            }),
            read_only: true,
        },
    );
    assert!(
        matches!(
            res,
            Err(Error::Refused {
                errno: libc::EINVAL,
                ..
            })
        ),
        "{res:?}"
    );
    assert!(s.device.dma.table.lock().unwrap().is_empty());
}

#[test]
fn a_device_asking_the_client_for_dma_inside_a_command_handler_fails_at_once() {
    // The client could only answer after the handler returned; waiting for
    // the DMA timeout would stall every request behind it.
    // Declared before the client, so it outlives the mapping.
    let guest = vec![0u8; 0x1000];
    let s = setup(ServerOptions::default().with_dma_timeout(Duration::from_secs(5)));
    map(
        &s.client,
        0x10000,
        0x1000,
        DmaSource {
            host_addr: guest.as_ptr() as u64,
            file: None,
            read_only: true,
        },
    )
    .unwrap();
    let t = Instant::now();
    let r = s
        .client
        .region_write(0, DOORBELL_REMOTE_READ, &0x10000u64.to_le_bytes());
    assert!(
        matches!(
            r,
            Err(Error::Refused {
                errno: libc::ENOTSUP,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn dma_map_over_an_existing_mapping_is_refused() {
    let s = setup(ServerOptions::default());
    let guest = memfd(0x2000);
    let src = |off| DmaSource {
        host_addr: 0,
        file: Some(DmaFile {
            fd: guest.as_fd(),
            offset: off,
        }),
        read_only: true,
    };
    map(&s.client, 0x1000, 0x1000, src(0)).unwrap();
    // The kernel's type1 IOMMU refuses an overlapping map with EEXIST; the vfio-user client
    // checks it before sending, as an invalid argument (EINVAL).
    match map(&s.client, 0x1000, 0x1000, src(0x1000)) {
        Err(e @ Error::InvalidArgument(_)) => assert_eq!(e.errno(), Some(libc::EINVAL)),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(s.device.dma.table.lock().unwrap().len(), 1);
}

#[test]
fn reset_reaches_the_device() {
    let s = setup(ServerOptions::default());
    s.client.region_write(0, 0, &[1, 2, 3, 4]).unwrap();
    s.client.reset().unwrap();
    assert_eq!(*s.device.resets.lock().unwrap(), 1);
    let mut b = [0xffu8; 4];
    s.client.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
}

#[test]
fn concurrent_calls_from_many_threads_each_get_their_own_reply() {
    let s = setup(ServerOptions::default());
    let client = Arc::new(s.client);
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let c = client.clone();
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let v = (t << 16 | i).to_le_bytes();
                    let off = u64::from(t) * 64;
                    c.region_write(0, off, &v).unwrap();
                    let mut back = [0u8; 4];
                    c.region_read(0, off, &mut back).unwrap();
                    assert_eq!(back, v);
                    if i % 25 == 0 {
                        assert_eq!(c.irq_info(2).unwrap().count, 8);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn disconnecting_client_has_its_dma_and_interrupts_released() {
    let s = setup(ServerOptions::default());
    let guest = memfd(0x1000);
    map(
        &s.client,
        0,
        0x1000,
        DmaSource {
            host_addr: 0,
            file: Some(DmaFile {
                fd: guest.as_fd(),
                offset: 0,
            }),
            read_only: false,
        },
    )
    .unwrap();
    let e = eventfd();
    s.client.set_irq_eventfds(2, 0, &[Some(e.as_fd())]).unwrap();
    let Setup {
        _dir: dir,
        device,
        server,
        client,
    } = s;
    drop(client);
    // The server cleans up on its own thread once it sees the hang-up: DMA first,
    // then interrupts. Wait (within a bound) for all of it.
    let released = || {
        device.dma.table.lock().unwrap().is_empty()
            && device.disabled.lock().unwrap().contains(&2)
            && device.msix.lock().unwrap().iter().all(Option::is_none)
    };
    let t0 = Instant::now();
    while !released() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(device.dma.table.lock().unwrap().is_empty());
    assert!(device.disabled.lock().unwrap().contains(&2));
    assert!(device.msix.lock().unwrap().iter().all(Option::is_none));
    // The server serves the next client.
    let again = UserDevice::connect(dir.path().join("dev.sock")).unwrap();
    assert_eq!(again.irq_info(2).unwrap().count, 8);
    drop(again);
    server.unwrap().shutdown();
    assert!(!dir.path().join("dev.sock").exists(), "socket removed");
}

#[test]
fn bound_socket_is_accessible_to_its_owner_only() {
    let s = setup(ServerOptions::default());
    let mode = std::fs::metadata(s._dir.path().join("dev.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn server_refuses_commands_before_version_and_survives_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.sock");
    let device = MemDevice::new();
    let _server = UserServer::bind(&path, device.clone(), ServerOptions::default()).unwrap();
    {
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // REGION_READ (9) before VERSION: an error reply, with EINVAL.
        let mut m = Vec::new();
        m.extend_from_slice(&7u16.to_le_bytes());
        m.extend_from_slice(&9u16.to_le_bytes());
        m.extend_from_slice(&32u32.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&[0u8; 16]);
        raw.write_all(&m).unwrap();
        let mut r = [0u8; 16];
        std::io::Read::read_exact(&mut raw, &mut r).unwrap();
        assert_eq!(u16::from_le_bytes([r[0], r[1]]), 7);
        let flags = u32::from_le_bytes(r[8..12].try_into().unwrap());
        assert_eq!(flags & 0xf, 1, "a reply");
        assert_ne!(flags & (1 << 5), 0, "with the error bit");
        assert_eq!(
            u32::from_le_bytes(r[12..16].try_into().unwrap()),
            libc::EINVAL as u32
        );
        // A header claiming 4 GiB: the server drops the connection.
        let mut m = Vec::new();
        m.extend_from_slice(&8u16.to_le_bytes());
        m.extend_from_slice(&9u16.to_le_bytes());
        m.extend_from_slice(&u32::MAX.to_le_bytes());
        m.extend_from_slice(&[0u8; 8]);
        raw.write_all(&m).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut raw, &mut b).unwrap(), 0);
    }
    // And the next client is served normally.
    let client = UserDevice::connect(&path).unwrap();
    assert_eq!(client.device_info().unwrap().num_regions, 9);
}

#[test]
fn each_vfio_user_connection_is_an_iommu_domain_of_its_own_that_dies_with_it() {
    let a = setup(ServerOptions::default());
    let b = setup(ServerOptions::default());
    // One device per connection: the connection is its domain.
    assert_eq!(a.client.iommu_domain().id(), a.client.iommu_domain().id());
    assert_ne!(a.client.iommu_domain().id(), b.client.iommu_domain().id());
    assert_eq!(
        a.client.iommu_domain().iova_ranges().unwrap(),
        vec![0..=u64::MAX]
    );
    let guest = memfd(0x1000);
    let src = DmaSource {
        host_addr: 0,
        file: Some(DmaFile {
            fd: guest.as_fd(),
            offset: 0,
        }),
        read_only: false,
    };
    map(&a.client, 0x1000, 0x1000, src).unwrap();
    assert_eq!(a.device.dma.table.lock().unwrap().len(), 1);
    assert!(b.device.dma.table.lock().unwrap().is_empty());
    // A domain kept past its connection fails instead of reaching a server.
    let domain = a.client.iommu_domain();
    drop(a.client);
    assert!(matches!(
        domain.unmap(0x1000, 0x1000),
        Err(Error::Disconnected(_))
    ));
}
