//! Broken devices: each gets a clear error or a documented graceful
//! degradation, and the guest never walks into a loop or outside config
//! space.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_backend::user::UserOptions;
use vfio_backend::Vfio;
use vfio_bench::guest::*;
use vfio_bench::malformed::{Case, PatchedDevice};
use vfio_bench::user::serve_pair;
use vfio_bench::vmm::Vm;
use vfio_fake_device::FakeDevice;
use vfio_pci::VfioPciDevice;

fn attach(case: Case) -> (Vm, Arc<FakeDevice>, vfio_pci::Result<VfioPciDevice>) {
    let (dev, fake) = case.build().unwrap();
    let vm = Vm::new().unwrap();
    let r = VfioPciDevice::new(
        dev as Arc<dyn Vfio>,
        vm.resources(),
        vfio_pci::DeviceOptions::default().with_page_size(4096),
    );
    (vm, fake, r)
}

/// A capability chain as the guest walks it: (id, offset).
type Chain<Id> = Vec<(Id, u64)>;

/// The chain of the sound device the case was made from, as a guest sees it.
fn sound_chain(fake: &Arc<FakeDevice>) -> (Chain<u8>, Chain<u16>) {
    let sound = Arc::new(FakeDevice::new(fake.template().clone()).unwrap());
    let vm = Vm::new().unwrap();
    let d = vm.attach(sound).unwrap();
    (walk_caps(&d), walk_ext_caps(&d))
}

fn distinct<T: std::hash::Hash + Eq + Copy>(v: &[(T, u64)]) -> bool {
    v.iter().map(|c| c.1).collect::<HashSet<_>>().len() == v.len()
}

/// Bytes a standard capability occupies, by id (PCI Local Bus 3.0 / PCIe).
fn std_cap_len(dev: &VfioPciDevice, id: u8, off: u64) -> u64 {
    match id {
        0x01 => 8,
        0x05 => {
            let ctl = cfg_read16(dev, off + 2);
            let mut len = if ctl & 0x80 != 0 { 0x0e } else { 0x0a };
            if ctl & 0x100 != 0 {
                len += 0x0a;
            }
            len
        }
        0x10 => 0x3c,
        0x11 => 12,
        _ => 2,
    }
}

#[test]
fn a_standard_capability_loop_ends_the_guest_chain_before_the_loop() {
    let (_vm, fake, dev) = attach(Case::StdCapLoop);
    let dev = dev.expect("a capability loop is degraded, not fatal");
    let caps = walk_caps(&dev);
    let (sound, _) = sound_chain(&fake);
    assert!(distinct(&caps), "guest chain repeats an offset: {caps:x?}");
    // The device's second capability points back at its first: what the
    // guest sees is the chain up to that point, ended with a 0 pointer.
    assert_eq!(caps, sound[..2].to_vec());
    assert_eq!(cfg_read8(&dev, caps[1].1 + 1), 0);
}

#[test]
fn an_extended_capability_loop_ends_the_guest_chain_before_the_loop() {
    let (_vm, fake, dev) = attach(Case::ExtCapLoop);
    let dev = dev.expect("a capability loop is degraded, not fatal");
    let ext = walk_ext_caps(&dev);
    let (_, sound) = sound_chain(&fake);
    assert!(distinct(&ext), "guest chain repeats an offset: {ext:x?}");
    assert!(!ext.is_empty());
    assert_eq!(ext, sound[..ext.len()].to_vec());
}

#[test]
fn a_standard_capability_pointing_into_the_header_ends_the_chain_there() {
    let (_vm, fake, dev) = attach(Case::StdCapIntoHeader);
    let dev = dev.expect("a bad pointer is degraded, not fatal");
    let caps = walk_caps(&dev);
    let (sound, _) = sound_chain(&fake);
    assert_eq!(caps, sound[..1].to_vec());
    // The guest reads a 0 next pointer, not the pointer into the header.
    assert_eq!(cfg_read8(&dev, caps[0].1 + 1), 0);
}

#[test]
fn a_capability_inside_the_msix_registers_ends_the_guest_chain_at_msix() {
    let (_vm, fake, dev) = attach(Case::StdCapInsideMsix);
    let dev = dev.expect("capabilities sharing registers are degraded, not fatal");
    let caps = walk_caps(&dev);
    let (sound, _) = sound_chain(&fake);
    let msix = sound.iter().position(|c| c.0 == 0x11).unwrap();
    // The chain up to MSI-X is the device's; MSI-X ends it, and stays
    // emulated with all its vectors.
    assert_eq!(caps, sound[..=msix].to_vec());
    assert_eq!(cfg_read8(&dev, sound[msix].1 + 1), 0);
    let sound_vm = Vm::new().unwrap();
    let sound_dev = sound_vm
        .attach(Arc::new(FakeDevice::new(fake.template().clone()).unwrap()))
        .unwrap();
    assert!(sound_dev.msix_vectors() > 0);
    assert_eq!(dev.msix_vectors(), sound_dev.msix_vectors());
    // No capability the guest sees starts inside another's registers.
    for (i, &(id, off)) in caps.iter().enumerate() {
        for &(_, other) in &caps[i + 1..] {
            assert!(
                other < off || other >= off + std_cap_len(&dev, id, off),
                "capability at {other:#x} lies inside {id:#x} at {off:#x}"
            );
        }
    }
}

#[test]
fn an_extended_capability_pointing_below_0x100_ends_the_chain_there() {
    let (_vm, _fake, dev) = attach(Case::ExtCapIntoStandard);
    let dev = dev.expect("a bad pointer is degraded, not fatal");
    let ext = walk_ext_caps(&dev);
    assert_eq!(ext, vec![(0x0001, 0x100)], "AER only: {ext:x?}");
}

#[test]
fn no_capability_the_guest_sees_runs_past_the_standard_area() {
    let (_vm, fake, dev) = attach(Case::StdCapPastEnd);
    let dev = dev.expect("a capability past the end is degraded, not fatal");
    for (id, off) in walk_caps(&dev) {
        assert!(
            off + std_cap_len(&dev, id, off) <= 0x100,
            "capability {id:#x} at {off:#x} runs past 0xff"
        );
    }
    // MSI-X is left out and says why; the extended chain over which its
    // body would lie is the device's, unchanged.
    assert_eq!(dev.msix_vectors(), 0);
    assert!(dev
        .hidden_capabilities()
        .iter()
        .any(|h| h.id == 0x11 && !h.extended));
    let (_, sound_ext) = sound_chain(&fake);
    assert_eq!(walk_ext_caps(&dev), sound_ext);
}

#[test]
fn an_extended_capability_past_the_end_reads_all_ones_beyond_config_space() {
    let (_vm, _fake, dev) = attach(Case::ExtCapPastEnd);
    let dev = dev.expect("a capability past the end is degraded, not fatal");
    let ext = walk_ext_caps(&dev);
    assert!(distinct(&ext));
    assert_eq!(ext.last(), Some(&(0x0001, 0xffc)));
    // Its body would lie past 4 KiB: reads there fail as all ones.
    let mut b = [0u8; 4];
    dev.read_config(0x1000, &mut b);
    assert_eq!(b, [0xff; 4]);
    // ... and a 4-byte read straddling the end is refused whole.
    let mut b = [0u8; 4];
    dev.read_config(0xffe, &mut b);
    assert_eq!(b, [0xff; 4]);
}

fn msix_left_out(case: Case) {
    let (_vm, _fake, dev) = attach(case);
    let dev = dev.unwrap_or_else(|e| panic!("{}: {e}", case.name()));
    assert_eq!(dev.msix_vectors(), 0, "{}", case.name());
    assert_eq!(find_cap(&dev, cap_id::MSIX), None, "{}", case.name());
    let why = dev
        .hidden_capabilities()
        .iter()
        .find(|h| h.id == 0x11 && !h.extended)
        .map(|h| h.reason.clone())
        .unwrap_or_default();
    assert!(why.contains("outside the BAR"), "{}: {why}", case.name());
    // MSI remains for the driver to fall back on, and BAR 0 is whole.
    assert!(find_cap(&dev, cap_id::MSI).is_some(), "{}", case.name());
    assert_eq!(size_bar(&dev, 0).unwrap(), 16 << 10, "{}", case.name());
}

#[test]
fn msix_naming_a_missing_bar_is_left_out_and_msi_remains() {
    msix_left_out(Case::MsixBirMissingBar);
}

#[test]
fn msix_with_a_reserved_bir_is_left_out_and_msi_remains() {
    msix_left_out(Case::MsixBirReserved);
}

#[test]
fn an_msix_table_larger_than_its_bar_is_left_out_and_msi_remains() {
    msix_left_out(Case::MsixTableLargerThanBar);
}

#[test]
fn a_64_bit_bar_in_bar5_is_left_out_and_reads_as_unimplemented() {
    let (_vm, _fake, dev) = attach(Case::Bar5Is64Bit);
    let dev = dev.expect("BAR 5 is degraded, not fatal");
    // PCI 3.0 6.2.5.1: an unimplemented BAR is hardwired to zero.
    assert_eq!(size_bar(&dev, 5).unwrap(), 0);
    assert_eq!(cfg_read32(&dev, 0x24), 0);
    assert_eq!(size_bar(&dev, 0).unwrap(), 0x1000);
    assert!(dev
        .bars()
        .iter()
        .all(|b| b.index != vfio_pci::BarIndex::Bar(5)));
}

#[test]
fn a_zero_size_bar_is_left_out_and_reads_as_unimplemented() {
    let (_vm, _fake, dev) = attach(Case::ZeroSizeBar);
    let dev = dev.expect("a zero-size BAR is degraded, not fatal");
    assert_eq!(size_bar(&dev, 2).unwrap(), 0);
    assert_eq!(size_bar(&dev, 0).unwrap(), 0x1000);
    assert!(dev
        .bars()
        .iter()
        .all(|b| b.index != vfio_pci::BarIndex::Bar(2)));
}

#[test]
fn a_zero_size_rom_means_no_rom_bar() {
    let (_vm, _fake, dev) = attach(Case::ZeroSizeRom);
    let dev = dev.expect("a zero-size ROM is degraded, not fatal");
    // PCI 3.0 6.2.5.2: a function without a ROM hardwires the ROM BAR to 0.
    cfg_write32(&dev, 0x30, 0xffff_f801).unwrap();
    assert_eq!(cfg_read32(&dev, 0x30), 0);
    assert!(dev
        .bars()
        .iter()
        .all(|b| b.index != vfio_pci::BarIndex::Rom));
}

#[test]
fn a_config_region_smaller_than_the_header_is_refused_with_a_clear_error() {
    let (vm, _fake, dev) = attach(Case::TinyConfigRegion);
    let e = dev.expect_err("no device without a header").to_string();
    assert!(e.contains("64-byte header"), "{e}");
    assert!(vm.mapper.live().is_empty());
}

#[test]
fn a_capability_chain_past_a_short_config_region_is_dropped_and_reads_zero() {
    let (_vm, _fake, dev) = attach(Case::ChainPastConfigRegion);
    let dev = dev.expect("a short config region is degraded, not fatal");
    assert_eq!(walk_caps(&dev), vec![]);
    assert_eq!(dev.msix_vectors(), 0);
    // Past the device's 128 bytes: emulated zeros, never a backend read.
    assert_eq!(cfg_read32(&dev, 0x80), 0);
    assert_eq!(cfg_read32(&dev, 0xfc), 0);
    // The header is still the device's.
    assert_eq!(cfg_read16(&dev, 0), 0x1234);
}

#[test]
fn a_device_that_never_answers_fails_attach_with_the_errno_and_leaks_nothing() {
    let (vm, _fake, dev) = attach(Case::DeadFromTheStart);
    let e = dev.expect_err("a dead device cannot attach");
    assert!(e.to_string().contains("Input/output error"), "{e}");
    assert!(vm.mapper.live().is_empty());
    assert!(vm.irqs.groups().is_empty());
}

#[test]
fn a_device_that_stops_answering_reads_all_ones_fails_writes_and_detaches_cleanly() {
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let vm = Vm::new().unwrap();
    let dev = vm.attach(fake.clone()).unwrap();
    enable_device(&dev).unwrap();
    let pcie = find_cap(&dev, cap_id::PCI_EXPRESS).unwrap();
    let (cap, bar, _) = msix_table(&dev).unwrap();
    fake.faults().set_dead(true);

    // A passed-through register reads as all ones, as from a removed device.
    assert_eq!(cfg_read32(&dev, pcie + 8), u32::MAX);
    // Trapped BAR registers too (nvme-like CAP at BAR0 + 0 is trapped).
    let mut b = [0u8; 4];
    dev.read_bar(bar_index(bar), 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Writes that must reach the device fail with the errno.
    let e = dev
        .write_bar(bar_index(bar), 0x14, &[1, 0, 0, 0])
        .unwrap_err();
    assert!(matches!(e, vfio_pci::Error::Backend { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::EIO), "{e}");
    // Enabling MSI-X needs VFIO: it fails, and says so.
    let e = msix_enable(&dev, cap, true).unwrap_err();
    assert!(matches!(e, vfio_pci::Error::Backend { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::EIO), "{e}");
    // Emulated registers still answer.
    assert_eq!(cfg_read16(&dev, 0), 0x1234);

    assert!(!vm.mapper.live().is_empty());
    drop(dev);
    assert!(vm.mapper.live().is_empty(), "guest mappings left behind");
}

#[test]
fn a_vfio_user_device_that_stops_answering_fails_each_access_within_the_timeout() {
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let options = UserOptions::default().with_timeout(Duration::from_millis(200));
    let served = serve_pair(fake.clone(), options).unwrap();
    let vm = Vm::new().unwrap();
    let dev = vm.attach(served.client.clone()).unwrap();
    let pcie = find_cap(&dev, cap_id::PCI_EXPRESS).unwrap();
    fake.faults().set_hang(Some(Duration::from_millis(600)));
    let t = Instant::now();
    assert_eq!(cfg_read32(&dev, pcie + 8), u32::MAX);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(550), "took {took:?}");
    fake.faults().set_hang(None);
    drop(dev);
    assert!(vm.mapper.live().is_empty());
}

/// What a guest and VMM can observe of an attached device.
fn observe(dev: &VfioPciDevice) -> String {
    format!(
        "caps {:x?} ext {:x?} kept {:?} hidden {:?} bars {:?} msix {}",
        walk_caps(dev),
        walk_ext_caps(dev),
        dev.kept_capabilities(),
        dev.hidden_capabilities(),
        dev.bars()
            .iter()
            .map(|b| (b.index, b.guest_size, b.kind))
            .collect::<Vec<_>>(),
        dev.msix_vectors()
    )
}

#[test]
fn every_broken_device_is_handled_the_same_over_vfio_user_as_in_process() {
    for case in Case::ALL {
        let (_vm, _fake, local) = attach(case);
        let (dev, _fake) = case.build().unwrap();
        let served = serve_pair(
            dev as Arc<dyn Vfio>,
            UserOptions::default().with_timeout(Duration::from_secs(5)),
        );
        let served = match served {
            Ok(s) => s,
            Err(e) => {
                // Only a device that answers nothing may fail to connect.
                assert_eq!(case, Case::DeadFromTheStart, "{}: {e}", case.name());
                continue;
            }
        };
        let vm = Vm::new().unwrap();
        let remote = vm.attach(served.client.clone());
        match (local, remote) {
            (Ok(l), Ok(r)) => assert_eq!(observe(&l), observe(&r), "{}", case.name()),
            (Err(_), Err(_)) => {}
            (l, r) => panic!(
                "{}: in-process {:?}, over vfio-user {:?}",
                case.name(),
                l.map(|d| observe(&d)),
                r.map(|d| observe(&d))
            ),
        }
    }
}

#[test]
fn patched_config_bytes_show_only_in_config_reads() {
    let fake = Arc::new(FakeDevice::profile("edu").unwrap());
    let p = PatchedDevice::new(fake.clone()).with_config(0x2c, &[0xaa, 0xbb]);
    let mut b = [0u8; 4];
    p.region_read(vfio_backend::region::CONFIG, 0x2c, &mut b)
        .unwrap();
    assert_eq!(&b[..2], &[0xaa, 0xbb]);
    let mut raw = [0u8; 4];
    fake.region_read(vfio_backend::region::CONFIG, 0x2c, &mut raw)
        .unwrap();
    assert_eq!(&b[2..], &raw[2..]);
    assert_ne!(&raw[..2], &[0xaa, 0xbb]);
}

#[test]
fn wrappers_forward_the_migration_methods_to_the_device() {
    // The fake device migrates (STOP_COPY, P2P, PRE_COPY); a wrapper that kept the trait's
    // defaults would say it cannot.
    use vfio_backend::MigState;
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let want = fake.migration_flags().unwrap();
    assert!(want.is_some_and(|f| f.stop_copy()));
    let wrappers: Vec<Arc<dyn Vfio>> = vec![
        Arc::new(PatchedDevice::new(fake.clone())),
        Arc::new(vfio_bench::counting::CountingVfio::new(fake.clone())),
        Arc::new(vfio_bench::hot::MirrorVfio::new(fake.clone()).unwrap()),
    ];
    for w in wrappers {
        assert_eq!(w.migration_flags().unwrap(), want);
        assert_eq!(w.mig_state().unwrap(), MigState::Running);
        assert!(w.set_mig_state(MigState::Stop).unwrap().is_none());
        assert_eq!(fake.mig_state().unwrap(), MigState::Stop);
        assert!(w.mig_data_size().is_ok());
        w.set_mig_state(MigState::Running).unwrap();
    }
}
