//! Behaviour of the fake device, checked against the PCI specs, the
//! kernel's vfio-pci uAPI semantics and QEMU's edu specification.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use vfio_backend::{irq, irq_flags, region, region_flags, Error, RegionCap, SparseArea, Vfio};
use vfio_fake_device::{
    cap_id, dma_engine, edu, ext_cap_id, nvme_like, BarSpec, Capability, DeviceTemplate, DmaFault,
    ExtCapability, FakeDevice, FakeError, Op, RegisterKind, ResizableBarEntry,
};

fn errno(r: Result<(), Error>) -> i32 {
    r.expect_err("expected an error").errno().unwrap()
}

/// Asserts that `r` is the backend's `InvalidArgument`, whose errno is EINVAL (what the kernel's
/// vfio-pci answers for an access outside a region or an unknown index).
#[track_caller]
fn assert_einval<T>(r: Result<T, Error>, what: &str) {
    match r {
        Err(e @ Error::InvalidArgument(_)) => assert_eq!(e.errno(), Some(libc::EINVAL), "{what}"),
        Err(e) => panic!("{what}: expected InvalidArgument, got {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

/// Asserts that `r` failed as a dead device does: `Refused` with EIO.
#[track_caller]
fn assert_eio<T>(r: Result<T, Error>, what: &str) {
    match r {
        Err(e @ Error::Refused { .. }) => assert_eq!(e.errno(), Some(libc::EIO), "{what}"),
        Err(e) => panic!("{what}: expected Refused (EIO), got {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

fn edu_device() -> FakeDevice {
    let d = FakeDevice::profile("edu").unwrap();
    enable_decoding(&d);
    d
}

fn nvme_device() -> FakeDevice {
    let d = FakeDevice::profile("nvme-like").unwrap();
    enable_decoding(&d);
    d
}

fn mixed_bars_template() -> DeviceTemplate {
    DeviceTemplate::builder()
        .ids(0x1af4, 0x10f0)
        .class(0x02, 0x00, 0x00)
        .interrupt_pin(1)
        .bar(0, BarSpec::mem32(0x2000))
        .bar(1, BarSpec::io(32))
        .bar(2, BarSpec::mem64(1 << 33).prefetchable())
        .rom(vec![0x55, 0xaa, 0x10])
        .build()
        .unwrap()
}

/// What a BAR register reads after an all-ones write, per the PCI Local
/// Bus spec 6.2.5.1: the size's address bits set, the low flag bits
/// unchanged.
fn sized_low(spec: BarSpec) -> u32 {
    let flags = match spec.kind {
        vfio_fake_device::BarKind::Io => 0x1,
        vfio_fake_device::BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
        vfio_fake_device::BarKind::Memory64 { prefetchable } => {
            0x4 | (u32::from(prefetchable) << 3)
        }
    };
    let low_bits = if spec.kind == vfio_fake_device::BarKind::Io {
        0x3
    } else {
        0xf
    };
    ((!(spec.size - 1)) as u32 & !low_bits) | flags
}

// ---------------------------------------------------------------- config

#[test]
fn bar_registers_answer_the_all_ones_sizing_protocol() {
    let t = mixed_bars_template();
    let d = FakeDevice::new(t.clone()).unwrap();
    for i in 0..6u64 {
        cfg_write32(&d, 0x10 + 4 * i, u32::MAX);
    }
    cfg_write32(&d, 0x30, u32::MAX);
    // Decode the sizes back the way a BIOS does.
    let b0 = cfg_read32(&d, 0x10);
    assert_eq!(b0, sized_low(t.bar(0).unwrap()));
    assert_eq!(u64::from(!(b0 & !0xf)) + 1, 0x2000);
    let b1 = cfg_read32(&d, 0x14);
    assert_eq!(b1 & 1, 1, "I/O space indicator");
    assert_eq!((!(b1 & !0x3)).wrapping_add(1), 32);
    let lo = cfg_read32(&d, 0x18);
    let hi = cfg_read32(&d, 0x1c);
    assert_eq!(lo & 0xf, 0xc, "64-bit prefetchable flags survive sizing");
    let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
    assert_eq!((!mask).wrapping_add(1), 1 << 33);
    // Unimplemented BARs read as zero whatever is written.
    for off in [0x20u64, 0x24] {
        assert_eq!(cfg_read32(&d, off), 0);
    }
    // ROM: address bits of a 2 KiB-granular size, plus the enable bit.
    let rom = cfg_read32(&d, 0x30);
    let rom_size = t.rom().unwrap().len() as u32;
    assert_eq!(rom & 1, 1);
    assert_eq!((!(rom & 0xffff_f800)).wrapping_add(1), rom_size);
    // Programming an address afterwards reads it back.
    cfg_write32(&d, 0x10, 0xfebc_1234);
    assert_eq!(cfg_read32(&d, 0x10), 0xfebc_0000);
}

#[test]
fn sizing_one_byte_at_a_time_still_keeps_only_address_bits() {
    let d = edu_device();
    for k in 0..4 {
        d.region_write(region::CONFIG, 0x10 + k, &[0xff]).unwrap();
    }
    let spec = d.template().bar(0).unwrap();
    assert_eq!(cfg_read32(&d, 0x10), sized_low(spec));
}

#[test]
fn read_only_header_registers_ignore_writes() {
    let d = edu_device();
    let before = cfg_read32(&d, 0);
    cfg_write32(&d, 0, 0xdead_beef);
    assert_eq!(cfg_read32(&d, 0), before, "vendor/device ids are read-only");
    let class = cfg_read32(&d, 8);
    cfg_write32(&d, 8, 0);
    assert_eq!(cfg_read32(&d, 8), class, "class and revision are read-only");
    // Interrupt line is read/write, interrupt pin is not.
    cfg_write16(&d, 0x3c, 0x0b0a);
    assert_eq!(cfg_read16(&d, 0x3c), 0x010a);
    // Command: reserved bits stay zero.
    cfg_write16(&d, 4, 0xffff);
    let cmd = cfg_read16(&d, 4);
    assert_eq!(cmd & 0x7, 0x7, "I/O, memory, bus master are writable");
    assert_eq!(cmd & 0xf800, 0, "bits 15:11 are reserved");
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    // A function whose status register has Received Master Abort (bit 13)
    // and Detected Parity Error (bit 15) set.
    let mut cfg = vec![0u8; 256];
    cfg[0..4].copy_from_slice(&[0x34, 0x12, 0x78, 0x56]);
    cfg[6..8].copy_from_slice(&0xa000u16.to_le_bytes());
    let t = DeviceTemplate::from_config(cfg, &[]).unwrap();
    let d = FakeDevice::new(t).unwrap();
    cfg_write16(&d, 6, 0x2000);
    assert_eq!(
        cfg_read16(&d, 6),
        0x8000,
        "only the bit written as 1 clears"
    );
    cfg_write16(&d, 6, 0);
    assert_eq!(cfg_read16(&d, 6), 0x8000, "writing 0 leaves it");
}

#[test]
fn builder_capabilities_form_walkable_lists() {
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0x0001)
        .bar(0, BarSpec::mem64(0x10000))
        .bar(2, BarSpec::mem32(1 << 20))
        .capability(Capability::PowerManagement)
        .capability(Capability::Msi {
            vectors: 4,
            addr64: false,
            per_vector_mask: true,
        })
        .capability(Capability::Msix {
            vectors: 8,
            table_bar: 0,
            table_offset: 0x8000,
            pba_bar: 0,
            pba_offset: 0x9000,
        })
        .capability(Capability::PciExpress { device_type: 0 })
        .capability(Capability::VendorSpecific(vec![1, 2, 3, 4, 5]))
        .ext_capability(ExtCapability::Aer)
        .ext_capability(ExtCapability::SrIov {
            total_vfs: 4,
            vf_device_id: 2,
        })
        .ext_capability(ExtCapability::ResizableBar(vec![ResizableBarEntry {
            bar: 2,
            sizes: 0b111,
            current: 0,
        }]))
        .build()
        .unwrap();
    let cfg = t.config();
    assert_eq!(cfg.len(), 4096, "a PCIe function has extended config space");
    assert_ne!(cfg[6] & 0x10, 0, "capabilities list bit");
    let ids: Vec<u8> = walk_caps(cfg).iter().map(|c| c.1).collect();
    assert_eq!(
        ids,
        [
            cap_id::POWER_MANAGEMENT,
            cap_id::MSI,
            cap_id::MSIX,
            cap_id::PCI_EXPRESS,
            cap_id::VENDOR_SPECIFIC
        ]
    );
    for (off, _) in walk_caps(cfg) {
        assert!(off >= 0x40 && off % 4 == 0, "cap at {off:#x}");
    }
    let ext: Vec<(u16, u8)> = walk_ext_caps(cfg).iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(
        ext,
        [
            (ext_cap_id::AER, 2),
            (ext_cap_id::SRIOV, 1),
            (ext_cap_id::RESIZABLE_BAR, 1)
        ]
    );
    let msi = t.msi().unwrap();
    assert_eq!(
        (msi.vectors, msi.addr64, msi.per_vector_mask),
        (4, false, true)
    );
    let msix = t.msix().unwrap();
    assert_eq!(
        (msix.vectors, msix.table_offset, msix.pba_offset),
        (8, 0x8000, 0x9000)
    );

    let d = FakeDevice::new(t.clone()).unwrap();
    // MSI per-vector mask (32-bit layout: mask at +0x0c): only the 4
    // implemented vectors' bits are writable.
    let mask_off = msi.offset as u64 + 0x0c;
    cfg_write32(&d, mask_off, u32::MAX);
    assert_eq!(cfg_read32(&d, mask_off), 0xf);
    // MSI-X control: enable and function mask writable, table size not.
    let ctrl_off = msix.offset as u64 + 2;
    cfg_write16(&d, ctrl_off, 0xffff);
    assert_eq!(cfg_read16(&d, ctrl_off), 0xc000 | 7);
    // Resizable BAR control: the size field is writable.
    let (rebar, _, _) = walk_ext_caps(cfg)[2];
    let ctrl = cfg_read32(&d, rebar as u64 + 8);
    cfg_write32(&d, rebar as u64 + 8, ctrl | (2 << 8));
    assert_eq!((cfg_read32(&d, rebar as u64 + 8) >> 8) & 0x3f, 2);
    // The AER uncorrectable error mask is RW.
    let aer = walk_ext_caps(cfg)[0].0 as u64;
    cfg_write32(&d, aer + 8, 0x10);
    assert_eq!(cfg_read32(&d, aer + 8), 0x10);
}

#[test]
fn templates_that_no_pci_function_could_have_are_refused() {
    let bad = [
        DeviceTemplate::builder()
            .bar(0, BarSpec::mem32(3000))
            .build(),
        DeviceTemplate::builder()
            .bar(5, BarSpec::mem64(4096))
            .build(),
        DeviceTemplate::builder().bar(0, BarSpec::io(512)).build(),
        DeviceTemplate::builder()
            .bar(7, BarSpec::mem32(4096))
            .build(),
        DeviceTemplate::builder()
            .bar(0, BarSpec::mem32(4096))
            .registers(0, 0x800, 0x1000, RegisterKind::Memory)
            .build(),
        DeviceTemplate::builder()
            .bar(0, BarSpec::mem32(4096))
            .registers(0, 0, 0x100, RegisterKind::ReadOnly)
            .registers(0, 0x80, 0x100, RegisterKind::Memory)
            .build(),
        DeviceTemplate::builder()
            .capability(Capability::Msix {
                vectors: 4,
                table_bar: 1,
                table_offset: 0,
                pba_bar: 1,
                pba_offset: 0x800,
            })
            .build(),
        DeviceTemplate::builder()
            .capability(Capability::Msi {
                vectors: 3,
                addr64: false,
                per_vector_mask: false,
            })
            .build(),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        assert!(
            matches!(r, Err(FakeError::InvalidTemplate(_))),
            "case {i}: {r:?}"
        );
    }
}

// ---------------------------------------------------------------- lspci

/// An invented conventional PCI function in the layout of a QEMU e1000
/// (the bytes are made up for this test).
const LSPCI_XXX: &str = "\
00:03.0 Ethernet controller: Example Corp. Fake NIC (rev 03)
00: 86 80 0e 10 07 01 00 00 03 00 00 02 00 00 00 00
10: 00 00 bc fe 01 c0 00 00 00 00 00 00 00 00 00 00
20: 00 00 00 00 00 00 00 00 00 00 00 00 f4 1a 00 11
30: 00 00 b8 fe 00 00 00 00 00 00 00 00 0b 01 00 00
40: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
50: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
60: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
70: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
80: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
90: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
a0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
b0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
c0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
d0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
e0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
f0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
";

#[test]
fn lspci_xxx_dump_parses_with_caller_bar_sizes() {
    let t = DeviceTemplate::from_lspci(LSPCI_XXX, Some(&[Some(128 << 10), Some(64)])).unwrap();
    let c = t.config();
    assert_eq!(c.len(), 256);
    assert_eq!(u16::from_le_bytes([c[0], c[1]]), 0x8086);
    assert_eq!(u16::from_le_bytes([c[2], c[3]]), 0x100e);
    assert_eq!(&c[0x09..0x0c], &[0x00, 0x00, 0x02], "class 02:00:00");
    assert_eq!(c[0x3d], 1, "INTA#");
    let b0 = t.bar(0).unwrap();
    assert_eq!(
        (b0.kind, b0.size),
        (
            vfio_fake_device::BarKind::Memory32 {
                prefetchable: false
            },
            128 << 10
        )
    );
    let b1 = t.bar(1).unwrap();
    assert_eq!((b1.kind, b1.size), (vfio_fake_device::BarKind::Io, 64));
    // The dump's BAR addresses are kept.
    assert_eq!(
        u32::from_le_bytes(c[0x10..0x14].try_into().unwrap()),
        0xfebc_0000
    );
    // Without sizes for the implemented BARs, the dump is refused.
    assert!(matches!(
        DeviceTemplate::from_lspci(LSPCI_XXX, None),
        Err(FakeError::InvalidTemplate(m)) if m.contains("size is unknown")
    ));
    // The device built from it answers sizing like the real function would.
    let d = FakeDevice::new(t).unwrap();
    cfg_write32(&d, 0x10, u32::MAX);
    assert_eq!(u64::from(!cfg_read32(&d, 0x10)) + 1, 128 << 10);
}

/// An invented PCIe function, `lspci -vvxxxx` style: text, then hex lines
/// including extended config space (only the lines that matter here).
const LSPCI_VVXXXX: &str = "\
01:00.0 Non-Volatile memory controller: Example Corp. Fake SSD (prog-if 02 [NVM Express])
\tSubsystem: Example Corp. Device 0001
\tControl: I/O- Mem+ BusMaster+ SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- SERR- FastB2B- DisINTx+
\tLatency: 0, Cache Line Size: 64 bytes
\tInterrupt: pin A routed to IRQ 16
\tRegion 0: Memory at fe800000 (64-bit, non-prefetchable) [size=16K]
\tRegion 2: I/O ports at e000 [size=256]
\tExpansion ROM at fe700000 [disabled] [size=64K]
\tCapabilities: [40] Power Management version 3
\tCapabilities: [50] MSI-X: Enable+ Count=16 Masked-
\t\tVector table: BAR=0 offset=00002000
\t\tPBA: BAR=0 offset=00003000
\tCapabilities: [100 v2] Advanced Error Reporting
\tKernel driver in use: nvme
00: 34 12 4e 0f 06 04 10 00 00 02 08 01 10 00 00 00
10: 04 00 80 fe 00 00 00 00 01 e0 00 00 00 00 00 00
20: 00 00 00 00 00 00 00 00 00 00 00 00 34 12 01 00
30: 00 00 70 fe 40 00 00 00 00 00 00 00 0b 01 00 00
40: 01 50 03 00 08 00 00 00 00 00 00 00 00 00 00 00
50: 11 00 0f 80 00 20 00 00 00 30 00 00 00 00 00 00
60: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
70: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
80: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
90: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
a0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
b0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
c0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
d0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
e0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
f0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
100: 01 00 02 00 00 00 00 00 00 00 00 00 30 20 46 00
110: 00 00 00 00 00 20 00 00 00 00 00 00 00 00 00 00
";

#[test]
fn lspci_vvxxxx_dump_takes_sizes_from_region_lines() {
    let dump = vfio_fake_device::lspci::parse(LSPCI_VVXXXX).unwrap();
    assert_eq!(
        dump.config.len(),
        4096,
        "lines at 0x100+ mean extended config"
    );
    assert_eq!(dump.bar_sizes[0], Some(16 << 10));
    assert_eq!(dump.bar_sizes[2], Some(256));
    assert_eq!(dump.rom_size, Some(64 << 10));
    let t = DeviceTemplate::from_lspci(LSPCI_VVXXXX, None).unwrap();
    assert_eq!(
        t.bar(0).unwrap().kind,
        vfio_fake_device::BarKind::Memory64 {
            prefetchable: false
        }
    );
    assert!(t.bar(1).is_none(), "upper half of the 64-bit BAR");
    assert_eq!(t.bar(2).unwrap().kind, vfio_fake_device::BarKind::Io);
    assert_eq!(t.rom().unwrap().len(), 64 << 10);
    let msix = t.msix().unwrap();
    assert_eq!(
        (msix.vectors, msix.table_offset, msix.pba_offset),
        (16, 0x2000, 0x3000)
    );
    assert_eq!(walk_ext_caps(t.config())[0].1, ext_cap_id::AER);
    // The fake treats the MSI-X table and PBA pages like vfio-pci does.
    let d = FakeDevice::new(t).unwrap();
    let info = d.region_info(0).unwrap();
    assert_eq!(
        info.sparse_areas().unwrap(),
        &[SparseArea {
            offset: 0,
            size: 0x2000
        }]
    );
    // Caller sizes override the dump's.
    let t = DeviceTemplate::from_lspci(LSPCI_VVXXXX, Some(&[Some(32 << 10)])).unwrap();
    assert_eq!(t.bar(0).unwrap().size, 32 << 10);
}

#[test]
fn lspci_sizes_use_binary_suffixes() {
    use vfio_fake_device::lspci::parse_size;
    assert_eq!(parse_size("256"), Some(256));
    assert_eq!(parse_size("4K"), Some(4 * 1024));
    assert_eq!(parse_size("16M"), Some(16 * 1024 * 1024));
    assert_eq!(parse_size("32G"), Some(32 * 1024 * 1024 * 1024));
    assert_eq!(parse_size("K"), None);
    assert_eq!(parse_size("99999999999999999999G"), None);
}

#[test]
fn malformed_lspci_dumps_are_errors() {
    let truncated = "00: 86 80 0e 10\n10: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00\n";
    assert!(matches!(
        vfio_fake_device::lspci::parse(truncated),
        Err(FakeError::HexDump { line: 1, .. })
    ));
    let two_functions = format!("{LSPCI_XXX}{LSPCI_XXX}");
    // The second function's header starts again at line 19 of the dump.
    assert!(matches!(
        vfio_fake_device::lspci::parse(&two_functions),
        Err(FakeError::HexDump { line: 19, .. })
    ));
    assert!(matches!(
        vfio_fake_device::lspci::parse("no hex here\n"),
        Err(FakeError::HexDump { line: 0, .. })
    ));
}

// ---------------------------------------------------------------- regions

#[test]
fn region_info_follows_vfio_pci() {
    let d = FakeDevice::new(mixed_bars_template()).unwrap();
    let info = d.device_info().unwrap();
    assert!(info.is_pci() && info.supports_reset());
    assert_eq!(info.num_regions, region::NUM_PCI_REGIONS);
    let b0 = d.region_info(0).unwrap();
    assert_eq!(b0.size, 0x2000);
    assert!(b0.readable() && b0.writable() && b0.mmappable());
    let io = d.region_info(1).unwrap();
    assert!(!io.mmappable(), "I/O BARs cannot be mmapped");
    assert_eq!(
        d.region_info(3).unwrap().size,
        0,
        "upper half of a 64-bit BAR"
    );
    let rom = d.region_info(region::ROM).unwrap();
    assert!(rom.readable() && !rom.writable());
    let cfg = d.region_info(region::CONFIG).unwrap();
    assert_eq!(cfg.size, 256);
    assert!(cfg.readable() && cfg.writable());
    assert_eq!(d.region_info(region::VGA).unwrap().size, 0);
    assert!(matches!(d.region_info(9), Err(Error::InvalidArgument(_))));
    let mut b = [0u8; 3];
    d.region_read(region::ROM, 0, &mut b).unwrap();
    assert_eq!(b, [0x55, 0xaa, 0x10]);
}

#[test]
fn out_of_range_region_accesses_are_errors_not_panics() {
    let d = nvme_device();
    let mut b = [0u8; 8];
    let size = d.region_info(0).unwrap().size;
    assert_einval(d.region_read(0, size - 4, &mut b), "past the end");
    assert_einval(d.region_read(0, u64::MAX, &mut b), "wrapping offset");
    assert_einval(
        d.region_read(region::CONFIG, 4095, &mut b),
        "past config space",
    );
    assert_einval(d.region_read(region::ROM, 0, &mut b), "no ROM");
    assert_einval(d.region_read(9, 0, &mut b), "no region 9");
    assert_einval(d.region_read(4, 0, &mut b), "unimplemented BAR");
    assert_einval(d.region_write(region::ROM, 0, &b), "ROM is read-only");
    // An access straddling the edge of a register block is refused.
    assert_einval(
        d.region_write(0, nvme_like::DOORBELLS - 4, &b),
        "straddles a register block",
    );
    // A zero-length access inside the region is fine.
    d.region_read(0, 0, &mut []).unwrap();
}

#[test]
fn bar_access_with_decoding_disabled_fails_with_eio_like_vfio_pci() {
    let d = FakeDevice::profile("edu").unwrap();
    let mut b = [0u8; 4];
    assert_eq!(errno(d.region_read(0, 0, &mut b)), libc::EIO);
    cfg_write16(&d, 4, 0x2);
    d.region_read(0, 0, &mut b).unwrap();
    let relaxed = DeviceTemplate::builder()
        .bar(0, BarSpec::mem32(4096))
        .without_decode_check()
        .build()
        .unwrap();
    let d = FakeDevice::new(relaxed).unwrap();
    d.region_read(0, 0, &mut b).unwrap();
}

#[test]
fn mmapped_bar_memory_is_shared_with_region_accesses_and_the_fd() {
    let d = FakeDevice::new(mixed_bars_template()).unwrap();
    enable_decoding(&d);
    let m = d
        .mmap_region(
            0,
            SparseArea {
                offset: 0x1000,
                size: 0x1000,
            },
        )
        .unwrap();
    // SAFETY: the mapping is 4 KiB and alive.
    unsafe {
        m.as_ptr()
            .add(0x10)
            .cast::<u32>()
            .write_volatile(0xfeed_f00d)
    };
    assert_eq!(bar_read32(&d, 0, 0x1010), 0xfeed_f00d);
    let (fd, off) = d.region_mmap_fd(0).unwrap();
    let m2 = vfio_backend::Mapping::map_fd(fd, off, 0x2000, libc::PROT_READ).unwrap();
    // SAFETY: the second mapping is 8 KiB and alive.
    let v = unsafe { m2.as_ptr().add(0x1010).cast::<u32>().read_volatile() };
    assert_eq!(v, 0xfeed_f00d);
    assert!(d.region_mmap_fd(1).is_none(), "I/O BAR");
    let bad = SparseArea {
        offset: 0x800,
        size: 0x1000,
    };
    assert_einval(d.mmap_region(0, bad), "not page aligned");
}

// ---------------------------------------------------------------- edu

#[test]
fn edu_identification_and_liveness_check() {
    let d = edu_device();
    let c = d.template().config();
    assert_eq!(u16::from_le_bytes([c[0], c[1]]), edu::VENDOR_ID);
    assert_eq!(u16::from_le_bytes([c[2], c[3]]), edu::DEVICE_ID);
    assert_eq!(d.region_info(0).unwrap().size, 1 << 20);
    let id = bar_read32(&d, 0, edu::ID);
    assert_eq!(id & 0xff, 0xed, "0xRRrr00ed");
    assert_eq!(id >> 24, 1, "major version 1");
    bar_write32(&d, 0, edu::ID, 0);
    assert_eq!(
        bar_read32(&d, 0, edu::ID),
        id,
        "identification is read-only"
    );
    for v in [0u32, 0x1234_5678, u32::MAX] {
        bar_write32(&d, 0, edu::LIVENESS, v);
        assert_eq!(bar_read32(&d, 0, edu::LIVENESS), !v);
    }
    // Only 4-byte accesses below 0x80: a 2-byte read returns all ones.
    let mut b = [0u8; 2];
    d.region_read(0, edu::ID, &mut b).unwrap();
    assert_eq!(b, [0xff, 0xff]);
    // The register page is trapped, the rest of the BAR is mmap-able.
    let info = d.region_info(0).unwrap();
    assert_eq!(
        info.sparse_areas().unwrap(),
        &[SparseArea {
            offset: 0x1000,
            size: (1 << 20) - 0x1000
        }]
    );
}

#[test]
fn edu_factorial_raises_msi_when_asked() {
    let d = edu_device();
    let info = d.irq_info(irq::MSI).unwrap();
    assert_eq!(info.count, 1);
    let efd = Efd::new();
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efd.fd())]).unwrap();
    bar_write32(&d, 0, edu::STATUS, edu::STATUS_IRQ_FACT);
    bar_write32(&d, 0, edu::FACTORIAL, 10);
    let status = bar_read32(&d, 0, edu::STATUS);
    assert_eq!(status & edu::STATUS_COMPUTING, 0);
    assert_eq!(
        bar_read32(&d, 0, edu::FACTORIAL),
        (1..=10u32).product::<u32>()
    );
    assert_eq!(efd.take(), 1, "MSI vector 0 fired once");
    assert_eq!(bar_read32(&d, 0, edu::IRQ_STATUS), edu::FACT_IRQ);
    bar_write32(&d, 0, edu::IRQ_ACK, edu::FACT_IRQ);
    assert_eq!(bar_read32(&d, 0, edu::IRQ_STATUS), 0);
    // Without the status bit, no interrupt.
    bar_write32(&d, 0, edu::STATUS, 0);
    bar_write32(&d, 0, edu::FACTORIAL, 5);
    assert_eq!(bar_read32(&d, 0, edu::FACTORIAL), 120);
    assert_eq!(efd.take(), 0);
}

#[test]
fn edu_dma_moves_data_through_dma_mappings_and_signals_completion() {
    let d = edu_device();
    enable_bus_master(&d);
    let mem = GuestMem::new(0x4000);
    let iova = 0x10_0000u64;
    d.dma_map(iova, 0x4000, mem.source(false)).unwrap();
    let efd = Efd::new();
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efd.fd())]).unwrap();
    let pattern: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(7)).collect();
    mem.write(0x200, &pattern);

    // RAM -> device buffer, as in the spec's example.
    bar_write64(&d, 0, edu::DMA_SRC, iova + 0x200);
    bar_write64(&d, 0, edu::DMA_DST, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_COUNT, 100);
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START | edu::DMA_CMD_IRQ);
    assert_eq!(
        bar_read32(&d, 0, edu::DMA_CMD) & 1,
        0,
        "start bit clears when done"
    );
    let mut buf = vec![0u8; 100];
    d.region_read(0, edu::DMA_BUFFER, &mut buf).unwrap();
    assert_eq!(buf, pattern);
    assert_eq!(efd.take(), 1);
    assert_eq!(bar_read32(&d, 0, edu::IRQ_STATUS), edu::DMA_IRQ);

    // Device buffer -> RAM at another address.
    bar_write64(&d, 0, edu::DMA_SRC, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_DST, iova + 0x3000 + 100);
    bar_write64(&d, 0, edu::DMA_COUNT, 100);
    bar_write64(
        &d,
        0,
        edu::DMA_CMD,
        edu::DMA_CMD_START | edu::DMA_CMD_TO_RAM,
    );
    assert_eq!(&mem.read()[0x3064..0x30c8], &pattern[..]);
    assert_eq!(d.counters().dma_transfers(), 2);
}

#[test]
fn edu_dma_outside_the_mappings_sets_the_error_register_and_touches_nothing() {
    let d = edu_device();
    enable_bus_master(&d);
    let mem = GuestMem::new(0x2000);
    d.dma_map(0x10_0000, 0x1000, mem.source(false)).unwrap();
    d.dma_map(0x20_0000, 0x1000, mem.source(false).with_offset(0x1000))
        .unwrap();
    mem.write(0, &vec![0xaa; mem.len]);
    // Crosses the end of the first mapping into unmapped IOVA space.
    bar_write64(&d, 0, edu::DMA_SRC, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_DST, 0x10_0f80);
    bar_write64(&d, 0, edu::DMA_COUNT, 0x100);
    bar_write64(
        &d,
        0,
        edu::DMA_CMD,
        edu::DMA_CMD_START | edu::DMA_CMD_TO_RAM,
    );
    assert_eq!(bar_read32(&d, 0, edu::DMA_ERROR), DmaFault::Unmapped.code());
    assert!(mem.read().iter().all(|b| *b == 0xaa), "no partial write");
    // A transfer leaving the 4 KiB device buffer.
    bar_write64(&d, 0, edu::DMA_SRC, 0x10_0000);
    bar_write64(&d, 0, edu::DMA_DST, edu::DMA_BUFFER + 0xf00);
    bar_write64(&d, 0, edu::DMA_COUNT, 0x200);
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START);
    assert_eq!(
        bar_read32(&d, 0, edu::DMA_ERROR),
        DmaFault::OutOfDeviceRange.code()
    );
    // Writing into a read-only mapping.
    d.dma_unmap(0x20_0000, 0x1000).unwrap();
    d.dma_map(0x20_0000, 0x1000, mem.source(true).with_offset(0x1000))
        .unwrap();
    bar_write64(&d, 0, edu::DMA_SRC, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_DST, 0x20_0000);
    bar_write64(&d, 0, edu::DMA_COUNT, 16);
    bar_write64(
        &d,
        0,
        edu::DMA_CMD,
        edu::DMA_CMD_START | edu::DMA_CMD_TO_RAM,
    );
    assert_eq!(bar_read32(&d, 0, edu::DMA_ERROR), DmaFault::ReadOnly.code());
    assert!(mem.read().iter().all(|b| *b == 0xaa));
    assert_eq!(d.counters().dma_errors(), 3);
}

/// Polls DMA_CMD until the start bit clears (bounded).
fn wait_edu_idle(d: &FakeDevice) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while bar_read32(d, 0, edu::DMA_CMD) & 1 != 0 {
        assert!(Instant::now() < deadline, "the edu DMA never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn memfd(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"dma".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own, taken over once.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[test]
fn edu_dma_through_a_file_mapping_uses_file_io_and_a_shrunk_file_is_a_dma_fault() {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let d = edu_device();
    enable_bus_master(&d);
    let f = memfd(0x4000);
    let iova = 0x40_0000;
    let src = vfio_backend::DmaSource {
        host_addr: 0,
        file: Some(vfio_backend::DmaFile {
            fd: f.as_fd(),
            offset: 0x1000,
        }),
        read_only: false,
    };
    d.dma_map(iova, 0x3000, src).unwrap();
    let pattern: Vec<u8> = (0..200u8).map(|i| i ^ 0x3c).collect();
    f.write_all_at(&pattern, 0x1000 + 0x800).unwrap();
    bar_write64(&d, 0, edu::DMA_SRC, iova + 0x800);
    bar_write64(&d, 0, edu::DMA_DST, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_COUNT, 200);
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START);
    wait_edu_idle(&d);
    assert_eq!(bar_read32(&d, 0, edu::DMA_ERROR), 0);
    let mut buf = vec![0u8; 200];
    d.region_read(0, edu::DMA_BUFFER, &mut buf).unwrap();
    assert_eq!(buf, pattern);
    // And back into the file.
    bar_write64(&d, 0, edu::DMA_SRC, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_DST, iova + 0x2000);
    bar_write64(&d, 0, edu::DMA_COUNT, 200);
    bar_write64(
        &d,
        0,
        edu::DMA_CMD,
        edu::DMA_CMD_START | edu::DMA_CMD_TO_RAM,
    );
    wait_edu_idle(&d);
    let mut back = vec![0u8; 200];
    f.read_exact_at(&mut back, 0x3000).unwrap();
    assert_eq!(back, pattern);
    // The owner shrinks the file: the device reports a fault; no SIGBUS.
    f.set_len(0x1000).unwrap();
    bar_write64(&d, 0, edu::DMA_SRC, iova + 0x800);
    bar_write64(&d, 0, edu::DMA_DST, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_COUNT, 200);
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START);
    wait_edu_idle(&d);
    assert_eq!(
        bar_read32(&d, 0, edu::DMA_ERROR),
        DmaFault::Unreachable.code()
    );
    assert_eq!(d.counters().dma_errors(), 1);
}

/// Guest memory only reachable by asking; `read` blocks until `gate` opens.
struct Remote {
    mem: std::sync::Mutex<Vec<u8>>,
    gate: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    fail: bool,
}

impl Remote {
    fn new(len: usize, open: bool, fail: bool) -> std::sync::Arc<Remote> {
        std::sync::Arc::new(Remote {
            mem: std::sync::Mutex::new((0..len).map(|i| (i * 3) as u8).collect()),
            gate: std::sync::Mutex::new(open),
            opened: std::sync::Condvar::new(),
            threads: std::sync::Mutex::new(Vec::new()),
            fail,
        })
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl vfio_backend::RemoteDma for Remote {
    fn read(&self, iova: u64, buf: &mut [u8]) -> vfio_backend::Result<()> {
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        let g = self.gate.lock().unwrap();
        let _g = self
            .opened
            .wait_timeout_while(g, Duration::from_secs(10), |open| !*open)
            .unwrap();
        if self.fail {
            return Err(Error::Timeout {
                request: "DMA_READ",
                after: Duration::ZERO,
            });
        }
        let at = (iova - 0x80_0000) as usize;
        buf.copy_from_slice(&self.mem.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> vfio_backend::Result<()> {
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        let at = (iova - 0x80_0000) as usize;
        self.mem.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn edu_dma_through_a_remote_mapping_runs_after_the_write_and_is_busy_until_done() {
    let d = edu_device();
    enable_bus_master(&d);
    let remote = Remote::new(0x2000, false, false);
    d.dma_map_remote(0x80_0000, 0x2000, false, remote.clone())
        .unwrap();
    let efd = Efd::new();
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efd.fd())]).unwrap();
    bar_write64(&d, 0, edu::DMA_SRC, 0x80_0100);
    bar_write64(&d, 0, edu::DMA_DST, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_COUNT, 64);
    // The doorbell write returns while the owner has not answered.
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START | edu::DMA_CMD_IRQ);
    assert_eq!(bar_read32(&d, 0, edu::DMA_CMD) & 1, 1, "busy");
    // Registers still answer meanwhile (no lock held while waiting), and
    // the DMA registers ignore writes, as QEMU's edu does while busy.
    assert_eq!(bar_read32(&d, 0, edu::ID), edu::ID_VALUE);
    bar_write64(&d, 0, edu::DMA_SRC, 0x80_0800);
    assert_eq!(bar_read32(&d, 0, edu::DMA_SRC), 0x80_0100);
    assert_eq!(efd.take(), 0);
    remote.open();
    wait_edu_idle(&d);
    assert_eq!(bar_read32(&d, 0, edu::DMA_ERROR), 0);
    let mut buf = vec![0u8; 64];
    d.region_read(0, edu::DMA_BUFFER, &mut buf).unwrap();
    assert_eq!(buf, remote.mem.lock().unwrap()[0x100..0x140]);
    assert_eq!(efd.take(), 1, "completion interrupt");
    // And back, to another address.
    bar_write64(&d, 0, edu::DMA_SRC, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_DST, 0x80_1000);
    bar_write64(&d, 0, edu::DMA_COUNT, 64);
    bar_write64(
        &d,
        0,
        edu::DMA_CMD,
        edu::DMA_CMD_START | edu::DMA_CMD_TO_RAM,
    );
    wait_edu_idle(&d);
    let mem = remote.mem.lock().unwrap().clone();
    assert_eq!(mem[0x1000..0x1040], mem[0x100..0x140]);
    let me = std::thread::current().id();
    assert!(remote.threads.lock().unwrap().iter().all(|t| *t != me));
}

#[test]
fn edu_dma_through_a_remote_mapping_whose_owner_fails_is_a_dma_fault() {
    let d = edu_device();
    enable_bus_master(&d);
    let remote = Remote::new(0x1000, true, true);
    d.dma_map_remote(0x80_0000, 0x1000, false, remote).unwrap();
    bar_write64(&d, 0, edu::DMA_SRC, 0x80_0000);
    bar_write64(&d, 0, edu::DMA_DST, edu::DMA_BUFFER);
    bar_write64(&d, 0, edu::DMA_COUNT, 64);
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START);
    wait_edu_idle(&d);
    assert_eq!(
        bar_read32(&d, 0, edu::DMA_ERROR),
        DmaFault::Unreachable.code()
    );
    assert_eq!(d.counters().dma_errors(), 1);
}

trait WithOffset {
    fn with_offset(self, off: u64) -> Self;
}

impl WithOffset for vfio_backend::DmaSource<'static> {
    fn with_offset(mut self, off: u64) -> Self {
        self.host_addr += off;
        self
    }
}

// ---------------------------------------------------------------- interrupts

#[test]
fn intx_is_automasked_after_firing_until_unmasked() {
    let d = edu_device();
    let info = d.irq_info(irq::INTX).unwrap();
    assert_eq!(info.count, 1);
    assert_ne!(info.flags & irq_flags::AUTOMASKED, 0);
    let efd = Efd::new();
    d.set_irq_eventfds(irq::INTX, 0, &[Some(efd.fd())]).unwrap();
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x1);
    assert_eq!(efd.take(), 1);
    assert!(d.intx_masked(), "the host masks INTx when it fires");
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x2);
    assert_eq!(efd.take(), 0, "masked: no second signal");
    // The line is still asserted (interrupt status != 0): unmasking
    // fires again at once, and masks again.
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 1);
    assert!(d.intx_masked());
    // Acknowledge everything: the line drops; unmask is then quiet.
    bar_write32(&d, 0, edu::IRQ_ACK, 0x3);
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 0);
    assert!(!d.intx_masked());
    // mask_irq holds it off.
    d.mask_irq(irq::INTX).unwrap();
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x1);
    assert_eq!(efd.take(), 0);
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 1);
    // MSI cannot be masked through VFIO.
    assert_eq!(errno(d.unmask_irq(irq::MSI)), libc::ENOTTY);
}

const COMMAND: u64 = 0x04;
const STATUS: u64 = 0x06;
/// PCI Local Bus 3.0 §6.2.2: Command bit 2, Bus Master Enable.
const CMD_BUS_MASTER: u16 = 1 << 2;
/// PCI Local Bus 3.0 §6.2.2: Command bit 10, Interrupt Disable.
const CMD_INTX_DISABLE: u16 = 1 << 10;
/// PCI Local Bus 3.0 §6.2.3: Status bit 3, Interrupt Status.
const STATUS_INTERRUPT: u16 = 1 << 3;

fn interrupt_status(d: &FakeDevice) -> bool {
    cfg_read16(d, STATUS) & STATUS_INTERRUPT != 0
}

fn set_command_bits(d: &FakeDevice, bits: u16, on: bool) {
    let cmd = cfg_read16(d, COMMAND);
    cfg_write16(d, COMMAND, if on { cmd | bits } else { cmd & !bits });
}

#[test]
fn status_interrupt_bit_reflects_the_intx_line_state() {
    // §6.2.3 Status bit 3: the state of the function's interrupt, read-only.
    let d = edu_device();
    assert!(!interrupt_status(&d));
    let efd = Efd::new();
    d.set_irq_eventfds(irq::INTX, 0, &[Some(efd.fd())]).unwrap();
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x1);
    assert!(interrupt_status(&d), "asserted by IRQ_RAISE");
    assert_eq!(efd.take(), 1);
    // A guest cannot clear it through config space (it is not RW1C).
    cfg_write16(&d, STATUS, 0xffff);
    assert!(interrupt_status(&d));
    // The driver acknowledges: the line and the bit drop.
    bar_write32(&d, 0, edu::IRQ_ACK, 0x1);
    assert!(!interrupt_status(&d));
    // Without INTx wired by the host, the line state still shows.
    d.disable_irqs(irq::INTX).unwrap();
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x4);
    assert!(interrupt_status(&d));
    bar_write32(&d, 0, edu::IRQ_ACK, 0x4);
    assert!(!interrupt_status(&d));
}

#[test]
fn interrupt_disable_keeps_intx_deasserted_and_clearing_it_reasserts_a_pending_line() {
    // §6.2.2 Command bit 10: while set, INTx# is not asserted; Interrupt Status still
    // reflects the state, and clearing the bit with the state set asserts the line.
    let d = edu_device();
    let efd = Efd::new();
    d.set_irq_eventfds(irq::INTX, 0, &[Some(efd.fd())]).unwrap();
    // Linux's pci_intx_mask_supported(): the bit must be writable and read back.
    set_command_bits(&d, CMD_INTX_DISABLE, true);
    assert_ne!(cfg_read16(&d, COMMAND) & CMD_INTX_DISABLE, 0);
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x1);
    assert!(interrupt_status(&d));
    assert_eq!(efd.take(), 0, "Interrupt Disable: the line is not asserted");
    assert!(
        !d.intx_masked(),
        "nothing fired, so the host masked nothing"
    );
    // A VFIO unmask does not bypass the disable bit.
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 0);
    set_command_bits(&d, CMD_INTX_DISABLE, false);
    assert_eq!(
        efd.take(),
        1,
        "cleared with the status still set: asserted again"
    );
    assert!(d.intx_masked(), "and automasked as any INTx");
    // The handler's dance (pci_check_and_mask_intx / unmask): disable, ack, enable.
    set_command_bits(&d, CMD_INTX_DISABLE, true);
    bar_write32(&d, 0, edu::IRQ_ACK, 0x1);
    assert!(!interrupt_status(&d));
    set_command_bits(&d, CMD_INTX_DISABLE, false);
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 0, "nothing pending: quiet");
    // With the host's mask (VFIO_IRQ_SET_ACTION_MASK) and the disable bit both set, the
    // line fires once both are lifted, in either order.
    d.mask_irq(irq::INTX).unwrap();
    set_command_bits(&d, CMD_INTX_DISABLE, true);
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x2);
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 0);
    set_command_bits(&d, CMD_INTX_DISABLE, false);
    assert_eq!(efd.take(), 1);
    bar_write32(&d, 0, edu::IRQ_ACK, 0x2);
    d.unmask_irq(irq::INTX).unwrap();
    d.mask_irq(irq::INTX).unwrap();
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x2);
    set_command_bits(&d, CMD_INTX_DISABLE, true);
    d.unmask_irq(irq::INTX).unwrap();
    assert_eq!(efd.take(), 0);
    set_command_bits(&d, CMD_INTX_DISABLE, false);
    assert_eq!(efd.take(), 1);
    // A reset clears Interrupt Disable and the line.
    d.reset().unwrap();
    assert!(!interrupt_status(&d));
    assert_eq!(cfg_read16(&d, COMMAND) & CMD_INTX_DISABLE, 0);
}

#[test]
fn intx_doorbell_holds_interrupt_status_until_the_host_unmasks() {
    // A doorbell in INTx mode (nvme-like) has no acknowledge register: the line holds
    // until the host's end of interrupt (its unmask), so that a shared-INTx handler that
    // checks Status bit 3 finds it set and claims the interrupt.
    let d = nvme_device();
    let efd = Efd::new();
    d.set_irq_eventfds(irq::INTX, 0, &[Some(efd.fd())]).unwrap();
    bar_write32(&d, 0, nvme_like::DOORBELLS, 1);
    assert_eq!(efd.take(), 1);
    assert!(interrupt_status(&d));
    d.unmask_irq(irq::INTX).unwrap();
    assert!(!interrupt_status(&d));
    assert_eq!(efd.take(), 0, "a pulse fires once");
    // Rung while Interrupt Disable is set: held, asserted when the bit is cleared.
    set_command_bits(&d, CMD_INTX_DISABLE, true);
    bar_write32(&d, 0, nvme_like::DOORBELLS, 1);
    assert_eq!(efd.take(), 0);
    assert!(interrupt_status(&d));
    set_command_bits(&d, CMD_INTX_DISABLE, false);
    assert_eq!(efd.take(), 1);
    d.unmask_irq(irq::INTX).unwrap();
    assert!(!interrupt_status(&d));
}

#[test]
fn dma_engines_fail_and_touch_no_memory_while_bus_master_enable_is_clear() {
    // §6.2.2 Command bit 2: without Bus Master Enable a function initiates no memory
    // transactions. edu's engine first.
    let d = edu_device();
    let mem = GuestMem::new(0x2000);
    let iova = 0x10_0000u64;
    d.dma_map(iova, 0x2000, mem.source(false)).unwrap();
    mem.write(0, &vec![0xaa; mem.len]);
    let efd = Efd::new();
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efd.fd())]).unwrap();
    assert_eq!(cfg_read16(&d, COMMAND) & CMD_BUS_MASTER, 0);
    d.region_write(0, edu::DMA_BUFFER, &[0x5a; 16]).unwrap();
    let dmas = d.counters().dma_transfers();
    for (src, dst, cmd) in [
        (edu::DMA_BUFFER, iova, edu::DMA_CMD_TO_RAM),
        (iova + 0x1000, edu::DMA_BUFFER, 0),
    ] {
        bar_write64(&d, 0, edu::DMA_SRC, src);
        bar_write64(&d, 0, edu::DMA_DST, dst);
        bar_write64(&d, 0, edu::DMA_COUNT, 16);
        bar_write64(
            &d,
            0,
            edu::DMA_CMD,
            edu::DMA_CMD_START | edu::DMA_CMD_IRQ | cmd,
        );
        assert_eq!(
            bar_read32(&d, 0, edu::DMA_ERROR),
            DmaFault::BusMasterDisabled.code()
        );
        assert_eq!(
            bar_read32(&d, 0, edu::DMA_CMD) & 1,
            0,
            "the transfer is over"
        );
    }
    assert!(
        mem.read().iter().all(|b| *b == 0xaa),
        "guest memory untouched"
    );
    let mut buf = [0u8; 16];
    d.region_read(0, edu::DMA_BUFFER, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 16], "device buffer untouched");
    assert_eq!(efd.take(), 0, "no completion interrupt");
    assert_eq!(d.counters().dma_transfers(), dmas);
    set_command_bits(&d, CMD_BUS_MASTER, true);
    bar_write64(&d, 0, edu::DMA_CMD, edu::DMA_CMD_START | edu::DMA_CMD_IRQ);
    assert_eq!(bar_read32(&d, 0, edu::DMA_ERROR), 0);
    assert_eq!(efd.take(), 1);

    // The generic engine.
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0x0001)
        .bar(0, BarSpec::mem32(0x1000))
        .registers(
            0,
            0x100,
            dma_engine::BLOCK_SIZE,
            RegisterKind::DmaEngine { irq_vector: 0 },
        )
        .build()
        .unwrap();
    let d = FakeDevice::new(t).unwrap();
    enable_decoding(&d);
    let mem = GuestMem::new(0x2000);
    d.dma_map(0x1000, 0x2000, mem.source(false)).unwrap();
    mem.write(0, &[0x11; 0x100]);
    let base = 0x100u64;
    bar_write64(&d, 0, base + dma_engine::SRC, 0x1000);
    bar_write64(&d, 0, base + dma_engine::DST, 0x2000);
    bar_write64(&d, 0, base + dma_engine::LEN, 0x100);
    bar_write32(&d, 0, base + dma_engine::CMD, dma_engine::CMD_START);
    let status = bar_read32(&d, 0, base + dma_engine::STATUS);
    assert_eq!(status & dma_engine::STATUS_ERROR, dma_engine::STATUS_ERROR);
    assert_eq!(status >> 8, DmaFault::BusMasterDisabled.code());
    assert!(mem.read()[0x1000..0x1100].iter().all(|b| *b == 0));
    set_command_bits(&d, CMD_BUS_MASTER, true);
    bar_write32(&d, 0, base + dma_engine::CMD, dma_engine::CMD_START);
    assert_eq!(
        bar_read32(&d, 0, base + dma_engine::STATUS),
        dma_engine::STATUS_DONE
    );
    assert!(mem.read()[0x1000..0x1100].iter().all(|b| *b == 0x11));
}

#[test]
fn intx_unmask_eventfd_unmasks_like_a_resampler() {
    let d = edu_device();
    let trigger = Efd::new();
    let resample = Efd::new();
    d.set_irq_eventfds(irq::INTX, 0, &[Some(trigger.fd())])
        .unwrap();
    d.set_irq_unmask_eventfd(irq::INTX, Some(resample.fd()))
        .unwrap();
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x1);
    assert_eq!(trigger.take(), 1);
    bar_write32(&d, 0, edu::IRQ_ACK, 0x1);
    assert!(d.intx_masked());
    resample.signal();
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.intx_masked() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !d.intx_masked(),
        "signalling the unmask eventfd unmasks INTx"
    );
    d.set_irq_unmask_eventfd(irq::INTX, None).unwrap();
}

#[test]
fn only_one_interrupt_index_is_enabled_at_a_time() {
    let d = nvme_device();
    let a = Efd::new();
    d.set_irq_eventfds(irq::MSI, 0, &[Some(a.fd())]).unwrap();
    assert_eq!(
        errno(d.set_irq_eventfds(irq::MSIX, 0, &[Some(a.fd())])),
        libc::EINVAL
    );
    assert_eq!(
        errno(d.set_irq_eventfds(irq::INTX, 0, &[Some(a.fd())])),
        libc::EINVAL
    );
    assert_eq!(errno(d.disable_irqs(irq::MSIX)), libc::EINVAL);
    d.disable_irqs(irq::MSI).unwrap();
    assert_eq!(d.active_irq(), None);
    d.set_irq_eventfds(irq::MSIX, 0, &[Some(a.fd())]).unwrap();
    assert_eq!(d.active_irq(), Some(irq::MSIX));
    // Vectors past the table size are refused; ERR and REQ have none.
    let n = d.irq_info(irq::MSIX).unwrap().count;
    assert_eq!(
        errno(d.set_irq_eventfds(irq::MSIX, n, &[Some(a.fd())])),
        libc::EINVAL
    );
    assert_eq!(d.irq_info(irq::ERR).unwrap().count, 0);
    // An index with no vectors refuses eventfds as VFIO_DEVICE_SET_IRQS does: EINVAL.
    assert_eq!(
        errno(d.set_irq_eventfds(irq::REQ, 0, &[Some(a.fd())])),
        libc::EINVAL
    );
    assert_einval(d.irq_info(5), "no interrupt index 5");
}

#[test]
fn eventfds_outlive_the_callers_borrow() {
    let d = nvme_device();
    let efd = Efd::new();
    {
        // The device keeps its own duplicate of the fd.
        let borrowed = efd.fd();
        d.set_irq_eventfds(irq::MSIX, 3, &[Some(borrowed)]).unwrap();
    }
    d.raise_irq(3);
    assert_eq!(efd.take(), 1);
    // Detaching one vector leaves it silent.
    d.set_irq_eventfds(irq::MSIX, 3, &[None]).unwrap();
    d.raise_irq(3);
    assert_eq!(efd.take(), 0);
    assert_eq!(d.counters().interrupts_dropped(), 1);
}

// ---------------------------------------------------------------- nvme-like

#[test]
fn nvme_like_msix_table_is_not_page_aligned_and_its_page_is_not_mmappable() {
    let d = nvme_device();
    let c = d.template().config();
    assert_eq!(&c[0x09..0x0c], &[0x02, 0x08, 0x01], "class 01:08:02");
    let msix = d.template().msix().unwrap();
    assert!(msix.vectors >= 16);
    assert_eq!(msix.table_bar, 0);
    assert_ne!(msix.table_offset % 4096, 0, "table not page aligned");
    assert_eq!(
        msix.table_offset / 4096,
        msix.pba_offset / 4096,
        "PBA in the same page"
    );
    let info = d.region_info(0).unwrap();
    assert!(info.mmappable());
    assert_eq!(info.flags & region_flags::CAPS, region_flags::CAPS);
    let areas = info.sparse_areas().unwrap();
    assert!(!areas.is_empty());
    let page = msix.table_offset & !0xfff;
    for a in areas {
        assert_eq!(a.offset % 4096, 0);
        assert_eq!(a.size % 4096, 0);
        assert!(a.offset + a.size <= info.size);
        assert!(
            a.offset + a.size <= page || a.offset >= page + 0x1000,
            "area {a:?} overlaps the MSI-X page"
        );
        d.mmap_region(0, *a).unwrap();
    }
    assert_einval(
        d.mmap_region(
            0,
            SparseArea {
                offset: page,
                size: 0x1000,
            },
        ),
        "the MSI-X page is not mmap-able",
    );
    assert!(info
        .caps
        .iter()
        .all(|c| !matches!(c, RegionCap::MsixMappable)));
    // Capabilities: PM, PCIe, and the extended AER and SR-IOV to hide.
    let ids: Vec<u8> = walk_caps(c).iter().map(|c| c.1).collect();
    assert!(ids.contains(&cap_id::POWER_MANAGEMENT) && ids.contains(&cap_id::PCI_EXPRESS));
    let ext: Vec<u16> = walk_ext_caps(c).iter().map(|c| c.1).collect();
    assert_eq!(ext, [ext_cap_id::AER, ext_cap_id::SRIOV]);
    // The MSI-X table is plain trapped memory; the PBA reads no pending bit.
    bar_write32(&d, 0, msix.table_offset + 8, 0x4321);
    assert_eq!(bar_read32(&d, 0, msix.table_offset + 8), 0x4321);
    bar_write32(&d, 0, msix.pba_offset, u32::MAX);
    assert_eq!(bar_read32(&d, 0, msix.pba_offset), 0);
    // CAP is read-only.
    let cap = bar_read32(&d, 0, nvme_like::CAP);
    bar_write32(&d, 0, nvme_like::CAP, 0);
    assert_eq!(bar_read32(&d, 0, nvme_like::CAP), cap);
}

#[test]
fn doorbell_write_signals_the_matching_msix_eventfd() {
    let d = nvme_device();
    let fds: Vec<Efd> = (0..16).map(|_| Efd::new()).collect();
    let borrowed: Vec<_> = fds.iter().map(|e| Some(e.fd())).collect();
    d.set_irq_eventfds(irq::MSIX, 0, &borrowed).unwrap();
    for q in [0u64, 5, 15] {
        bar_write32(
            &d,
            0,
            nvme_like::DOORBELLS + q * nvme_like::DOORBELL_STRIDE,
            1,
        );
        for (i, e) in fds.iter().enumerate() {
            assert_eq!(e.take(), u64::from(i as u64 == q), "queue {q}, vector {i}");
        }
    }
    // The CQ head doorbell (at +4) only stores its value.
    bar_write32(&d, 0, nvme_like::DOORBELLS + 4, 7);
    assert!(fds.iter().all(|e| e.take() == 0));
    assert_eq!(bar_read32(&d, 0, nvme_like::DOORBELLS + 4), 7);
}

#[test]
fn generic_dma_engine_copies_between_mappings_and_raises_its_vector() {
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0x0002)
        .bar(0, BarSpec::mem32(0x2000))
        .capability(Capability::Msi {
            vectors: 2,
            addr64: true,
            per_vector_mask: false,
        })
        .registers(
            0,
            0x100,
            dma_engine::BLOCK_SIZE,
            RegisterKind::DmaEngine { irq_vector: 1 },
        )
        .build()
        .unwrap();
    let d = FakeDevice::new(t).unwrap();
    enable_decoding(&d);
    enable_bus_master(&d);
    let mem = GuestMem::new(0x3000);
    // Two mappings back to back: a copy may cross from one to the other.
    d.dma_map(0x1000, 0x1000, mem.source(false)).unwrap();
    d.dma_map(0x2000, 0x2000, mem.source(false).with_offset(0x1000))
        .unwrap();
    let fill: Vec<u8> = (0..0x1800).map(|i| i as u8).collect();
    mem.write(0, &fill);
    let efds = [Efd::new(), Efd::new()];
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efds[0].fd()), Some(efds[1].fd())])
        .unwrap();
    let base = 0x100u64;
    bar_write64(&d, 0, base + dma_engine::SRC, 0x1800);
    bar_write64(&d, 0, base + dma_engine::DST, 0x2c00);
    bar_write64(&d, 0, base + dma_engine::LEN, 0x1000);
    bar_write32(
        &d,
        0,
        base + dma_engine::CMD,
        dma_engine::CMD_START | dma_engine::CMD_IRQ,
    );
    let status = bar_read32(&d, 0, base + dma_engine::STATUS);
    assert_eq!(status, dma_engine::STATUS_DONE);
    let s = mem.read();
    assert_eq!(
        &s[0x1c00..0x2c00],
        &(0x800..0x1800).map(|i| i as u8).collect::<Vec<_>>()[..]
    );
    assert_eq!((efds[0].take(), efds[1].take()), (0, 1));
    // Past the end of the mappings: error status, nothing copied.
    bar_write64(&d, 0, base + dma_engine::DST, 0x3800);
    bar_write32(&d, 0, base + dma_engine::CMD, dma_engine::CMD_START);
    let status = bar_read32(&d, 0, base + dma_engine::STATUS);
    assert_eq!(status & dma_engine::STATUS_ERROR, dma_engine::STATUS_ERROR);
    assert_eq!(status >> 8, DmaFault::Unmapped.code());
}

#[test]
fn generic_dma_engine_copies_from_a_remote_mapping_to_host_memory_after_the_write() {
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0x0002)
        .bar(0, BarSpec::mem32(0x2000))
        .capability(Capability::Msi {
            vectors: 2,
            addr64: true,
            per_vector_mask: false,
        })
        .registers(
            0,
            0x100,
            dma_engine::BLOCK_SIZE,
            RegisterKind::DmaEngine { irq_vector: 1 },
        )
        .build()
        .unwrap();
    let d = FakeDevice::new(t).unwrap();
    enable_bus_master(&d);
    enable_decoding(&d);
    let remote = Remote::new(0x2000, false, false);
    d.dma_map_remote(0x80_0000, 0x2000, true, remote.clone())
        .unwrap();
    let mem = GuestMem::new(0x2000);
    d.dma_map(0x1000, 0x2000, mem.source(false)).unwrap();
    let efds = [Efd::new(), Efd::new()];
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efds[0].fd()), Some(efds[1].fd())])
        .unwrap();
    let base = 0x100u64;
    bar_write64(&d, 0, base + dma_engine::SRC, 0x80_0400);
    bar_write64(&d, 0, base + dma_engine::DST, 0x1800);
    bar_write64(&d, 0, base + dma_engine::LEN, 0x1000);
    bar_write32(
        &d,
        0,
        base + dma_engine::CMD,
        dma_engine::CMD_START | dma_engine::CMD_IRQ,
    );
    // Busy: neither done nor error, and writes to the block are ignored.
    assert_eq!(bar_read32(&d, 0, base + dma_engine::STATUS), 0);
    bar_write64(&d, 0, base + dma_engine::LEN, 0x10);
    assert_eq!(bar_read32(&d, 0, base + dma_engine::LEN), 0x1000);
    remote.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bar_read32(&d, 0, base + dma_engine::CMD) & dma_engine::CMD_START != 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        bar_read32(&d, 0, base + dma_engine::STATUS),
        dma_engine::STATUS_DONE
    );
    assert_eq!(
        mem.read()[0x800..0x1800],
        remote.mem.lock().unwrap()[0x400..0x1400]
    );
    assert_eq!((efds[0].take(), efds[1].take()), (0, 1));
    // The remote range is read-only: copying into it is refused at once.
    bar_write64(&d, 0, base + dma_engine::SRC, 0x1000);
    bar_write64(&d, 0, base + dma_engine::DST, 0x80_0000);
    bar_write64(&d, 0, base + dma_engine::LEN, 0x10);
    bar_write32(&d, 0, base + dma_engine::CMD, dma_engine::CMD_START);
    let status = bar_read32(&d, 0, base + dma_engine::STATUS);
    assert_eq!(status >> 8, DmaFault::ReadOnly.code());
}

// ---------------------------------------------------------------- DMA map

#[test]
fn dma_map_refuses_overlaps_misalignment_and_iovas_outside_the_ranges() {
    let t = vfio_fake_device::profile_template("edu")
        .unwrap()
        .with_iova_ranges(vec![0..=(1 << 48) - 1])
        .unwrap();
    let d = FakeDevice::new(t).unwrap();
    assert_eq!(d.iova_ranges().unwrap(), vec![0..=(1 << 48) - 1]);
    let mem = GuestMem::new(0x4000);
    let src = mem.source(false);
    d.dma_map(0x10000, 0x2000, src).unwrap();
    assert_eq!(errno(d.dma_map(0x11000, 0x1000, src)), libc::EEXIST);
    assert_eq!(errno(d.dma_map(0xf000, 0x2000, src)), libc::EEXIST);
    assert_eq!(errno(d.dma_map(0x20000, 0x800, src)), libc::EINVAL);
    assert_eq!(errno(d.dma_map(0x20000, 0, src)), libc::EINVAL);
    assert_eq!(errno(d.dma_map(1 << 48, 0x1000, src)), libc::EINVAL);
    assert_eq!(
        errno(d.dma_map(u64::MAX - 0xfff, 0x2000, src)),
        libc::EINVAL
    );
    // Unmap: no mapping there is ENOENT, splitting one is EINVAL.
    assert_eq!(errno(d.dma_unmap(0x40000, 0x1000)), libc::ENOENT);
    assert_eq!(errno(d.dma_unmap(0x10000, 0x1000)), libc::EINVAL);
    d.dma_map(0x12000, 0x1000, src.with_offset(0x2000)).unwrap();
    assert_eq!(d.dma_mapping_count(), 2);
    // One unmap covering both mappings removes both.
    d.dma_unmap(0x10000, 0x3000).unwrap();
    assert_eq!(d.dma_mapping_count(), 0);
    let default = FakeDevice::profile("edu").unwrap();
    assert_eq!(default.iova_ranges().unwrap(), vec![0..=u64::MAX]);
}

// ---------------------------------------------------------------- reset

/// The PCI Express capability's offset in `d`'s config space.
fn pcie_cap(d: &FakeDevice) -> u64 {
    let mut at = u64::from(cfg_read16(d, 0x34) & 0xfc);
    while at != 0 {
        if cfg_read16(d, at) & 0xff == u16::from(cap_id::PCI_EXPRESS) {
            return at;
        }
        at = u64::from(cfg_read16(d, at) >> 8) & 0xfc;
    }
    panic!("no PCI Express capability");
}

#[test]
fn initiate_flr_resets_an_flr_capable_function_and_keeps_the_interrupt_wiring() {
    // PCIe r6.0 6.6.2 / 7.5.3.4: writing 1 to Initiate Function Level Reset (Device Control
    // bit 15) of a function whose Device Capabilities has FLR Capable (bit 28) resets it.
    let d = nvme_device();
    let cap = pcie_cap(&d);
    let devcap = u32::from(cfg_read16(&d, cap + 4)) | u32::from(cfg_read16(&d, cap + 6)) << 16;
    assert_ne!(devcap & (1 << 28), 0, "nvme-like says it is FLR capable");
    let efd = Efd::new();
    d.set_irq_eventfds(irq::MSIX, 0, &[Some(efd.fd())]).unwrap();
    let mem = nvme_like::DOORBELLS + 0x1000; // 0x2000: plain memory, mmap-able
    d.region_write(0, mem, &[0xa5; 16]).unwrap();
    let devctl = cfg_read16(&d, cap + 8);
    // A Device Control write without the bit changes nothing else.
    cfg_write16(&d, cap + 8, devctl & 0x7fff);
    let mut b = [0u8; 16];
    d.region_read(0, mem, &mut b).unwrap();
    assert_eq!(b, [0xa5; 16]);
    // With the bit (a one-byte write of the high half, as well): reset.
    d.region_write(region::CONFIG, cap + 9, &[((devctl >> 8) as u8) | 0x80])
        .unwrap();
    let mut cfg = vec![0u8; d.template().config().len()];
    d.region_read(region::CONFIG, 0, &mut cfg).unwrap();
    assert_eq!(cfg, d.template().config(), "config space as at reset");
    assert_eq!(cfg_read16(&d, cap + 8) & 0x8000, 0, "Initiate FLR reads 0");
    enable_decoding(&d);
    d.region_read(0, mem, &mut b).unwrap();
    assert_eq!(b, [0; 16], "device memory as at reset");
    assert_eq!(d.active_irq(), Some(irq::MSIX), "the VMM's eventfds stay");
    // A function without FLR (edu has no PCI Express capability) ignores such a write.
    let e = edu_device();
    e.region_write(0, edu::DMA_BUFFER, &[7; 4]).unwrap();
    cfg_write16(&e, 0x48, 0x8000);
    let mut k = [0u8; 4];
    e.region_read(0, edu::DMA_BUFFER, &mut k).unwrap();
    assert_eq!(k, [7; 4]);
}

/// A function from raw config space: one 4 KiB memory BAR, a Power Management capability at
/// 0x40 whose PMCSR has `pmcsr` (No_Soft_Reset is bit 3), and an Advanced Features capability at
/// 0x50 with TP and FLR (PCI Advanced Capabilities ECN).
fn pm_af_device(pmcsr: u16) -> FakeDevice {
    let mut c = vec![0u8; 256];
    c[0..4].copy_from_slice(&[0xf4, 0x1a, 0x34, 0x12]);
    c[6] = 0x10;
    c[0x0b] = 0xff;
    c[0x34] = 0x40;
    c[0x40..0x44].copy_from_slice(&[0x01, 0x50, 0x03, 0x00]);
    c[0x44..0x46].copy_from_slice(&pmcsr.to_le_bytes());
    c[0x50..0x54].copy_from_slice(&[0x13, 0x00, 0x06, 0x03]);
    let t = DeviceTemplate::from_config(c, &[Some(0x1000)]).unwrap();
    let d = FakeDevice::new(t).unwrap();
    enable_decoding(&d);
    d
}

/// Writes a byte pattern into BAR0 and says whether it is still there.
fn bar0_keeps(d: &FakeDevice, mark: bool) -> bool {
    if mark {
        d.region_write(0, 0x100, &[0x5a; 8]).unwrap();
    }
    enable_decoding(d);
    let mut b = [0u8; 8];
    d.region_read(0, 0x100, &mut b).unwrap();
    b == [0x5a; 8]
}

#[test]
fn d3hot_to_d0_resets_a_function_without_no_soft_reset_and_spares_one_with_it() {
    // PCI PM 1.2, 5.4.1 / 7.1.2: with No_Soft_Reset clear, D3hot -> D0 resets the function.
    let d = pm_af_device(0x0000);
    assert!(bar0_keeps(&d, true));
    cfg_write16(&d, 0x44, 0x0003); // D3hot
    assert!(bar0_keeps(&d, false), "entering D3hot does not reset");
    cfg_write16(&d, 0x44, 0x0000); // D0
    assert!(!bar0_keeps(&d, false), "D3hot -> D0 reset the function");
    assert_eq!(cfg_read16(&d, 0x44) & 3, 0);
    // No_Soft_Reset set: the state survives the same transition.
    let k = pm_af_device(0x0008);
    assert!(bar0_keeps(&k, true));
    cfg_write16(&k, 0x44, 0x000b);
    cfg_write16(&k, 0x44, 0x0008);
    assert!(bar0_keeps(&k, false), "No_Soft_Reset keeps the state");
}

#[test]
fn advanced_features_initiate_flr_resets_the_function() {
    let d = pm_af_device(0x0008);
    assert!(bar0_keeps(&d, true));
    // AF Control (cap + 4), bit 0: Initiate FLR.
    d.region_write(region::CONFIG, 0x54, &[0x01]).unwrap();
    let mut cfg = vec![0u8; 256];
    d.region_read(region::CONFIG, 0, &mut cfg).unwrap();
    assert_eq!(cfg, d.template().config(), "config space as at reset");
    assert!(!bar0_keeps(&d, false), "AF FLR reset the function");
}

#[test]
fn reset_restores_config_and_registers_and_disables_interrupts() {
    let d = edu_device();
    let efd = Efd::new();
    d.set_irq_eventfds(irq::MSI, 0, &[Some(efd.fd())]).unwrap();
    cfg_write32(&d, 0x10, 0xfe00_0000);
    cfg_write16(&d, 0x3c, 0x0b);
    bar_write32(&d, 0, edu::LIVENESS, 5);
    bar_write32(&d, 0, edu::IRQ_RAISE, 0x10);
    assert_eq!(efd.take(), 1);
    d.region_write(0, edu::DMA_BUFFER, &[1, 2, 3]).unwrap();
    let mem = GuestMem::new(0x1000);
    d.dma_map(0x1000, 0x1000, mem.source(false)).unwrap();

    d.reset().unwrap();
    let fresh = edu_device();
    let mut cfg = vec![0u8; 256];
    d.region_read(region::CONFIG, 0, &mut cfg).unwrap();
    assert_eq!(
        cfg,
        d.template().config(),
        "config space back to the template"
    );
    assert_eq!(d.active_irq(), None);
    enable_decoding(&d);
    for reg in [
        edu::ID,
        edu::LIVENESS,
        edu::FACTORIAL,
        edu::STATUS,
        edu::IRQ_STATUS,
    ] {
        assert_eq!(
            bar_read32(&d, 0, reg),
            bar_read32(&fresh, 0, reg),
            "register {reg:#x} as on a fresh device"
        );
    }
    assert_eq!(bar_read32(&d, 0, edu::IRQ_STATUS), 0);
    let mut b = [0xffu8; 3];
    d.region_read(0, edu::DMA_BUFFER, &mut b).unwrap();
    assert_eq!(b, [0, 0, 0]);
    d.raise_irq(0);
    assert_eq!(efd.take(), 0, "interrupts are disabled by reset");
    assert_eq!(d.dma_mapping_count(), 1, "reset leaves the IOMMU alone");
}

// ---------------------------------------------------------------- faults

#[test]
fn a_dead_device_fails_every_call_with_eio() {
    let d = edu_device();
    d.faults().set_dead(true);
    let mut b = [0u8; 4];
    assert_eq!(errno(d.region_read(region::CONFIG, 0, &mut b)), libc::EIO);
    assert_eq!(errno(d.reset()), libc::EIO);
    assert_eio(d.device_info(), "device_info");
    assert!(d.region_mmap_fd(0).is_none());
    // The IOMMU domain is not the device: it still answers, and plays dead on its own.
    d.iova_ranges().unwrap();
    d.iommu().faults().set_dead(true);
    assert_eq!(errno(d.iova_ranges().map(drop)), libc::EIO);
    d.iommu().faults().clear();
    d.faults().clear();
    d.region_read(region::CONFIG, 0, &mut b).unwrap();
}

#[test]
fn an_injected_failure_hits_only_its_operation_and_count() {
    let d = edu_device();
    d.iommu().faults().fail(Op::DmaMap, libc::ENOMEM, Some(2));
    let mem = GuestMem::new(0x1000);
    assert_eq!(
        errno(d.dma_map(0x1000, 0x1000, mem.source(false))),
        libc::ENOMEM
    );
    assert_eq!(
        errno(d.dma_map(0x1000, 0x1000, mem.source(false))),
        libc::ENOMEM
    );
    d.region_read(region::CONFIG, 0, &mut [0u8; 4]).unwrap();
    d.dma_map(0x1000, 0x1000, mem.source(false)).unwrap();
    d.faults().fail(Op::Reset, libc::EBUSY, None);
    for _ in 0..3 {
        assert_eq!(errno(d.reset()), libc::EBUSY);
    }
    d.faults().clear();
    d.reset().unwrap();
}

#[test]
fn a_hanging_device_answers_late_but_answers() {
    let d = edu_device();
    d.faults().set_hang(Some(Duration::from_millis(60)));
    let t0 = Instant::now();
    d.device_info().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(60));
    d.faults().set_hang(None);
    let t0 = Instant::now();
    d.device_info().unwrap();
    assert!(t0.elapsed() < Duration::from_millis(60));
}

#[test]
fn counters_count_every_call_and_event() {
    let d = edu_device();
    d.counters().reset();
    let mut b = [0u8; 4];
    for _ in 0..3 {
        d.region_read(0, edu::ID, &mut b).unwrap();
    }
    let _ = d.region_read(9, 0, &mut b);
    d.region_write(0, edu::LIVENESS, &b).unwrap();
    d.reset().unwrap();
    let c = d.counters();
    assert_eq!(c.calls(Op::RegionRead), 4, "failed calls count too");
    assert_eq!(c.calls(Op::RegionWrite), 1);
    assert_eq!(c.calls(Op::Reset), 1);
    assert_eq!(c.bytes_read(), 12);
    assert_eq!(c.bytes_written(), 4);
    assert_eq!(c.calls(Op::DmaMap), 0);
}

#[test]
fn profiles_are_enumerable_by_name() {
    let names = FakeDevice::profiles();
    assert!(names.contains(&"edu") && names.contains(&"nvme-like"));
    for n in names {
        let d = FakeDevice::profile(n).unwrap();
        assert!(d.device_info().unwrap().is_pci());
    }
    assert!(matches!(
        FakeDevice::profile("nope"),
        Err(FakeError::UnknownProfile { .. })
    ));
}

#[test]
fn fake_device_is_send_sync_and_usable_as_dyn_vfio() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FakeDevice>();
    let d: std::sync::Arc<dyn Vfio> = std::sync::Arc::new(edu_device());
    let t = {
        let d = std::sync::Arc::clone(&d);
        std::thread::spawn(move || {
            let mut b = [0u8; 4];
            for _ in 0..100 {
                d.region_read(0, edu::ID, &mut b).unwrap();
            }
            u32::from_le_bytes(b)
        })
    };
    assert_eq!(t.join().unwrap(), edu::ID_VALUE);
}

#[test]
fn lspci_region_lines_inside_the_sriov_capability_are_not_the_functions_bars() {
    // lspci -vv prints the VF BARs of an SR-IOV capability as indented
    // `Region N:` lines inside the capability: they describe the VFs.
    let text = LSPCI_VVXXXX.replace(
        "\tCapabilities: [100 v2] Advanced Error Reporting\n",
        "\tCapabilities: [100 v2] Advanced Error Reporting\n\
         \tCapabilities: [160 v1] Single Root I/O Virtualization (SR-IOV)\n\
         \t\tRegion 0: Memory at 00000000fd000000 (64-bit, prefetchable) [size=1M]\n\
         \t\tRegion 2: Memory at 00000000fc000000 (64-bit, prefetchable) [size=4M]\n",
    );
    let dump = vfio_fake_device::lspci::parse(&text).unwrap();
    assert_eq!(dump.bar_sizes[0], Some(16 << 10));
    assert_eq!(dump.bar_sizes[2], Some(256));
}

#[test]
fn lspci_rom_size_above_the_fake_limit_is_refused_before_it_is_allocated() {
    // A dump's `Expansion ROM ... [size=1T]` used to be allocated (and abort the process)
    // before the 16 MiB limit was checked.
    let text = format!("{LSPCI_XXX}\tExpansion ROM at fe000000 [disabled] [size=1T]\n");
    let e = DeviceTemplate::from_lspci(&text, Some(&[Some(128 << 10), Some(64)])).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    let t = DeviceTemplate::from_lspci(LSPCI_XXX, Some(&[Some(128 << 10), Some(64)])).unwrap();
    for size in [1 << 40, u64::MAX] {
        assert!(
            matches!(
                t.clone().with_rom_size(size),
                Err(FakeError::InvalidTemplate(m)) if m.contains("limit")
            ),
            "{size:#x}"
        );
    }
    let t = t.with_rom_size(5000).unwrap();
    assert_eq!(t.rom().unwrap().len(), 8192, "rounded up to a power of two");
}

/// (read end, write end) of a pipe.
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors we own, each taken over once.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

#[test]
fn interrupt_fds_that_are_not_eventfds_are_einval_and_none_of_the_set_is_kept() {
    use std::os::fd::AsFd;
    // vfio-pci takes eventfds only (eventfd_ctx_fdget): anything else is EINVAL.
    let d = nvme_device();
    let good = Efd::new();
    let (r, w) = pipe();
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    for bad in [w.as_fd(), r.as_fd(), sock.as_fd()] {
        assert_eq!(
            errno(d.set_irq_eventfds(irq::MSIX, 0, &[Some(good.fd()), Some(bad)])),
            libc::EINVAL
        );
        assert_eq!(d.active_irq(), None, "part of a refused set was kept");
    }
    // The INTx unmask fd too.
    let d = edu_device();
    d.set_irq_eventfds(irq::INTX, 0, &[Some(good.fd())])
        .unwrap();
    assert_eq!(
        errno(d.set_irq_unmask_eventfd(irq::INTX, Some(w.as_fd()))),
        libc::EINVAL
    );
}

#[test]
fn signalling_an_eventfd_whose_counter_is_full_neither_blocks_nor_holds_the_device() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let d = nvme_device();
    // A blocking eventfd, as a client may hand one over.
    // SAFETY: eventfd takes no pointers; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor we own.
    let e = unsafe { OwnedFd::from_raw_fd(raw) };
    d.set_irq_eventfds(irq::MSIX, 0, &[Some(std::os::fd::AsFd::as_fd(&e))])
        .unwrap();
    let max: u64 = 0xffff_ffff_ffff_fffe;
    // SAFETY: writes 8 bytes from a live u64 (the counter is 0: no wait).
    let n = unsafe { libc::write(e.as_raw_fd(), std::ptr::from_ref(&max).cast(), 8) };
    assert_eq!(n, 8);
    let dropped = d.counters().interrupts_dropped();
    // In a thread, so that a blocking signal fails the test instead of hanging it.
    let d = std::sync::Arc::new(d);
    let d2 = d.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        d2.raise_irq(0);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(5)).is_err() {
        // Unwedge the device thread before failing.
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        unsafe { libc::read(e.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
        panic!("signalling a full eventfd blocked the device");
    }
    assert_eq!(d.counters().interrupts_dropped(), dropped + 1);
    // The device lock is free: config space answers.
    let mut b = [0u8; 2];
    d.region_read(region::CONFIG, 0, &mut b).unwrap();
    assert_eq!(u16::from_le_bytes(b), nvme_like::VENDOR_ID);
}

#[test]
fn devices_of_one_fake_iommu_share_its_mappings_and_one_leaving_keeps_them() {
    let iommu = vfio_fake_device::FakeIommu::new();
    let edu = || {
        FakeDevice::with_iommu(
            vfio_fake_device::profile_template("edu").unwrap(),
            iommu.clone(),
        )
        .unwrap()
    };
    let mem = GuestMem::new(0x1000);
    let a = edu();
    let b = edu();
    assert_eq!(a.iommu_domain().id(), b.iommu_domain().id());
    assert_eq!(iommu.device_count(), 2);
    // Mapped through one device's domain, reached by the other's DMA.
    a.dma_map(0x1000, 0x1000, mem.source(false)).unwrap();
    b.dma_write(0x1010, &[9; 4]).unwrap();
    assert_eq!(mem.read()[0x10..0x14], [9; 4]);
    drop(a);
    assert_eq!(iommu.device_count(), 1);
    assert_eq!(
        b.dma_mapping_count(),
        1,
        "unplug leaves the domain's mappings"
    );
    let mut back = [0u8; 4];
    b.dma_read(0x1010, &mut back).unwrap();
    assert_eq!(back, [9; 4]);
    b.dma_unmap(0x1000, 0x1000).unwrap();
    assert_eq!(b.dma_read(0x1010, &mut back), Err(DmaFault::Unmapped));
}
