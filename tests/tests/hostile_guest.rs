//! A guest that writes garbage everywhere: config space (any offset, any
//! size, valid or not) and every BAR (registers, doorbells, the MSI-X
//! table and PBA, mapped memory, past the end). The VMM keeps running with
//! its invariants intact, and after a reset the device works again.
//! Property-based, once per backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::*;
use vfio_fake_device::{edu, nvme_like};
use vfio_pci::{BarIndex, VfioPciDevice};

#[derive(Clone, Debug)]
enum Poke {
    CfgWrite {
        off: u64,
        len: usize,
        val: u64,
    },
    CfgRead {
        off: u64,
        len: usize,
    },
    /// `off` is reduced modulo the BAR's guest size plus a little, so that
    /// every part of the BAR and just past its end is hit.
    BarWrite {
        bar: usize,
        off: u32,
        len: usize,
        val: u64,
    },
    BarRead {
        bar: usize,
        off: u32,
        len: usize,
    },
}

fn access_len() -> impl Strategy<Value = usize> {
    // 3 and 8 are not valid config accesses; 3 is not a valid BAR access.
    prop_oneof![Just(1usize), Just(2), Just(3), Just(4), Just(8)]
}

fn cfg_offset() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..0x100, 1 => 0u64..0x1004, 1 => any::<u64>()]
}

fn poke() -> impl Strategy<Value = Poke> {
    prop_oneof![
        3 => (cfg_offset(), access_len(), any::<u64>())
            .prop_map(|(off, len, val)| Poke::CfgWrite { off, len, val }),
        1 => (cfg_offset(), access_len()).prop_map(|(off, len)| Poke::CfgRead { off, len }),
        3 => (0usize..8, any::<u32>(), access_len(), any::<u64>())
            .prop_map(|(bar, off, len, val)| Poke::BarWrite { bar, off, len, val }),
        1 => (0usize..8, any::<u32>(), access_len())
            .prop_map(|(bar, off, len)| Poke::BarRead { bar, off, len }),
    ]
}

fn bar_offset(dev: &VfioPciDevice, bar: usize, off: u32) -> u64 {
    let size = dev
        .bars()
        .into_iter()
        .find(|b| b.index == bar_index(bar))
        .map_or(0x1000, |b| b.guest_size);
    u64::from(off) % (size + 64)
}

/// Applies one poke as the VMM's bus would hand it to the device. Results
/// are whatever they are: the point is that nothing breaks. A config write
/// the device takes must report what it changed: a bus that follows its
/// outcome routes every BAR where the device decodes it.
fn apply(dev: &VfioPciDevice, p: &Poke) {
    match *p {
        Poke::CfgWrite { off, len, val } => {
            let mut bus = decoded_bars(dev);
            if let Ok(outcome) = dev.write_config(off, &val.to_le_bytes()[..len]) {
                follow(&mut bus, &outcome);
                assert_eq!(
                    bus,
                    decoded_bars(dev),
                    "outcome {outcome:x?} of a write at {off:#x}"
                );
            }
        }
        Poke::CfgRead { off, len } => {
            let mut b = [0u8; 8];
            dev.read_config(off, &mut b[..len]);
        }
        Poke::BarWrite { bar, off, len, val } => {
            let off = bar_offset(dev, bar, off);
            let _ = dev.write_bar(bar_index(bar), off, &val.to_le_bytes()[..len]);
        }
        Poke::BarRead { bar, off, len } => {
            let off = bar_offset(dev, bar, off);
            let mut b = [0u8; 8];
            dev.read_bar(bar_index(bar), off, &mut b[..len]);
        }
    }
}

/// What the VMM must always hold: BARs naturally aligned inside its
/// windows, the guest reading where each BAR really is, guest mappings
/// only inside BARs and never overlapping.
fn check_vmm(vm: &Vm, dev: &VfioPciDevice) {
    let g = Guest::new(dev, vm);
    let bars = dev.bars();
    for b in &bars {
        let base = b.base.expect("a memory BAR lost its placement");
        assert_eq!(base % b.guest_size, 0, "{} at {base:#x}", b.index);
        let in32 = base >= MMIO32_BASE && base + b.guest_size <= MMIO32_BASE + MMIO32_SIZE;
        let in64 = base >= MMIO64_BASE && base + b.guest_size <= MMIO64_BASE + MMIO64_SIZE;
        assert!(in32 || in64, "{} at {base:#x} outside the windows", b.index);
    }
    let mut live = vm.mapper.live();
    live.sort_unstable();
    for w in live.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "overlapping guest mappings {live:x?}"
        );
    }
    register_and_decode_agree(vm, dev, &g);
    // Whatever the guest wrote to a BAR register (a 64-bit BAR may hold a
    // half-written address), once it turns decoding on the BAR decodes where
    // the register says, or nowhere.
    let cmd = g.cfg16(COMMAND);
    g.cfg_write16(COMMAND, cmd & !CMD_MEM);
    register_and_decode_agree(vm, dev, &g);
    g.cfg_write16(COMMAND, cmd | CMD_MEM);
    register_and_decode_agree(vm, dev, &g);
}

/// The guest's address in BAR `index`'s register.
fn register_address(g: &Guest<'_>, index: BarIndex) -> u64 {
    match index {
        BarIndex::Rom => u64::from(g.cfg32(0x30) & 0xffff_f800),
        BarIndex::Bar(n) => g.bar_address(usize::from(n)),
    }
}

/// BAR slot `n` (6: the ROM); past that, a BAR number that names no BAR.
fn bar_index(n: usize) -> BarIndex {
    BarIndex::from_slot(n).unwrap_or(BarIndex::Bar(n as u8))
}

/// Register and decode agree: a BAR that decodes anywhere (found by the bus dispatch
/// `bar_at`, mapped) decodes at the address its register holds; a BAR whose register holds
/// anything else decodes nowhere; every guest mapping lies in a decoding BAR.
fn register_and_decode_agree(vm: &Vm, dev: &VfioPciDevice, g: &Guest<'_>) {
    let bars = dev.bars();
    let mut decoding = Vec::new();
    for b in &bars {
        let Some(base) = b.base else { continue };
        let found = dev.bar_at(base, b.space()) == Some((b.index, 0));
        assert_eq!(
            found, b.decoding,
            "{}: bar_at and decoding disagree",
            b.index
        );
        if found {
            let reg = register_address(g, b.index);
            assert_eq!(
                reg, base,
                "{} decodes at {base:#x} but its register holds {reg:#x}",
                b.index
            );
            decoding.push((base, b.guest_size));
        } else {
            assert!(
                b.mapped.is_empty(),
                "{} decodes nowhere but is mapped",
                b.index
            );
        }
    }
    for (gpa, len) in vm.mapper.live() {
        assert!(
            decoding
                .iter()
                .any(|&(x, size)| gpa >= x && gpa + len <= x + size),
            "guest mapping {gpa:#x}+{len:#x} outside every decoding BAR"
        );
    }
}

fn garbage_case(kind: BackendKind, profile: &str, pokes: &[Poke]) {
    let b = Backend::new(kind, profile);
    let vm = Vm::new();
    let mem = guest_ram();
    let dev = vm.attach(&b);
    let g = Guest::new(&dev, &vm);
    // A driver had the device up when the garbage started.
    match profile {
        "edu" => {
            edu_up(&g, &mem);
        }
        _ => {
            dev.guest_dma().add_memory(&mem).unwrap();
            nvme_up(&g);
        }
    }
    for p in pokes {
        apply(&dev, p);
        register_and_decode_agree(&vm, &dev, &g);
    }
    check_vmm(&vm, &dev);

    dev.reset().unwrap();
    check_vmm(&vm, &dev);
    let e = g.enumerate(&mut Firmware::new());
    let bar = g.bar_address(0);
    assert_eq!(dev.bars()[0].base, Some(bar));
    assert_eq!(e.bars.len(), 1);
    match profile {
        "edu" => {
            assert_eq!(e.bar(0).size, edu::BAR_SIZE);
            assert_eq!(g.mmio_read32(bar + edu::ID), edu::ID_VALUE);
            g.mmio_write32(bar + edu::FACTORIAL, 5);
            assert_eq!(g.mmio_read32(bar + edu::FACTORIAL), 120);
            g.enable_msi(e.cap(cap_id::MSI).unwrap(), MSI_ADDR, 0x42);
            let grp = vm.group(&dev.msi_group().unwrap());
            // Signals the garbage left latched are not the guest's business.
            grp.take_signals(0);
            edu_round_trip(&g, &mem, &grp, bar, 9);
        }
        _ => {
            assert_eq!(e.bar(0).size, nvme_like::BAR0_SIZE);
            assert_eq!(g.mmio_read64(bar + nvme_like::CAP), nvme_like::CAP_VALUE);
            let cap = e.cap(cap_id::MSIX).unwrap();
            let (table, _) = g.msix_table(cap);
            g.msix_program(table, 6, MSI_ADDR, 0x66, false);
            g.msix_control(cap, true, false);
            let grp = vm.group(&dev.msix_group().unwrap());
            grp.take_signals(6);
            ring(&g, bar, 6);
            assert_eq!(wait_delivered(&grp, 6), 1);
        }
    }
}

fn run(kind: BackendKind) {
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![Just("edu"), Just("nvme-like")],
        proptest::collection::vec(poke(), 1..200),
    );
    runner
        .run(&strategy, |(profile, pokes)| {
            garbage_case(kind, profile, &pokes);
            Ok(())
        })
        .unwrap();
}

both_backends! {
    fn garbage_everywhere_leaves_the_vmm_intact_and_the_device_usable_after_reset(kind: BackendKind) {
        run(kind);
    }
}
