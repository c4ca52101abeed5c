//! Live migration through `VfioPciDevice` against a test double of a
//! device with VFIO migration v2 (see `common/migdouble.rs`): the source's
//! steps and their order (pre-copy, quiesce, stop-and-copy, complete), abort
//! and failure at every step leaving the source RUNNING with its
//! guest-visible state, the destination's checks before it touches the
//! device (identity, every chunk's CRC and sequence, truncation), and what
//! travels (config space, MSI-X table, BAR placement, pending vectors, the
//! device's own state).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/migdouble.rs"]
mod migdouble;

use std::sync::Arc;

use common::*;
use migdouble::{MigDouble, STATE_LEN};
use vfio_backend::{MigState, MigrationFlags, Vfio};
use vfio_fake_device::{nvme_like, FakeDevice};
use vfio_pci::migration::{check_stream, StreamFault, MAX_DEVICE_DATA};
use vfio_pci::{BarIndex, DeviceOptions, Error, IrqMode, VfioPciDevice};

fn attach_double(vm: &Vm, d: &Arc<MigDouble>) -> VfioPciDevice {
    let vfio: Arc<dyn Vfio> = d.clone();
    VfioPciDevice::new(vfio, vm.resources(), DeviceOptions::default()).unwrap()
}

/// Where BAR 0 is, with its MSI-X table and PBA offsets in it.
fn bar0(dev: &VfioPciDevice) -> (u64, u64, u64) {
    let b = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let base = b.base.unwrap();
    (
        base,
        b.msix_table.unwrap().0 - base,
        b.msix_pba.unwrap().0 - base,
    )
}

fn msix_cap(dev: &VfioPciDevice) -> u64 {
    walk_caps(dev).into_iter().find(|c| c.0 == 0x11).unwrap().1
}

/// The guest's whole view of config space.
fn config(dev: &VfioPciDevice) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    for (i, c) in out.chunks_mut(4).enumerate() {
        dev.read_config(4 * i as u64, c);
    }
    out
}

fn msix_table(dev: &VfioPciDevice) -> Vec<u32> {
    let (_, table, _) = bar0(dev);
    (0..nvme_like::MSIX_VECTORS as u64 * 4)
        .map(|i| bar_read32(dev, 0, table + 4 * i))
        .collect()
}

/// A source programmed as a guest driver would: BAR 0 moved, MSI-X
/// enabled with vectors 0..4 programmed, the device's registers written.
fn programmed_source(vm: &Vm, d: &Arc<MigDouble>) -> VfioPciDevice {
    let dev = attach_double(vm, d);
    // Move BAR 0 (64-bit) as a guest does: decoding off, new address, on.
    let (base, table, _) = bar0(&dev);
    let moved = base + 0x10_0000;
    cfg_write16(&dev, 4, 0);
    cfg_write32(&dev, 0x10, (moved as u32) | (cfg_read32(&dev, 0x10) & 0xf));
    cfg_write32(&dev, 0x14, (moved >> 32) as u32);
    enable_device(&dev);
    assert_eq!(bar0(&dev).0, moved);
    for v in 0..4 {
        program_msix_entry(&dev, 0, table, v, 0xfee0_0000 + (v << 12), 0x40 + v as u32);
    }
    msix_enable(&dev, msix_cap(&dev), true);
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
    d.set_regs(0, b"source registers");
    dev
}

/// Everything the guest sees of a device, to compare before and after.
fn guest_view(dev: &VfioPciDevice) -> (Vec<u8>, Vec<u32>, Vec<Option<u64>>) {
    (
        config(dev),
        msix_table(dev),
        dev.bars().iter().map(|b| b.base).collect(),
    )
}

/// A complete stream from a programmed source, with the source's view.
fn a_stream() -> (Vec<u8>, Vec<u8>) {
    let vm = Vm::new();
    let d = MigDouble::all();
    let dev = programmed_source(&vm, &d);
    let mut out = Vec::new();
    let mut src = dev.start_migration().unwrap();
    src.stop_and_copy(&mut out).unwrap();
    src.complete().unwrap();
    (out, d.regs())
}

#[test]
fn a_backend_without_migration_is_refused_with_migration_unsupported() {
    let vm = Vm::new();
    let d = MigDouble::new(None);
    let dev = attach_double(&vm, &d);
    assert!(matches!(
        dev.migration_caps(),
        Err(Error::MigrationUnsupported)
    ));
    assert!(matches!(
        dev.start_migration(),
        Err(Error::MigrationUnsupported)
    ));
    let (stream, _) = a_stream();
    assert!(matches!(
        dev.resume_migration(&stream[..]),
        Err(Error::MigrationUnsupported)
    ));
    // A backend with the trait's defaults too.
    let plain = VfioPciDevice::new(
        migdouble::TrackedFake::new("edu") as Arc<dyn Vfio>,
        vm.resources(),
        DeviceOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        plain.migration_caps(),
        Err(Error::MigrationUnsupported)
    ));
}

#[test]
fn precopy_quiesce_stop_and_copy_carry_config_msix_bars_and_device_state() {
    let src_vm = Vm::new();
    let s = MigDouble::all();
    let src = programmed_source(&src_vm, &s);
    let caps = src.migration_caps().unwrap();
    assert!(caps.pre_copy() && caps.p2p());
    let before = guest_view(&src);

    let mut wire = Vec::new();
    let mut m = src.start_migration().unwrap();
    assert_eq!(s.state(), MigState::PreCopy);
    // The first round sends the initial state; then nothing remains.
    let left = m.precopy(&mut wire).unwrap();
    assert_eq!((left.initial_bytes, left.dirty_bytes), (0, 0));
    let after_round = wire.len();
    assert!(after_round > STATE_LEN);
    // The guest still runs: the device's state changes after pre-copy.
    s.set_regs(0, b"changed after pre-copy");
    m.quiesce().unwrap();
    assert_eq!(s.state(), MigState::PreCopyP2p);
    m.stop_and_copy(&mut wire).unwrap();
    assert_eq!(s.state(), MigState::Stop);
    m.complete().unwrap();
    assert_eq!(
        s.state(),
        MigState::Stop,
        "a completed source stays stopped"
    );
    assert_eq!(
        *s.transitions.lock().unwrap(),
        vec![
            (MigState::Running, MigState::PreCopy),
            (MigState::PreCopy, MigState::PreCopyP2p),
            (MigState::PreCopyP2p, MigState::StopCopy),
            (MigState::StopCopy, MigState::Stop),
        ]
    );
    let summary = check_stream(&wire[..], MAX_DEVICE_DATA).unwrap();
    assert_eq!(summary.stream_bytes, wire.len() as u64);
    assert_eq!(summary.device_data_bytes, 2 * STATE_LEN as u64);

    // A destination VMM of its own, its device fresh (BAR 0 where its
    // allocator put it, MSI-X off).
    let dst_vm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&dst_vm, &d);
    assert_ne!(guest_view(&dst), before);
    dst.resume_migration(&wire[..]).unwrap();
    assert_eq!(d.state(), MigState::Running);
    assert_eq!(
        guest_view(&dst),
        before,
        "config space, MSI-X table, BAR placement"
    );
    assert_eq!(
        dst.irq_mode(),
        IrqMode::Msix,
        "MSI-X wired through VFIO again"
    );
    assert_eq!(d.regs(), s.regs(), "the device's own state, as stopped");
    assert_eq!(&d.regs()[..22], b"changed after pre-copy");
    // The guest's BAR 0 is mapped where the source had it.
    let (base, _, _) = bar0(&dst);
    assert_eq!(
        dst.bar_at(base + 8, vfio_pci::AddressSpace::Memory),
        Some((BarIndex::Bar(0), 8))
    );
}

#[test]
fn a_masked_vector_that_fired_on_the_source_is_pending_on_the_destination_and_delivered_on_unmask()
{
    let src_vm = Vm::new();
    let s = MigDouble::all();
    let src = programmed_source(&src_vm, &s);
    let (_, table, pba) = bar0(&src);
    // Vector 2 masked, then raised by the device (its doorbell): pending.
    bar_write32(&src, 0, table + 16 * 2 + 12, 1);
    bar_write32(
        &src,
        0,
        nvme_like::DOORBELLS + 2 * nvme_like::DOORBELL_STRIDE,
        1,
    );
    assert_eq!(bar_read32(&src, 0, pba), 1 << 2);

    let mut wire = Vec::new();
    let mut m = src.start_migration().unwrap();
    m.stop_and_copy(&mut wire).unwrap();
    m.complete().unwrap();

    let dst_vm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&dst_vm, &d);
    dst.resume_migration(&wire[..]).unwrap();
    let g = group_with(&dst_vm, nvme_like::MSIX_VECTORS);
    assert_eq!(
        bar_read32(&dst, 0, pba),
        1 << 2,
        "pending on the destination"
    );
    assert_eq!(g.take_delivered(2), 0, "not delivered while masked");
    bar_write32(&dst, 0, table + 16 * 2 + 12, 0);
    assert_eq!(
        g.take_delivered(2),
        1,
        "delivered once the guest unmasks it"
    );
    assert_eq!(bar_read32(&dst, 0, pba), 0);
    assert_eq!(g.violations(), 0);
}

#[test]
fn a_stop_copy_only_device_migrates_and_refuses_precopy_and_quiesce_without_aborting() {
    let vm = Vm::new();
    let s = MigDouble::new(Some(MigrationFlags::STOP_COPY));
    let src = programmed_source(&vm, &s);
    let mut wire = Vec::new();
    let mut m = src.start_migration().unwrap();
    assert_eq!(s.state(), MigState::Running, "no PRE_COPY: it just runs");
    assert!(matches!(
        m.precopy(&mut wire),
        Err(Error::MigrationFeature {
            feature: "PRE_COPY"
        })
    ));
    assert!(matches!(
        m.quiesce(),
        Err(Error::MigrationFeature { feature: "P2P" })
    ));
    assert!(wire.is_empty());
    m.stop_and_copy(&mut wire).unwrap();
    m.complete().unwrap();
    let d = MigDouble::new(Some(MigrationFlags::STOP_COPY));
    let dst_vm = Vm::new();
    let dst = attach_double(&dst_vm, &d);
    dst.resume_migration(&wire[..]).unwrap();
    assert_eq!(d.regs(), s.regs());
}

/// The steps of a migration, in order; abort after `n` of them.
fn run_steps(m: &mut vfio_pci::MigrationSource<'_>, n: usize, out: &mut Vec<u8>) {
    if n > 0 {
        m.precopy(out).unwrap();
    }
    if n > 1 {
        m.quiesce().unwrap();
    }
    if n > 2 {
        m.stop_and_copy(out).unwrap();
    }
}

#[test]
fn abort_after_each_step_leaves_the_source_running_with_its_guest_state() {
    for steps in 0..=3 {
        for by_drop in [false, true] {
            let vm = Vm::new();
            let s = MigDouble::all();
            let src = programmed_source(&vm, &s);
            let before = guest_view(&src);
            let regs = s.regs();
            let mut out = Vec::new();
            let mut m = src.start_migration().unwrap();
            run_steps(&mut m, steps, &mut out);
            assert_ne!(s.state(), MigState::Running);
            if by_drop {
                drop(m);
            } else {
                m.abort().unwrap();
            }
            assert_eq!(
                s.state(),
                MigState::Running,
                "after {steps} steps (drop: {by_drop})"
            );
            assert_eq!(guest_view(&src), before);
            assert_eq!(s.regs(), regs);
            assert_eq!(src.irq_mode(), IrqMode::Msix);
            // It can migrate again.
            let mut m = src.start_migration().unwrap();
            m.stop_and_copy(&mut Vec::new()).unwrap();
            m.abort().unwrap();
            assert_eq!(s.state(), MigState::Running);
        }
    }
}

struct FailingWriter;

impl std::io::Write for FailingWriter {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(libc::EPIPE))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_step_aborts_the_migration_and_leaves_the_source_running() {
    // The device refuses STOP_COPY.
    let vm = Vm::new();
    let s = MigDouble::all();
    let src = programmed_source(&vm, &s);
    let before = guest_view(&src);
    let mut m = src.start_migration().unwrap();
    s.fail_transition_to(MigState::StopCopy, false);
    let e = m.stop_and_copy(&mut Vec::new()).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO));
    assert_eq!(s.state(), MigState::Running);
    assert!(matches!(
        m.stop_and_copy(&mut Vec::new()),
        Err(Error::MigrationPhase { .. })
    ));
    assert_eq!(guest_view(&src), before);
    drop(m);

    // The stream's writer fails (the VMM's connection broke).
    let mut m = src.start_migration().unwrap();
    let e = m.precopy(&mut FailingWriter).unwrap_err();
    assert!(matches!(e, Error::MigrationIo { .. }));
    assert_eq!(e.errno(), Some(libc::EPIPE));
    assert_eq!(s.state(), MigState::Running);
    drop(m);

    // Reading the device's state fails.
    let mut m = src.start_migration().unwrap();
    s.fail_reads(true);
    assert!(m.stop_and_copy(&mut Vec::new()).is_err());
    s.fail_reads(false);
    assert_eq!(s.state(), MigState::Running);
    drop(m);

    // The device refuses to go back and lands in ERROR: it is reset,
    // and runs.
    let mut m = src.start_migration().unwrap();
    m.quiesce().unwrap();
    s.fail_transition_to(MigState::Running, true);
    assert!(m.abort().is_err());
    assert_eq!(s.state(), MigState::Running);
    assert_eq!(s.resets.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn one_migration_at_a_time_and_only_from_running() {
    let vm = Vm::new();
    let s = MigDouble::new(Some(MigrationFlags::STOP_COPY));
    let src = programmed_source(&vm, &s);
    let m = src.start_migration().unwrap();
    // A second migration, or a resume, while the first handle lives (the
    // device is still RUNNING: no PRE_COPY).
    assert!(matches!(
        src.start_migration(),
        Err(Error::MigrationPhase { .. })
    ));
    let (stream, _) = a_stream();
    assert!(matches!(
        src.resume_migration(&stream[..]),
        Err(Error::MigrationPhase { .. })
    ));
    drop(m);
    // Completed: the device stays stopped, and is not migrated again.
    let mut m = src.start_migration().unwrap();
    m.stop_and_copy(&mut Vec::new()).unwrap();
    m.complete().unwrap();
    assert!(matches!(
        src.start_migration(),
        Err(Error::MigrationDeviceState {
            state: MigState::Stop,
            expected: MigState::Running
        })
    ));
}

/// Where a destination's state can be seen to be untouched.
fn untouched(d: &MigDouble, dev: &VfioPciDevice, view: &(Vec<u8>, Vec<u32>, Vec<Option<u64>>)) {
    assert_eq!(d.state(), MigState::Running);
    assert!(d.transitions.lock().unwrap().is_empty(), "no transition");
    assert_eq!(d.resets.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(&guest_view(dev), view);
    assert_eq!(d.regs(), vec![0u8; STATE_LEN]);
}

/// The chunk boundaries of a stream: (header start, payload start, end).
fn chunks(stream: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut at = 16;
    let mut out = Vec::new();
    while at < stream.len() {
        let len = u32::from_le_bytes(stream[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push((at, at + 12, at + 12 + len + 4));
        at += 12 + len + 4;
    }
    assert_eq!(at, stream.len());
    out
}

#[test]
fn a_corrupted_stream_is_refused_before_the_destination_is_touched() {
    let (stream, _) = a_stream();
    let vm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&vm, &d);
    let view = guest_view(&dst);
    let cs = chunks(&stream);
    assert_eq!(cs.len(), 4, "IDENTITY, DEVICE_DATA, EMULATED, END");
    // Every byte of the prefix, of each chunk header (kind, sequence,
    // length) and CRC; payload bytes at a stride, their first and last.
    let mut positions: Vec<usize> = (0..16).collect();
    for &(h, p, end) in &cs {
        positions.extend(h..p);
        positions.extend(end - 4..end);
        positions.extend((p..end - 4).step_by(61));
        positions.push(end - 5);
    }
    for pos in positions {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = stream.clone();
            bad[pos] ^= flip;
            let e = dst.resume_migration(&bad[..]).unwrap_err();
            assert!(
                matches!(e, Error::MigrationStream { .. }),
                "byte {pos} ^ {flip:#x}: {e}"
            );
            untouched(&d, &dst, &view);
        }
    }
    // A chunk moved: sequence numbers catch it before the CRC does not.
    let (_, _, id_end) = cs[0];
    let (data_h, _, data_end) = cs[1];
    let mut swapped = stream[..id_end].to_vec();
    swapped.extend_from_slice(&stream[cs[2].0..cs[2].2]);
    swapped.extend_from_slice(&stream[data_h..data_end]);
    swapped.extend_from_slice(&stream[cs[3].0..]);
    assert!(matches!(
        dst.resume_migration(&swapped[..]),
        Err(Error::MigrationStream {
            fault: StreamFault::Sequence { .. },
            ..
        })
    ));
    untouched(&d, &dst, &view);
    // And the intact stream still loads.
    dst.resume_migration(&stream[..]).unwrap();
}

#[test]
fn a_truncated_stream_is_refused_at_every_length_before_the_destination_is_touched() {
    let (stream, _) = a_stream();
    let vm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&vm, &d);
    let view = guest_view(&dst);
    for len in 0..stream.len() {
        let e = dst.resume_migration(&stream[..len]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::MigrationStream {
                    fault: StreamFault::Truncated,
                    ..
                }
            ),
            "{len} bytes: {e}"
        );
        if len % 512 == 0 {
            untouched(&d, &dst, &view);
        }
    }
    untouched(&d, &dst, &view);
}

#[test]
fn a_stream_of_another_kind_of_device_is_refused_with_the_difference() {
    let (stream, _) = a_stream();
    let vm = Vm::new();
    let d = MigDouble::over(
        Arc::new(FakeDevice::profile("edu").unwrap()),
        Some(MigrationFlags::STOP_COPY),
    );
    let dst = attach_double(&vm, &d);
    let e = dst.resume_migration(&stream[..]).unwrap_err();
    match e {
        Error::MigrationMismatch { reason } => {
            assert!(reason.contains("vendor/device"), "{reason}")
        }
        e => panic!("{e}"),
    }
    assert_eq!(d.state(), MigState::Running);
    assert!(d.transitions.lock().unwrap().is_empty());
    // Same ids, different BAR layout: the nvme-like device with a page
    // size that enlarges nothing is equal; one with MSI-X hidden is not.
    let d2 = MigDouble::all();
    let dst2 = VfioPciDevice::new(
        d2.clone() as Arc<dyn Vfio>,
        vm.resources(),
        DeviceOptions::default().with_hidden_capabilities([0x11u8]),
    )
    .unwrap();
    assert!(matches!(
        dst2.resume_migration(&stream[..]),
        Err(Error::MigrationMismatch { .. })
    ));
    assert!(d2.transitions.lock().unwrap().is_empty());
}

#[test]
fn a_state_the_device_refuses_leaves_the_destination_reset_and_running() {
    let (stream, _) = a_stream();
    let vm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&vm, &d);
    // The device fails to load its state (RESUMING -> STOP) into ERROR.
    d.fail_transition_to(MigState::Stop, true);
    let e = dst.resume_migration(&stream[..]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO));
    assert_eq!(d.state(), MigState::Running);
    assert_eq!(d.resets.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Reset as by reset(): decoding and bus mastering off, no interrupts.
    assert_eq!(cfg_read16(&dst, 4) & 0x7, 0);
    assert_eq!(dst.irq_mode(), IrqMode::Intx);
    // The same stream loads once the device takes it.
    dst.resume_migration(&stream[..]).unwrap();
    assert_eq!(d.state(), MigState::Running);
}

#[test]
fn streams_of_several_devices_follow_each_other_in_one_reader() {
    // Two devices of one VMM: quiesce both, then stop both (P2P order).
    let vm = Vm::new();
    let (a, b) = (MigDouble::all(), MigDouble::all());
    let (da, db) = (programmed_source(&vm, &a), attach_double(&vm, &b));
    b.set_regs(0, b"second device");
    let mut wire = Vec::new();
    let mut ma = da.start_migration().unwrap();
    let mut mb = db.start_migration().unwrap();
    ma.quiesce().unwrap();
    mb.quiesce().unwrap();
    assert_eq!(
        (a.state(), b.state()),
        (MigState::PreCopyP2p, MigState::PreCopyP2p)
    );
    ma.stop_and_copy(&mut wire).unwrap();
    mb.stop_and_copy(&mut wire).unwrap();
    ma.complete().unwrap();
    mb.complete().unwrap();

    let dvm = Vm::new();
    let (x, y) = (MigDouble::all(), MigDouble::all());
    let (dx, dy) = (attach_double(&dvm, &x), attach_double(&dvm, &y));
    // Load both, quiesced, then run both.
    let mut r = &wire[..];
    let lx = dx.load_migration(&mut r).unwrap();
    let ly = dy.load_migration(&mut r).unwrap();
    assert!(r.is_empty());
    assert_eq!(
        (x.state(), y.state()),
        (MigState::RunningP2p, MigState::RunningP2p)
    );
    lx.run().unwrap();
    ly.run().unwrap();
    assert_eq!(
        (x.state(), y.state()),
        (MigState::Running, MigState::Running)
    );
    assert_eq!(x.regs(), a.regs());
    assert_eq!(y.regs(), b.regs());
    assert_eq!(guest_view(&dx), guest_view(&da));
}

#[test]
fn a_loaded_migration_dropped_without_running_resets_the_device_and_runs_it() {
    let (stream, _) = a_stream();
    let vm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&vm, &d);
    let loaded = dst.load_migration(&stream[..]).unwrap();
    assert_eq!(d.state(), MigState::RunningP2p);
    assert_eq!(dst.irq_mode(), IrqMode::Msix, "our state is loaded");
    drop(loaded);
    assert_eq!(d.state(), MigState::Running);
    assert_eq!(d.resets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_ne!(dst.irq_mode(), IrqMode::Msix);
    // Without P2P, a loaded device waits in STOP.
    let s = MigDouble::new(Some(MigrationFlags::STOP_COPY));
    let svm = Vm::new();
    let src = programmed_source(&svm, &s);
    let mut wire = Vec::new();
    let mut m = src.start_migration().unwrap();
    m.stop_and_copy(&mut wire).unwrap();
    m.complete().unwrap();
    let d = MigDouble::new(Some(MigrationFlags::STOP_COPY));
    let dvm = Vm::new();
    let dst = attach_double(&dvm, &d);
    let loaded = dst.load_migration(&wire[..]).unwrap();
    assert_eq!(d.state(), MigState::Stop);
    loaded.run().unwrap();
    assert_eq!(d.state(), MigState::Running);
    assert_eq!(d.regs(), s.regs());
}

#[test]
fn without_a_precopy_estimate_a_round_reads_until_the_device_has_nothing_more() {
    let vm = Vm::new();
    let s = MigDouble::all();
    s.without_estimate();
    let src = programmed_source(&vm, &s);
    let mut wire = Vec::new();
    let mut m = src.start_migration().unwrap();
    let left = m.precopy(&mut wire).unwrap();
    assert_eq!((left.initial_bytes, left.dirty_bytes), (0, 0));
    let summary_len = wire.len();
    assert!(summary_len > STATE_LEN, "the initial state was sent");
    // Nothing new: the next round sends nothing.
    m.precopy(&mut wire).unwrap();
    assert_eq!(wire.len(), summary_len);
    m.stop_and_copy(&mut wire).unwrap();
    m.complete().unwrap();
    let summary = check_stream(&wire[..], MAX_DEVICE_DATA).unwrap();
    assert_eq!(summary.device_data_bytes, 2 * STATE_LEN as u64);
    let dvm = Vm::new();
    let d = MigDouble::all();
    let dst = attach_double(&dvm, &d);
    dst.resume_migration(&wire[..]).unwrap();
    assert_eq!(d.regs(), s.regs());
}
