//! Our vfio-user client against a server we did not write: the `vfio_user`
//! crate's `Server`, with a backend implemented here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_backend::user::{UserDevice, UserOptions};
use vfio_backend::{region_flags, DmaFile, DmaSource, Error, SparseArea, Vfio};
use vfio_bindings::bindings::vfio::{vfio_region_info, vfio_region_sparse_mmap_area};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

#[derive(Default)]
struct Seen {
    set_irqs: Vec<(u32, u32, u32, u32, usize)>,
    dma_maps: Vec<(u32, u64, u64, u64, bool)>,
    dma_unmaps: Vec<(u64, u64)>,
    resets: u32,
}

struct Backend {
    bar0: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
}

fn io_err() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        if region != 0 {
            return Err(io_err());
        }
        let src = self
            .bar0
            .get(offset as usize..offset as usize + data.len())
            .ok_or_else(io_err)?;
        data.copy_from_slice(src);
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if region != 0 {
            return Err(io_err());
        }
        let dst = self
            .bar0
            .get_mut(offset as usize..offset as usize + data.len())
            .ok_or_else(io_err)?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let has_fd = fd.is_some();
        if let Some(f) = fd {
            // The "device" writes into the client's memory through the fd.
            f.write_all_at(b"written by vfio_user", offset + 8)?;
        }
        self.seen
            .lock()
            .unwrap()
            .dma_maps
            .push((flags.bits(), offset, address, size, has_fd));
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        self.seen.lock().unwrap().dma_unmaps.push((address, size));
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.seen.lock().unwrap().resets += 1;
        self.bar0.iter_mut().for_each(|b| *b = 0);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        // Signal every eventfd as soon as it is wired.
        for f in &fds {
            use std::io::Write;
            let mut w: &File = f;
            w.write_all(&1u64.to_ne_bytes())?;
        }
        self.seen
            .lock()
            .unwrap()
            .set_irqs
            .push((index, flags, start, count, fds.len()));
        Ok(())
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // Sized for good, as our client requires of a file it maps.
    // SAFETY: F_ADD_SEALS on a descriptor we own; it changes no memory.
    let rc = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    f
}

fn region(index: u32, flags: u32, size: u64) -> vfio_region_info {
    vfio_region_info {
        argsz: 32,
        flags,
        index,
        cap_offset: 0,
        size,
        offset: 0,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    _bar1: File,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
    client: Option<UserDevice>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.client.take());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crate.sock");
    let bar1 = memfd(0x2000);
    let rw = region_flags::READ | region_flags::WRITE;
    let regions = vec![
        ServerRegion {
            region_info: region(0, rw, 0x1000),
            sparse_areas: vec![],
            mmap_fd: None,
        },
        ServerRegion {
            region_info: region(1, rw | region_flags::MMAP, 0x2000),
            sparse_areas: vec![vfio_user::SparseArea {
                area: vfio_region_sparse_mmap_area {
                    offset: 0x1000,
                    size: 0x1000,
                },
            }],
            mmap_fd: Some(bar1.as_raw_fd()),
        },
        ServerRegion {
            region_info: region(2, 0, 0),
            sparse_areas: vec![],
            mmap_fd: None,
        },
    ];
    let irqs = vec![
        IrqInfo {
            index: 0,
            flags: 0b111,
            count: 1,
        },
        IrqInfo {
            index: 1,
            flags: 1,
            count: 0,
        },
        IrqInfo {
            index: 2,
            flags: 1,
            count: 4,
        },
    ];
    let server = Server::new(&path, true, irqs, regions).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut backend = Backend {
        bar0: vec![0; 0x1000],
        seen: seen.clone(),
    };
    let thread = std::thread::spawn(move || {
        let _ = server.run(&mut backend);
    });
    let client = UserDevice::connect_with_options(
        &path,
        UserOptions::default().with_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    Setup {
        _dir: dir,
        _bar1: bar1,
        seen,
        thread: Some(thread),
        client: Some(client),
    }
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

#[test]
fn version_negotiation_with_the_vfio_user_crate_server_uses_its_defaults() {
    let s = setup();
    let c = s.client.as_ref().unwrap();
    // That server answers version 0.0 with its default capabilities.
    assert_eq!(c.protocol_version(), (0, 0));
    let caps = c.server_capabilities();
    assert_eq!(caps.max_msg_fds, 1);
    assert_eq!(caps.max_data_xfer_size, 1 << 20);
    let info = c.device_info().unwrap();
    assert!(info.is_pci() && info.supports_reset());
    assert_eq!((info.num_regions, info.num_irqs), (3, 3));
    let irq = c.irq_info(2).unwrap();
    assert_eq!((irq.index, irq.count), (2, 4));
}

#[test]
fn region_read_write_and_reset_against_the_vfio_user_crate_server() {
    let s = setup();
    let c = s.client.as_ref().unwrap();
    c.region_write(0, 0x10, &[9, 8, 7, 6, 5]).unwrap();
    let mut b = [0u8; 5];
    c.region_read(0, 0x10, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7, 6, 5]);
    c.reset().unwrap();
    assert_eq!(s.seen.lock().unwrap().resets, 1);
    c.region_read(0, 0x10, &mut b).unwrap();
    assert_eq!(b, [0; 5]);
}

#[test]
fn sparse_region_fd_from_the_vfio_user_crate_server_can_be_mmapped() {
    let s = setup();
    let c = s.client.as_ref().unwrap();
    let info = c.region_info(1).unwrap();
    assert_eq!(
        info.sparse_areas().unwrap(),
        &[SparseArea {
            offset: 0x1000,
            size: 0x1000
        }]
    );
    let m = c
        .mmap_region(
            1,
            SparseArea {
                offset: 0x1000,
                size: 0x1000,
            },
        )
        .unwrap();
    s._bar1.write_all_at(&[0x77], 0x1004).unwrap();
    // SAFETY: the mapping is 0x1000 bytes long and alive.
    assert_eq!(unsafe { *m.as_ptr().add(4) }, 0x77);
}

#[test]
fn dma_map_with_a_memfd_lets_the_vfio_user_crate_backend_write_client_memory() {
    let s = setup();
    let c = s.client.as_ref().unwrap();
    let guest = memfd(0x4000);
    // SAFETY: no host address; the memfd is the test's, for the server
    // to read and write.
    unsafe {
        c.iommu_domain().map(
            0x8000_0000,
            0x2000,
            DmaSource {
                host_addr: 0,
                file: Some(DmaFile {
                    fd: guest.as_fd(),
                    offset: 0x2000,
                }),
                read_only: false,
            },
        )
    }
    .unwrap();
    let mut b = [0u8; 20];
    guest.read_exact_at(&mut b, 0x2008).unwrap();
    assert_eq!(&b, b"written by vfio_user");
    c.iommu_domain().unmap(0x8000_0000, 0x2000).unwrap();
    let seen = s.seen.lock().unwrap();
    // READ | WRITE, the file offset, the address and size, with an fd.
    assert_eq!(
        seen.dma_maps,
        vec![(0b11, 0x2000, 0x8000_0000, 0x2000, true)]
    );
    assert_eq!(seen.dma_unmaps, vec![(0x8000_0000, 0x2000)]);
}

#[test]
fn eventfds_reach_the_vfio_user_crate_backend_one_per_message() {
    let s = setup();
    let c = s.client.as_ref().unwrap();
    let efds: Vec<_> = (0..3).map(|_| eventfd()).collect();
    let fds: Vec<_> = efds.iter().map(|e| Some(e.as_fd())).collect();
    c.set_irq_eventfds(2, 1, &fds).unwrap();
    for e in &efds {
        assert_eq!(read_eventfd(e), Some(1), "the backend signalled it");
    }
    let flags = (1 << 2) | (1 << 5); // DATA_EVENTFD | ACTION_TRIGGER
    assert_eq!(
        s.seen.lock().unwrap().set_irqs,
        vec![
            (2, flags, 1, 1, 1),
            (2, flags, 2, 1, 1),
            (2, flags, 3, 1, 1)
        ]
    );
}

#[test]
fn vfio_user_crate_server_errors_come_back_as_refused_within_the_timeout() {
    let s = setup();
    let c = s.client.as_ref().unwrap();
    let t0 = Instant::now();
    // An index the server does not have: it answers EINVAL.
    let e = c.irq_info(7).unwrap_err();
    assert!(
        matches!(e, Error::Refused { errno, .. } if errno == libc::EINVAL),
        "{e:?}"
    );
    // A backend failure: that server sends errno 0, which we report as EIO.
    let e = c.region_write(1, 0, &[1]).unwrap_err();
    assert!(
        matches!(e, Error::Refused { errno, .. } if errno == libc::EIO),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The connection is still usable.
    let mut b = [0u8; 1];
    c.region_read(0, 0, &mut b).unwrap();
}
