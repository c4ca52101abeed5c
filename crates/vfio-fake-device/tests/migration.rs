//! Live migration of the fake device, checked against the kernel's VFIO
//! migration v2 uAPI (`linux/vfio.h`: the state machine, its data streams,
//! `VFIO_MIG_GET_PRECOPY_INFO`, the P2P quiescent state and device DMA
//! logging).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use vfio_backend::{
    irq, DirtyRange, Error, MigState, MigrationFlags, MigrationStream, SparseArea, Vfio,
};
use vfio_fake_device::{
    dma_engine, edu, BarSpec, Capability, DeviceTemplate, FakeDevice, MigOp, RegisterKind,
};

const ENGINE: u64 = 0x100;
const DOORBELLS: u64 = 0x200;
const MEM_BAR: u32 = 2;
const MEM_SIZE: u64 = 0x10000;

/// BAR 0: a DMA engine (vector 1) and four doorbells (vectors 0..3) in its
/// first page; BAR 2: 64 KiB of plain memory, all of it mmap-able.
fn template() -> DeviceTemplate {
    DeviceTemplate::builder()
        .ids(0x1234, 0x0003)
        .bar(0, BarSpec::mem32(0x4000))
        .bar(2, BarSpec::mem32(MEM_SIZE))
        .capability(Capability::Msi {
            vectors: 4,
            addr64: true,
            per_vector_mask: false,
        })
        .registers(
            0,
            ENGINE,
            dma_engine::BLOCK_SIZE,
            RegisterKind::DmaEngine { irq_vector: 1 },
        )
        .registers(
            0,
            DOORBELLS,
            16,
            RegisterKind::Doorbell {
                first_vector: 0,
                stride: 4,
            },
        )
        .build()
        .unwrap()
}

fn device() -> FakeDevice {
    let d = FakeDevice::new(template()).unwrap();
    enable_decoding(&d);
    enable_bus_master(&d);
    d
}

fn errno<T>(r: Result<T, Error>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.errno().unwrap(),
    }
}

fn set(d: &FakeDevice, s: MigState) -> Option<Box<dyn MigrationStream>> {
    d.set_mig_state(s).unwrap()
}

/// Reads a stream until it has nothing more now.
fn drain(s: &mut dyn MigrationStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 3000];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// The complete stop-and-copy stream of `src` (left in STOP_COPY).
fn save(src: &FakeDevice) -> Vec<u8> {
    let mut s = set(src, MigState::StopCopy).expect("STOP_COPY from RUNNING opens a stream");
    drain(&mut *s)
}

/// Feeds `data` to `dst` in RESUMING, in uneven pieces, and leaves it in
/// STOP.
fn load(dst: &FakeDevice, data: &[u8]) -> Result<(), Error> {
    let mut s = set(dst, MigState::Resuming).expect("RESUMING opens a stream");
    for piece in data.chunks(777) {
        s.write(piece)?;
    }
    dst.set_mig_state(MigState::Stop).map(|_| ())
}

fn mem_bar(d: &FakeDevice) -> vfio_backend::Mapping {
    d.mmap_region(
        MEM_BAR,
        SparseArea {
            offset: 0,
            size: MEM_SIZE,
        },
    )
    .unwrap()
}

fn read_bar(d: &FakeDevice, bar: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    d.region_read(bar, 0, &mut out).unwrap();
    out
}

#[test]
fn the_device_offers_stop_copy_p2p_and_pre_copy_and_starts_running() {
    let d = device();
    let flags = d.migration_flags().unwrap().unwrap();
    assert!(flags.stop_copy() && flags.p2p() && flags.pre_copy());
    assert_eq!(
        flags,
        MigrationFlags(MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY)
    );
    assert_eq!(d.mig_state().unwrap(), MigState::Running);
}

#[test]
fn set_mig_state_takes_combination_arcs_and_returns_the_stream_of_the_last() {
    let d = device();
    // RUNNING -> STOP_COPY goes through RUNNING_P2P and STOP; the last arc
    // (STOP -> STOP_COPY) opens a stream.
    assert!(set(&d, MigState::StopCopy).is_some());
    assert_eq!(d.mig_state().unwrap(), MigState::StopCopy);
    // Back to RUNNING: no stream.
    assert!(set(&d, MigState::Running).is_none());
    // RUNNING -> PRE_COPY opens one; PRE_COPY -> STOP_COPY goes on with it.
    let mut s = set(&d, MigState::PreCopy).expect("PRE_COPY opens a stream");
    let first = drain(&mut *s);
    assert!(!first.is_empty());
    assert!(set(&d, MigState::StopCopy).is_none());
    let rest = drain(&mut *s);
    assert!(!rest.is_empty(), "the pre-copy stream serves STOP_COPY");
    // STOP -> RESUMING opens a stream; RUNNING_P2P -> PRE_COPY_P2P too.
    assert!(set(&d, MigState::Stop).is_none());
    assert!(set(&d, MigState::Resuming).is_some());
    assert!(
        d.set_mig_state(MigState::Stop).is_err(),
        "RESUMING left with no data"
    );
    d.reset().unwrap();
    assert!(set(&d, MigState::RunningP2p).is_none());
    assert!(set(&d, MigState::PreCopyP2p).is_some());
    assert!(set(&d, MigState::PreCopy).is_none());
    // Setting the state the device is in is no arc and opens nothing.
    assert!(set(&d, MigState::PreCopy).is_none());
    assert_eq!(d.mig_state().unwrap(), MigState::PreCopy);
}

#[test]
fn arcs_the_uapi_does_not_permit_are_refused_and_leave_the_state() {
    let d = device();
    assert!(set(&d, MigState::StopCopy).is_some());
    // STOP_COPY -> PRE_COPY / PRE_COPY_P2P: "not permitted and return error".
    assert_eq!(errno(d.set_mig_state(MigState::PreCopy)), libc::EINVAL);
    assert_eq!(errno(d.set_mig_state(MigState::PreCopyP2p)), libc::EINVAL);
    assert_eq!(d.mig_state().unwrap(), MigState::StopCopy);
    // ERROR cannot be set.
    assert_eq!(errno(d.set_mig_state(MigState::Error)), libc::EINVAL);
    assert_eq!(d.mig_state().unwrap(), MigState::StopCopy);
}

#[test]
fn a_device_in_error_moves_nowhere_until_reset_returns_it_to_running() {
    let d = device();
    d.faults()
        .fail_migration(MigOp::SetStateError, libc::EIO, Some(1));
    assert_eq!(errno(d.set_mig_state(MigState::Stop)), libc::EIO);
    assert_eq!(d.mig_state().unwrap(), MigState::Error);
    assert_eq!(errno(d.set_mig_state(MigState::Running)), libc::EINVAL);
    assert_eq!(errno(d.set_mig_state(MigState::Stop)), libc::EINVAL);
    d.reset().unwrap();
    assert_eq!(d.mig_state().unwrap(), MigState::Running);
}

#[test]
fn an_injected_set_failure_leaves_the_device_in_its_state() {
    let d = device();
    d.faults()
        .fail_migration(MigOp::SetState, libc::EBUSY, Some(1));
    assert_eq!(errno(d.set_mig_state(MigState::StopCopy)), libc::EBUSY);
    assert_eq!(d.mig_state().unwrap(), MigState::Running);
    assert!(set(&d, MigState::StopCopy).is_some());
}

#[test]
fn a_stream_of_an_ended_session_is_refused() {
    let d = device();
    let mut s = set(&d, MigState::StopCopy).unwrap();
    set(&d, MigState::Stop);
    let mut buf = [0u8; 16];
    assert_eq!(errno(s.read(&mut buf)), libc::EBADF);
    // precopy_info is valid only in the PRE_COPY states.
    let mut s = set(&d, MigState::StopCopy).unwrap();
    assert_eq!(errno(s.precopy_info()), libc::EINVAL);
    assert_eq!(errno(s.write(&[0u8; 4])), libc::EINVAL);
}

#[test]
fn migration_carries_config_registers_and_memory_written_every_way() {
    let src = device();
    let dst = device();
    // Memory written through region_write, through an mmap of the BAR, and
    // a register written in BAR 0.
    src.region_write(MEM_BAR, 0x10, b"through region_write")
        .unwrap();
    let map = mem_bar(&src);
    // SAFETY: the mapping is live and 64 KiB long.
    unsafe {
        std::ptr::copy_nonoverlapping(b"through mmap".as_ptr(), map.as_ptr().add(0x9000), 12)
    };
    bar_write64(&src, 0, ENGINE + dma_engine::SRC, 0xdead_b000);
    cfg_write16(&src, 0x2c, 0); // read-only: stays
    let before_cfg = {
        let mut c = vec![0u8; 256];
        src.region_read(vfio_backend::region::CONFIG, 0, &mut c)
            .unwrap();
        c
    };
    let stream = save(&src);
    load(&dst, &stream).unwrap();
    set(&dst, MigState::Running);
    assert_eq!(
        read_bar(&dst, MEM_BAR, MEM_SIZE as usize),
        read_bar(&src, MEM_BAR, MEM_SIZE as usize)
    );
    assert_eq!(
        bar_read32(&dst, 0, ENGINE + dma_engine::SRC),
        0xdead_b000,
        "registers migrated"
    );
    let mut after_cfg = vec![0u8; 256];
    dst.region_read(vfio_backend::region::CONFIG, 0, &mut after_cfg)
        .unwrap();
    assert_eq!(
        after_cfg, before_cfg,
        "command register (decoding, bus master) migrated"
    );
    let mut got = [0u8; 12];
    dst.region_read(MEM_BAR, 0x9000, &mut got).unwrap();
    assert_eq!(&got, b"through mmap");
}

#[test]
fn pre_copy_sends_memory_in_rounds_with_true_estimates_and_converges() {
    let src = device();
    let dst = device();
    let map = mem_bar(&src);
    // SAFETY: the mapping is live and 64 KiB long.
    let mem = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), MEM_SIZE as usize) };
    mem.fill(0x5a);
    let mut s = set(&src, MigState::PreCopy).unwrap();
    let info = s.precopy_info().unwrap();
    assert!(info.initial_bytes > 0);
    assert_eq!(info.dirty_bytes, 0);
    let mut sent = drain(&mut *s);
    assert_eq!(
        sent.len() as u64,
        info.initial_bytes,
        "initial_bytes is what the first round sends"
    );
    let info = s.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.dirty_bytes), (0, 0));
    // The device runs on: a store through the mmap and a trapped write
    // dirty two pages of BAR 2; nothing else changes.
    mem[0x3004] = 1;
    src.region_write(MEM_BAR, 0xa000, &[2]).unwrap();
    let info = s.precopy_info().unwrap();
    let page_record = 8 + 12 + 4096;
    assert_eq!(info.initial_bytes, 0);
    assert_eq!(info.dirty_bytes, 2 * page_record);
    let round = drain(&mut *s);
    assert_eq!(
        round.len() as u64,
        2 * page_record,
        "a round resends only the changed pages"
    );
    sent.extend_from_slice(&round);
    // Converged: nothing more until the device changes again.
    assert!(drain(&mut *s).is_empty());
    mem[0xf000] = 3;
    assert!(set(&src, MigState::StopCopy).is_none());
    let last = drain(&mut *s);
    assert!(
        last.len() as u64 >= page_record,
        "STOP_COPY sends the last change"
    );
    sent.extend_from_slice(&last);
    load(&dst, &sent).unwrap();
    set(&dst, MigState::Running);
    assert_eq!(read_bar(&dst, MEM_BAR, MEM_SIZE as usize), mem.to_vec());
}

#[test]
fn stop_copy_size_estimates_the_stream() {
    let d = device();
    let size = d.mig_data_size().unwrap();
    let stream = save(&d);
    assert_eq!(size, stream.len() as u64);
}

#[test]
fn running_p2p_answers_register_accesses_but_starts_no_dma_and_raises_no_interrupt() {
    let d = device();
    let ram = GuestMem::new(0x4000);
    ram.write(0, &[7u8; 0x1000]);
    d.dma_map(0x10000, 0x4000, ram.source(false)).unwrap();
    let efds: Vec<Efd> = (0..4).map(|_| Efd::new()).collect();
    let fds: Vec<_> = efds.iter().map(|e| Some(e.fd())).collect();
    d.set_irq_eventfds(irq::MSI, 0, &fds).unwrap();
    set(&d, MigState::RunningP2p);
    // A doorbell: held, not signalled.
    bar_write32(&d, 0, DOORBELLS + 8, 1);
    assert_eq!(efds[2].take(), 0);
    assert!(d.irq_pending(irq::MSI, 2));
    // A DMA: accepted, not started.
    bar_write64(&d, 0, ENGINE + dma_engine::SRC, 0x10000);
    bar_write64(&d, 0, ENGINE + dma_engine::DST, 0x12000);
    bar_write64(&d, 0, ENGINE + dma_engine::LEN, 0x1000);
    bar_write32(
        &d,
        0,
        ENGINE + dma_engine::CMD,
        dma_engine::CMD_START | dma_engine::CMD_IRQ,
    );
    assert_eq!(
        bar_read32(&d, 0, ENGINE + dma_engine::LEN),
        0x1000,
        "registers read back"
    );
    assert_eq!(bar_read32(&d, 0, ENGINE + dma_engine::STATUS), 0);
    assert_eq!(ram.read()[0x2000..0x3000], [0u8; 0x1000]);
    assert_eq!(d.dma_in_flight(), 1);
    // RUNNING: the held interrupt is delivered, the DMA runs.
    set(&d, MigState::Running);
    assert_eq!(efds[2].take(), 1);
    wait_engine_idle(&d);
    assert_eq!(ram.read()[0x2000..0x3000], [7u8; 0x1000]);
    assert_eq!(efds[1].take(), 1);
    assert!(!d.irq_pending(irq::MSI, 2));
}

fn wait_engine_idle(d: &FakeDevice) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while bar_read32(d, 0, ENGINE + dma_engine::CMD) & dma_engine::CMD_START != 0 {
        assert!(Instant::now() < deadline, "the DMA never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_dma_in_flight_and_pending_vectors_continue_on_the_destination() {
    let src = device();
    let src_ram = GuestMem::new(0x4000);
    src_ram.write(0, &(0..0x1000).map(|i| i as u8).collect::<Vec<_>>());
    src.dma_map(0x10000, 0x4000, src_ram.source(false)).unwrap();
    let src_efds: Vec<Efd> = (0..4).map(|_| Efd::new()).collect();
    let fds: Vec<_> = src_efds.iter().map(|e| Some(e.fd())).collect();
    src.set_irq_eventfds(irq::MSI, 0, &fds).unwrap();
    set(&src, MigState::RunningP2p);
    bar_write32(&src, 0, DOORBELLS + 12, 1);
    bar_write64(&src, 0, ENGINE + dma_engine::SRC, 0x10000);
    bar_write64(&src, 0, ENGINE + dma_engine::DST, 0x12000);
    bar_write64(&src, 0, ENGINE + dma_engine::LEN, 0x1000);
    bar_write32(
        &src,
        0,
        ENGINE + dma_engine::CMD,
        dma_engine::CMD_START | dma_engine::CMD_IRQ,
    );
    let stream = save(&src);
    // The destination: guest RAM as the VMM migrated it, mapped at the same
    // IOVAs, its vectors wired before it runs.
    let dst = device();
    let dst_ram = GuestMem::new(0x4000);
    dst_ram.write(0, &src_ram.read());
    dst.dma_map(0x10000, 0x4000, dst_ram.source(false)).unwrap();
    load(&dst, &stream).unwrap();
    assert_eq!(dst.dma_in_flight(), 1);
    assert!(dst.irq_pending(irq::MSI, 3));
    let dst_efds: Vec<Efd> = (0..4).map(|_| Efd::new()).collect();
    let fds: Vec<_> = dst_efds.iter().map(|e| Some(e.fd())).collect();
    dst.set_irq_eventfds(irq::MSI, 0, &fds).unwrap();
    assert_eq!(dst_efds[3].take(), 0, "nothing raised while stopped");
    set(&dst, MigState::Running);
    wait_engine_idle(&dst);
    assert_eq!(dst_ram.read()[0x2000..0x3000], src_ram.read()[..0x1000]);
    assert_eq!(
        bar_read32(&dst, 0, ENGINE + dma_engine::STATUS),
        dma_engine::STATUS_DONE
    );
    assert_eq!((dst_efds[1].take(), dst_efds[3].take()), (1, 1));
    // The source, stopped, neither copied nor signalled.
    assert_eq!(src_ram.read()[0x2000..0x3000], [0u8; 0x1000]);
    assert_eq!((src_efds[1].take(), src_efds[3].take()), (0, 0));
}

#[test]
fn a_pending_intx_survives_migration_and_fires_once_unmasked() {
    let src = FakeDevice::profile("edu").unwrap();
    enable_decoding(&src);
    let efd = Efd::new();
    src.set_irq_eventfds(irq::INTX, 0, &[Some(efd.fd())])
        .unwrap();
    src.mask_irq(irq::INTX).unwrap();
    // Raised while masked: latched on the line, not signalled.
    bar_write32(&src, 0, edu::IRQ_RAISE, 0x10);
    assert_eq!(efd.take(), 0);
    assert!(src.intx_asserted());
    let stream = save(&src);
    let dst = FakeDevice::profile("edu").unwrap();
    load(&dst, &stream).unwrap();
    set(&dst, MigState::Running);
    assert!(dst.intx_asserted());
    assert_eq!(bar_read32(&dst, 0, edu::IRQ_STATUS), 0x10);
    let efd2 = Efd::new();
    dst.set_irq_eventfds(irq::INTX, 0, &[Some(efd2.fd())])
        .unwrap();
    assert_eq!(
        efd2.take(),
        1,
        "the pending INTx fires when the destination enables it"
    );
}

#[test]
fn truncated_streams_are_refused_and_the_destination_goes_to_error() {
    let src = device();
    src.region_write(MEM_BAR, 0, b"payload").unwrap();
    let stream = save(&src);
    for cut in [1, 8, 20, stream.len() / 2, stream.len() - 1] {
        let dst = device();
        let r = load(&dst, &stream[..stream.len() - cut]);
        assert_eq!(errno(r), libc::EINVAL, "cut {cut}");
        assert_eq!(dst.mig_state().unwrap(), MigState::Error);
        dst.reset().unwrap();
        assert_eq!(dst.mig_state().unwrap(), MigState::Running);
    }
    // The source lost nothing: back to RUNNING, it still has its state, and
    // a second save gives the same stream.
    set(&src, MigState::Running);
    let mut got = [0u8; 7];
    src.region_read(MEM_BAR, 0, &mut got).unwrap();
    assert_eq!(&got, b"payload");
    assert_eq!(save(&src), stream);
}

#[test]
fn corrupt_streams_are_refused() {
    let src = device();
    src.region_write(MEM_BAR, 0x2000, b"payload").unwrap();
    let stream = save(&src);
    // A flipped bit anywhere: header, a record header, page data, state,
    // checksum.
    let n = stream.len();
    for at in [0usize, 9, 40, 80, 100, n / 2, n - 30, n - 1] {
        let mut bad = stream.clone();
        bad[at] ^= 0x10;
        let dst = device();
        let mut s = set(&dst, MigState::Resuming).unwrap();
        let wrote = bad.chunks(512).try_for_each(|c| s.write(c));
        let stopped = dst.set_mig_state(MigState::Stop);
        assert!(wrote.is_err() || stopped.is_err(), "flip at {at} accepted");
        assert_eq!(errno(stopped), libc::EINVAL, "flip at {at}");
        assert_eq!(dst.mig_state().unwrap(), MigState::Error);
    }
    // A stream of another device is refused at its header.
    let other = FakeDevice::profile("edu").unwrap();
    let foreign = save(&other);
    let dst = device();
    let mut s = set(&dst, MigState::Resuming).unwrap();
    assert_eq!(errno(s.write(&foreign)), libc::EINVAL);
    // Bytes after the end are refused too.
    let dst = device();
    let mut s = set(&dst, MigState::Resuming).unwrap();
    s.write(&stream).unwrap();
    assert_eq!(errno(s.write(&[0])), libc::EINVAL);
}

#[test]
fn dma_logging_reports_exactly_the_pages_the_engine_wrote() {
    let d = device();
    let ram = GuestMem::new(0x10000);
    d.dma_map(0x100000, 0x10000, ram.source(false)).unwrap();
    assert_eq!(
        errno(d.dma_logging_report(0x100000, 0x10000, 4096, &mut [0u64; 1])),
        libc::EINVAL,
        "no report while logging is off"
    );
    d.dma_logging_start(
        4096,
        &[DirtyRange {
            iova: 0x100000,
            length: 0x10000,
        }],
    )
    .unwrap();
    // The engine reads page 0 and writes 0x1800 bytes at 0x3800: pages 3 and 4.
    bar_write64(&d, 0, ENGINE + dma_engine::SRC, 0x100000);
    bar_write64(&d, 0, ENGINE + dma_engine::DST, 0x103800);
    bar_write64(&d, 0, ENGINE + dma_engine::LEN, 0x1800);
    bar_write32(&d, 0, ENGINE + dma_engine::CMD, dma_engine::CMD_START);
    wait_engine_idle(&d);
    let mut bm = [0u64; 1];
    d.dma_logging_report(0x100000, 0x10000, 4096, &mut bm)
        .unwrap();
    assert_eq!(bm[0], 0b1_1000);
    // Reported pages are cleared.
    d.dma_logging_report(0x100000, 0x10000, 4096, &mut bm)
        .unwrap();
    assert_eq!(bm[0], 0);
    // A coarser report page: 0x3800..0x5000 touches 16 KiB pages 0 and 1.
    bar_write32(&d, 0, ENGINE + dma_engine::CMD, dma_engine::CMD_START);
    wait_engine_idle(&d);
    d.dma_logging_report(0x100000, 0x10000, 0x4000, &mut bm)
        .unwrap();
    assert_eq!(bm[0], 0b11);
    // Sizes are checked: page size, bitmap size, alignment.
    assert_eq!(
        errno(d.dma_logging_report(0x100000, 0x10000, 1000, &mut bm)),
        libc::EINVAL
    );
    assert_eq!(
        errno(d.dma_logging_report(0x100000, 0x10000 * 65, 4096, &mut bm)),
        libc::EINVAL
    );
    assert_eq!(
        errno(d.dma_logging_start(
            4096,
            &[DirtyRange {
                iova: 0,
                length: 4096
            }]
        )),
        libc::EBUSY
    );
    d.dma_logging_stop().unwrap();
    assert_eq!(
        errno(d.dma_logging_start(
            4096,
            &[DirtyRange {
                iova: 1,
                length: 4096
            }]
        )),
        libc::EINVAL
    );
    assert_eq!(errno(d.dma_logging_start(4096, &[])), libc::EINVAL);
    let many: Vec<_> = (0..257u64)
        .map(|i| DirtyRange {
            iova: i << 20,
            length: 4096,
        })
        .collect();
    assert_eq!(errno(d.dma_logging_start(4096, &many)), libc::E2BIG);
    assert_eq!(
        errno(d.dma_logging_start(
            4096,
            &[DirtyRange {
                iova: 0,
                length: 1 << 48
            }]
        )),
        libc::E2BIG
    );
}

/// Memory reached by requests that wait until the test opens a gate.
struct Gated {
    mem: Vec<u8>,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl vfio_backend::RemoteDma for Gated {
    fn read(&self, iova: u64, buf: &mut [u8]) -> vfio_backend::Result<()> {
        let g = self.open.lock().unwrap();
        let _g = self
            .opened
            .wait_timeout_while(g, Duration::from_secs(10), |o| !*o)
            .unwrap();
        let off = (iova - 0x80_0000) as usize;
        buf.copy_from_slice(&self.mem[off..off + buf.len()]);
        Ok(())
    }

    fn write(&self, _iova: u64, _data: &[u8]) -> vfio_backend::Result<()> {
        Err(Error::Unsupported("read-only".into()))
    }
}

#[test]
fn a_transfer_under_way_parks_at_quiesce_and_the_destination_does_only_the_rest() {
    const LEN: u64 = 0x20000;
    let src = std::sync::Arc::new(device());
    let gated = std::sync::Arc::new(Gated {
        mem: (0..LEN as usize).map(|i| (i / 4096) as u8 ^ 0x80).collect(),
        open: std::sync::Mutex::new(false),
        opened: std::sync::Condvar::new(),
    });
    src.dma_map_remote(0x80_0000, LEN, true, gated.clone())
        .unwrap();
    let src_ram = GuestMem::new(LEN as usize);
    src.dma_map(0x100_0000, LEN, src_ram.source(false)).unwrap();
    bar_write64(&src, 0, ENGINE + dma_engine::SRC, 0x80_0000);
    bar_write64(&src, 0, ENGINE + dma_engine::DST, 0x100_0000);
    bar_write64(&src, 0, ENGINE + dma_engine::LEN, LEN);
    bar_write32(&src, 0, ENGINE + dma_engine::CMD, dma_engine::CMD_START);
    // The DMA thread waits in its first 64 KiB step; RUNNING_P2P waits for
    // it to park.
    let s2 = src.clone();
    let quiesce = std::thread::spawn(move || s2.set_mig_state(MigState::RunningP2p).map(|_| ()));
    std::thread::sleep(Duration::from_millis(50));
    *gated.open.lock().unwrap() = true;
    gated.opened.notify_all();
    quiesce.join().unwrap().unwrap();
    let half = (LEN / 2) as usize;
    assert_eq!(
        src_ram.read()[..half],
        gated.mem[..half],
        "the step under way finished"
    );
    assert!(
        src_ram.read()[half..].iter().all(|b| *b == 0),
        "and nothing after it"
    );
    assert_eq!(src.dma_in_flight(), 1);
    let stream = save(&src);
    // The destination reaches the source memory as host memory; its
    // destination range is marked to see what it writes.
    let dst = device();
    let dst_src = GuestMem::new(LEN as usize);
    dst_src.write(0, &gated.mem);
    let dst_ram = GuestMem::new(LEN as usize);
    dst_ram.write(0, &vec![0xee; LEN as usize]);
    dst.dma_map(0x80_0000, LEN, dst_src.source(true)).unwrap();
    dst.dma_map(0x100_0000, LEN, dst_ram.source(false)).unwrap();
    load(&dst, &stream).unwrap();
    set(&dst, MigState::Running);
    wait_engine_idle(&dst);
    assert_eq!(
        bar_read32(&dst, 0, ENGINE + dma_engine::STATUS),
        dma_engine::STATUS_DONE
    );
    let got = dst_ram.read();
    assert!(
        got[..half].iter().all(|b| *b == 0xee),
        "the done part is not redone"
    );
    assert_eq!(got[half..], gated.mem[half..]);
}

#[test]
fn a_device_offering_no_migration_says_none_and_refuses_the_state_machine() {
    let d = device();
    d.set_migration(None).unwrap();
    assert_eq!(d.migration_flags().unwrap(), None);
    assert!(matches!(d.mig_state(), Err(Error::Unsupported(_))));
    assert!(matches!(
        d.set_mig_state(MigState::StopCopy),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(d.mig_data_size(), Err(Error::Unsupported(_))));
    // Flags without STOP_COPY, or with bits the uAPI does not define, are
    // not a migration offer.
    assert_eq!(
        errno(d.set_migration(Some(MigrationFlags(MigrationFlags::P2P)))),
        libc::EINVAL
    );
    assert_eq!(
        errno(d.set_migration(Some(MigrationFlags(MigrationFlags::STOP_COPY | 1 << 8)))),
        libc::EINVAL
    );
}

#[test]
fn a_stop_copy_only_device_takes_the_paths_without_the_optional_states() {
    let d = device();
    d.set_migration(Some(MigrationFlags(MigrationFlags::STOP_COPY)))
        .unwrap();
    assert!(set(&d, MigState::StopCopy).is_some());
    set(&d, MigState::Running);
    // The optional states cannot be asked for.
    assert_eq!(errno(d.set_mig_state(MigState::RunningP2p)), libc::EINVAL);
    assert_eq!(errno(d.set_mig_state(MigState::PreCopy)), libc::EINVAL);
    assert_eq!(d.mig_state().unwrap(), MigState::Running);
    // Flags change only while RUNNING with no stream.
    assert!(set(&d, MigState::StopCopy).is_some());
    assert_eq!(errno(d.set_migration(None)), libc::EBUSY);
}
