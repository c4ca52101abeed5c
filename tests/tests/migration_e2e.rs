//! Live migration end to end: a fake device (VFIO migration v2: STOP_COPY,
//! P2P, PRE_COPY, DMA logging) behind `VfioPciDevice`, in the middle of a
//! DMA and with vectors pending, migrated to a second fake device of a
//! second VMM through the crate's migration API, while the VMM moves guest
//! RAM by the dirty bitmap `GuestDma` reports. Each scenario runs with the
//! fake in-process and served over a vfio-user socket (our server and
//! client: `DEVICE_FEATURE` migration and DMA logging, `MIG_DATA_READ` /
//! `WRITE`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Instant;

use support::*;
#[allow(unused_imports)]
use support::{Backend, BackendKind};
use vfio_backend::{MigState, Vfio};
use vfio_fake_device::{dma_engine, BarSpec, Capability, DeviceTemplate, FakeDevice, RegisterKind};
use vfio_pci::migration::crc32;
use vfio_pci::{BarIndex, DeviceOptions, DirtyBitmap, Error, IrqMode, VfioPciDevice};
use vm_memory::GuestMemoryMmap;

const ENGINE: u64 = 0x100;
const DOORBELLS: u64 = 0x200;
const TABLE: u64 = 0x2000;
const PBA: u64 = 0x3000;
const VECTORS: u32 = 4;
/// The DMA engine's completion vector.
const DMA_VECTOR: u32 = 1;
const PAGE: u64 = 4096;

/// BAR 0: a DMA engine (vector 1), four doorbells (vectors 0..3), the MSI-X
/// table and PBA; BAR 2: 64 KiB of device memory, mapped into the guest.
fn template() -> DeviceTemplate {
    DeviceTemplate::builder()
        .ids(0x1234, 0x0e2e)
        .bar(0, BarSpec::mem32(0x4000))
        .bar(2, BarSpec::mem32(0x10000))
        .capability(Capability::Msix {
            vectors: VECTORS,
            table_bar: 0,
            table_offset: TABLE as u32,
            pba_bar: 0,
            pba_offset: PBA as u32,
        })
        .registers(
            0,
            ENGINE,
            dma_engine::BLOCK_SIZE,
            RegisterKind::DmaEngine {
                irq_vector: DMA_VECTOR,
            },
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

/// A VMM with guest RAM and one migratable fake device behind a backend.
/// Fields drop in order: the device before its backend.
struct Side {
    dev: VfioPciDevice,
    _backend: Backend,
    fake: Arc<FakeDevice>,
    vm: Vm,
    ram: GuestMemoryMmap,
}

fn side_on(kind: BackendKind) -> Side {
    let vm = Vm::new();
    let ram = guest_ram();
    vm.dma.add_memory(&ram).unwrap();
    let fake = Arc::new(FakeDevice::new(template()).unwrap());
    let backend = Backend::with_fake(kind, fake.clone());
    let dev = VfioPciDevice::new(
        backend.vfio.clone(),
        vm.resources(),
        DeviceOptions::default(),
    )
    .unwrap();
    Side {
        dev,
        _backend: backend,
        fake,
        vm,
        ram,
    }
}

fn r32(dev: &VfioPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_bar(BarIndex::Bar(0), off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(dev: &VfioPciDevice, off: u64, v: u32) {
    dev.write_bar(BarIndex::Bar(0), off, &v.to_le_bytes())
        .unwrap();
}

fn w64(dev: &VfioPciDevice, off: u64, v: u64) {
    dev.write_bar(BarIndex::Bar(0), off, &v.to_le_bytes())
        .unwrap();
}

fn cfg16(dev: &VfioPciDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    dev.read_config(off, &mut b);
    u16::from_le_bytes(b)
}

fn msix_cap(dev: &VfioPciDevice) -> u64 {
    let mut p = u64::from({
        let mut b = [0u8; 1];
        dev.read_config(CAP_PTR, &mut b);
        b[0]
    });
    while p != 0 {
        let mut b = [0u8; 2];
        dev.read_config(p, &mut b);
        if b[0] == cap_id::MSIX {
            return p;
        }
        p = u64::from(b[1]);
    }
    panic!("no MSI-X capability");
}

/// The guest's driver: decoding and bus mastering on, MSI-X on with every
/// vector programmed and unmasked.
fn driver_up(dev: &VfioPciDevice) {
    let cmd = cfg16(dev, COMMAND);
    dev.write_config(COMMAND, &(cmd | CMD_MEM | CMD_BUS_MASTER).to_le_bytes())
        .unwrap();
    for v in 0..u64::from(VECTORS) {
        let e = TABLE + 16 * v;
        w32(dev, e, (MSI_ADDR as u32) | ((v as u32) << 12));
        w32(dev, e + 4, 0);
        w32(dev, e + 8, 0x30 + v as u32);
        w32(dev, e + 12, 0);
    }
    let cap = msix_cap(dev);
    let ctl = cfg16(dev, cap + 2);
    dev.write_config(cap + 2, &((ctl | 0x8000) & !0x4000).to_le_bytes())
        .unwrap();
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
}

fn mask(dev: &VfioPciDevice, v: u32, masked: bool) {
    w32(dev, TABLE + 16 * u64::from(v) + 12, u32::from(masked));
}

/// The guest starts a DMA of `len` bytes from `src` to `dst` (guest
/// physical addresses) that raises the completion vector.
fn start_dma(dev: &VfioPciDevice, src: u64, dst: u64, len: u64) {
    w64(dev, ENGINE + dma_engine::SRC, src);
    w64(dev, ENGINE + dma_engine::DST, dst);
    w64(dev, ENGINE + dma_engine::LEN, len);
    w32(
        dev,
        ENGINE + dma_engine::CMD,
        dma_engine::CMD_START | dma_engine::CMD_IRQ,
    );
}

fn wait_engine_idle(dev: &VfioPciDevice) {
    let t0 = Instant::now();
    while r32(dev, ENGINE + dma_engine::CMD) & dma_engine::CMD_START != 0 {
        assert!(t0.elapsed() < WAIT, "the DMA never finished");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn msix_group(s: &Side) -> Arc<pci_interrupts::testing::TestInterruptGroup> {
    s.vm.group(&s.dev.msix_group().unwrap())
}

/// Config space, the MSI-X table and where each BAR is, as the guest sees them.
fn guest_view(dev: &VfioPciDevice) -> (Vec<u8>, Vec<u32>, Vec<Option<u64>>) {
    let mut cfg = vec![0u8; 256];
    for (i, c) in cfg.chunks_mut(4).enumerate() {
        dev.read_config(4 * i as u64, c);
    }
    let table = (0..u64::from(VECTORS) * 4)
        .map(|i| r32(dev, TABLE + 4 * i))
        .collect();
    (cfg, table, dev.bars().iter().map(|b| b.base).collect())
}

/// The VMM's RAM transfer: the pages a report names, from `from` to `to`.
fn copy_pages(report: &[DirtyBitmap], from: &GuestMemoryMmap, to: &GuestMemoryMmap) -> Vec<u64> {
    let pages: Vec<u64> = report
        .iter()
        .flat_map(|b| b.dirty_pages().collect::<Vec<_>>())
        .collect();
    for &p in &pages {
        ram_write(to, p, &ram_read(from, p, PAGE as usize));
    }
    pages
}

fn whole_ram(mem: &GuestMemoryMmap) -> Vec<u8> {
    RAM_REGIONS
        .iter()
        .flat_map(|&(gpa, len)| ram_read(mem, gpa, len))
        .collect()
}

both_backends! {
    fn a_device_mid_dma_with_pending_vectors_continues_on_the_destination(kind: BackendKind) {
        mid_dma_with_pending_vectors(kind);
    }

    fn an_abort_at_each_step_leaves_the_source_running_and_its_work_goes_on_there(kind: BackendKind) {
        abort_at_each_step(kind);
    }

    fn corrupt_and_truncated_streams_are_refused_before_the_destination_device_is_touched(kind: BackendKind) {
        corrupt_and_truncated(kind);
    }

    fn device_state_the_device_refuses_leaves_the_destination_reset_and_running(kind: BackendKind) {
        device_refused_state(kind);
    }
}

/// Source and destination both behind `kind`.
fn mid_dma_with_pending_vectors(kind: BackendKind) {
    let src = side_on(kind);
    driver_up(&src.dev);
    let sg = msix_group(&src);
    let data = pattern(7, 0x1800);
    ram_write(&src.ram, 0x1_0000, &data);
    // The device's own memory, written by the guest through its mapping.
    src.fake.region_write(2, 0x800, b"device memory").unwrap();

    // The VMM starts tracking and copies all of RAM once.
    let dst = side_on(kind);
    src.vm.dma.dirty_tracking_start(PAGE).unwrap();
    for &(gpa, len) in &RAM_REGIONS {
        ram_write(&dst.ram, gpa, &ram_read(&src.ram, gpa, len));
    }

    let mut wire = Vec::new();
    let mut m = src.dev.start_migration().unwrap();
    let caps = m.caps();
    assert!(caps.pre_copy() && caps.p2p());
    assert!(m.stop_copy_size().unwrap() > 0);
    m.precopy(&mut wire).unwrap();

    // The guest runs on: a DMA to 0x40800.. (pages 0x40000 and 0x41000).
    start_dma(&src.dev, 0x1_0000, 0x4_0800, 0x1800);
    wait_engine_idle(&src.dev);
    assert_eq!(wait_delivered(&sg, DMA_VECTOR), 1);
    let report = src.vm.dma.dirty_bitmaps().unwrap();
    assert_eq!(
        copy_pages(&report, &src.ram, &dst.ram),
        vec![0x4_0000, 0x4_1000],
        "exactly the pages the DMA wrote"
    );
    // Vector 2 masked, then raised: pending in the guest's PBA.
    mask(&src.dev, 2, true);
    w32(&src.dev, DOORBELLS + 8, 1);
    assert_eq!(r32(&src.dev, PBA), 1 << 2);
    src.fake
        .region_write(2, 0x4000, b"changed while pre-copying")
        .unwrap();
    let left = m.precopy(&mut wire).unwrap();
    assert_eq!(left.dirty_bytes, 0);

    // Quiesced: the device still takes register writes, but neither starts
    // DMA nor raises interrupts.
    m.quiesce().unwrap();
    start_dma(&src.dev, 0x1_0000, 0x8_0000, 0x1000);
    w32(&src.dev, DOORBELLS + 12, 1);
    assert_eq!(src.fake.dma_in_flight(), 1);
    assert!(!latched(&sg, 3), "nothing raised while quiesced");
    m.stop_and_copy(&mut wire).unwrap();
    // The held DMA wrote nothing: the last report is empty.
    let last = src.vm.dma.dirty_bitmaps().unwrap();
    assert!(copy_pages(&last, &src.ram, &dst.ram).is_empty());
    src.vm.dma.dirty_tracking_stop().unwrap();
    m.complete().unwrap();
    let view = guest_view(&src.dev);

    // The destination: RAM as the VMM moved it, the device state from the stream.
    assert_eq!(whole_ram(&dst.ram), whole_ram(&src.ram));
    assert_ne!(guest_view(&dst.dev), view);
    dst.dev.resume_migration(&wire[..]).unwrap();
    assert_eq!(
        guest_view(&dst.dev),
        view,
        "config, MSI-X table, BAR placement"
    );
    let dg = msix_group(&dst);
    // The DMA held at quiesce runs here, and completes with its vector.
    wait_engine_idle(&dst.dev);
    assert_eq!(
        r32(&dst.dev, ENGINE + dma_engine::STATUS),
        dma_engine::STATUS_DONE
    );
    assert_eq!(ram_read(&dst.ram, 0x8_0000, 0x1000), data[..0x1000]);
    assert_eq!(wait_delivered(&dg, DMA_VECTOR), 1);
    // The doorbell rung while quiesced is delivered here.
    assert_eq!(wait_delivered(&dg, 3), 1);
    // The vector pending on the source is pending here, delivered on unmask.
    assert_eq!(r32(&dst.dev, PBA), 1 << 2);
    assert_eq!(dg.take_delivered(2), 0);
    mask(&dst.dev, 2, false);
    assert_eq!(dg.take_delivered(2), 1);
    assert_eq!(r32(&dst.dev, PBA), 0);
    assert_eq!(dg.violations(), 0);
    // The device's memory came along.
    let mut mem = [0u8; 25];
    dst.fake.region_read(2, 0x4000, &mut mem).unwrap();
    assert_eq!(&mem, b"changed while pre-copying");
    dst.fake.region_read(2, 0x800, &mut mem[..13]).unwrap();
    assert_eq!(&mem[..13], b"device memory");
    // The source, stopped, did none of it.
    assert_eq!(ram_read(&src.ram, 0x8_0000, 0x1000), vec![0u8; 0x1000]);
    assert!(!latched(&sg, 3) && !latched(&sg, DMA_VECTOR));
    assert_eq!(src.fake.mig_state().unwrap(), MigState::Stop);
}

fn abort_at_each_step(kind: BackendKind) {
    for steps in 0..=3 {
        let src = side_on(kind);
        driver_up(&src.dev);
        let sg = msix_group(&src);
        ram_write(&src.ram, 0x1_0000, &pattern(3, 0x1000));
        let view = guest_view(&src.dev);
        let mut m = src.dev.start_migration().unwrap();
        let mut wire = Vec::new();
        if steps > 0 {
            m.precopy(&mut wire).unwrap();
        }
        if steps > 1 {
            m.quiesce().unwrap();
            // A DMA the quiesced device holds.
            start_dma(&src.dev, 0x1_0000, 0x9_0000, 0x1000);
        }
        if steps > 2 {
            m.stop_and_copy(&mut wire).unwrap();
        }
        m.abort().unwrap();
        assert_eq!(
            src.fake.mig_state().unwrap(),
            MigState::Running,
            "{steps} steps"
        );
        assert_eq!(guest_view(&src.dev), view);
        if steps > 1 {
            // The held DMA runs now, on the source.
            wait_engine_idle(&src.dev);
            assert_eq!(wait_delivered(&sg, DMA_VECTOR), 1);
            assert_eq!(ram_read(&src.ram, 0x9_0000, 0x1000), pattern(3, 0x1000));
        }
        // And the device works as before.
        start_dma(&src.dev, 0x1_0000, 0xa_0000, 0x100);
        wait_engine_idle(&src.dev);
        assert_eq!(wait_delivered(&sg, DMA_VECTOR), 1);
    }
}

/// The chunks of a stream: (header start, payload start, end).
fn chunks(stream: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut at = 16;
    let mut out = Vec::new();
    while at < stream.len() {
        let len = u32::from_le_bytes(stream[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push((at, at + 12, at + 12 + len + 4));
        at += 12 + len + 4;
    }
    out
}

fn a_stream(kind: BackendKind) -> Vec<u8> {
    let src = side_on(kind);
    driver_up(&src.dev);
    src.fake.region_write(2, 0, b"state").unwrap();
    let mut wire = Vec::new();
    let mut m = src.dev.start_migration().unwrap();
    m.precopy(&mut wire).unwrap();
    m.stop_and_copy(&mut wire).unwrap();
    m.complete().unwrap();
    wire
}

fn corrupt_and_truncated(kind: BackendKind) {
    let wire = a_stream(kind);
    let dst = side_on(kind);
    let view = guest_view(&dst.dev);
    let calls = |f: &FakeDevice| f.counters().calls(vfio_fake_device::Op::Reset);
    let cs = chunks(&wire);
    // Every byte of the prefix, of every chunk header (kind, sequence,
    // length) and CRC, and payload bytes at a stride.
    let mut positions: Vec<usize> = (0..16).collect();
    for &(h, p, end) in &cs {
        positions.extend(h..p);
        positions.extend(end - 4..end);
        positions.extend((p..end - 4).step_by(1021));
    }
    for pos in positions {
        let mut bad = wire.clone();
        bad[pos] ^= 0x40;
        let e = dst.dev.resume_migration(&bad[..]).unwrap_err();
        assert!(
            matches!(e, Error::MigrationStream { .. }),
            "byte {pos}: {e}"
        );
    }
    // Cut at every chunk boundary, one byte either side, and at a stride.
    let mut cuts: Vec<usize> = (0..64).collect();
    for &(h, p, end) in &cs {
        cuts.extend([h, h + 1, p - 1, p, p + 1, end - 1]);
        cuts.extend((p..end).step_by(997));
    }
    for len in cuts.into_iter().filter(|l| *l < wire.len()) {
        let e = dst.dev.resume_migration(&wire[..len]).unwrap_err();
        assert!(
            matches!(e, Error::MigrationStream { .. }),
            "{len} bytes: {e}"
        );
    }
    assert_eq!(dst.fake.mig_state().unwrap(), MigState::Running);
    assert_eq!(calls(&dst.fake), 0, "never reset");
    assert_eq!(guest_view(&dst.dev), view);
    dst.dev.resume_migration(&wire[..]).unwrap();
}

fn device_refused_state(kind: BackendKind) {
    let wire = a_stream(kind);
    // A well-formed stream (its CRCs right) whose device data the device
    // refuses: the last byte of the device's own stream (its checksum) flipped.
    let cs = chunks(&wire);
    let data: Vec<_> = cs
        .iter()
        .filter(|(h, _, _)| u32::from_le_bytes(wire[*h..h + 4].try_into().unwrap()) == 2)
        .collect();
    let &&(h, _, end) = data.last().unwrap();
    let mut bad = wire.clone();
    bad[end - 5] ^= 0xff;
    let crc = crc32(&bad[h..end - 4]);
    bad[end - 4..end].copy_from_slice(&crc.to_le_bytes());

    let dst = side_on(kind);
    driver_up(&dst.dev);
    let e = dst.dev.resume_migration(&bad[..]).unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e}");
    assert_eq!(dst.fake.mig_state().unwrap(), MigState::Running);
    // Reset as by reset(): no decoding, no bus mastering, INTx-less: no interrupt wired.
    assert_eq!(cfg16(&dst.dev, COMMAND) & (CMD_MEM | CMD_BUS_MASTER), 0);
    assert_ne!(dst.dev.irq_mode(), IrqMode::Msix);
    // The good stream loads into it afterwards.
    dst.dev.resume_migration(&wire[..]).unwrap();
    assert_eq!(dst.dev.irq_mode(), IrqMode::Msix);
}
