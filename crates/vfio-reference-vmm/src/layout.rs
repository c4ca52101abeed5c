//! The guest physical address map: where RAM, the boot structures, the PCI windows and the
//! interrupt controllers go, and the e820 map that tells the guest.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT            0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack (grows down)  0x0000_9000  page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line      0x000f_0000  MP floating pointer + table
//! 0x0010_0000  the kernel (bzImage's protected-mode part), initrd at the top of low RAM
//! 0xc000_0000  32-bit PCI hole: BARs 0xc000_0000..0xfec0_0000, IOAPIC, LAPIC, KVM's TSS
//! 4 GiB        the rest of RAM, when there is more than 3 GiB
//! 64 GiB (or above RAM)   the 64-bit BAR window (64 GiB)
//! I/O ports 0xc000..0x10000: I/O BARs
//! ```

/// Where the GDT goes.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT goes.
pub const IDT_ADDR: u64 = 0x520;
/// The boot_params ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Level 4 page table; the PDPT and PD follow, a page each.
pub const PML4_ADDR: u64 = 0x9000;
/// The page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// The page directory (2 MiB pages identity-mapping the first GiB).
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Most bytes of command line (with its NUL) the VMM places.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// The MP floating pointer, followed by the MP configuration table: in the BIOS area that
/// Linux scans (0xF0000..0x100000), which the e820 map leaves out of RAM.
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// End of the MP table's room.
pub const MPTABLE_END: u64 = 0x10_0000;
/// End of the RAM below 1 MiB the guest is told about (the EBDA and BIOS areas above are not
/// RAM to it).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI hole: RAM stops here and resumes at 4 GiB.
pub const PCI_HOLE_START: u64 = 0xc000_0000;
/// Start of 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;
/// The 32-bit BAR window.
pub const MMIO32_BASE: u64 = PCI_HOLE_START;
/// Its size: up to the IOAPIC.
pub const MMIO32_SIZE: u64 = 0xfec0_0000 - MMIO32_BASE;
/// KVM's TSS (three pages), for Intel's real-mode emulation.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity map page (Intel without unrestricted guest).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// The I/O port window for I/O BARs.
pub const IO_BASE: u64 = 0xc000;
/// Its size.
pub const IO_SIZE: u64 = 0x4000;
/// Size of the 64-bit BAR window.
pub const MMIO64_SIZE: u64 = 64 << 30;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest RAM regions for `mem` bytes: below the PCI hole, then the rest from 4 GiB.
/// These are what is backed (and given to KVM and for DMA); what the guest may use is
/// [`e820`]'s.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    let low = mem.min(PCI_HOLE_START);
    let mut out = vec![(0, low)];
    if mem > low {
        out.push((FOUR_GIB, mem - low));
    }
    out
}

/// The e820 map for `mem` bytes of RAM: RAM below 640 KiB less the EBDA, RAM from 1 MiB to
/// the PCI hole (or the end of RAM), RAM above 4 GiB for the rest, and the MP table's area
/// reserved.
pub fn e820(mem: u64) -> Vec<E820Entry> {
    let mut out = vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_ADDR,
            size: MPTABLE_END - MPTABLE_ADDR,
            kind: E820_RESERVED,
        },
    ];
    for (base, size) in ram_regions(mem) {
        let (base, size) = if base == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (base, size)
        };
        if size > 0 {
            out.push(E820Entry {
                addr: base,
                size,
                kind: E820_RAM,
            });
        }
    }
    out
}

/// The 64-bit BAR window: 64 GiB from 64 GiB, or from the first 1 GiB boundary above RAM
/// when RAM reaches past 64 GiB.
pub fn mmio64_base(mem: u64) -> u64 {
    let top = ram_regions(mem)
        .iter()
        .map(|(b, s)| b + s)
        .max()
        .unwrap_or(0);
    let gib = 1u64 << 30;
    (top.div_ceil(gib) * gib).max(64 << 30)
}

/// Where an initrd of `size` bytes goes: page aligned, as high as it fits in RAM below the
/// PCI hole and at or below `addr_max` (the kernel's `initrd_addr_max`), above `floor` (the
/// kernel's end). `None` when it does not fit.
pub fn initrd_addr(mem: u64, size: u64, addr_max: u64, floor: u64) -> Option<u64> {
    let low_end = mem.min(PCI_HOLE_START);
    let limit = low_end.min(addr_max.saturating_add(1));
    let addr = limit.checked_sub(size)? & !0xfff;
    (addr >= floor).then_some(addr)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn e820_ram_never_overlaps_the_pci_hole_and_covers_all_memory_above_1_mib() {
        let hole = (PCI_HOLE_START, FOUR_GIB - PCI_HOLE_START);
        for mem in [64 << 20, 256 << 20, 3 << 30, (3 << 30) + (1 << 20), 8 << 30] {
            let map = e820(mem);
            let ram: Vec<&E820Entry> = map.iter().filter(|e| e.kind == E820_RAM).collect();
            for e in &ram {
                assert!(!overlaps((e.addr, e.size), hole), "{mem:#x}: {e:?}");
                assert!(!overlaps(
                    (e.addr, e.size),
                    (MPTABLE_ADDR, MPTABLE_END - MPTABLE_ADDR)
                ));
            }
            let above_1m: u64 = ram
                .iter()
                .filter(|e| e.addr >= HIMEM_START)
                .map(|e| e.size)
                .sum();
            assert_eq!(above_1m, mem - HIMEM_START, "{mem:#x}");
            // Every RAM entry is backed by a RAM region.
            let regions = ram_regions(mem);
            for e in &ram {
                assert!(regions
                    .iter()
                    .any(|(b, s)| e.addr >= *b && e.addr + e.size <= b + s));
            }
        }
    }

    #[test]
    fn memory_beyond_3_gib_continues_at_4_gib_and_the_64_bit_window_is_above_it() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(mmio64_base(256 << 20), 64 << 30);
        assert_eq!(mmio64_base(100 << 30), 101 << 30);
    }

    #[test]
    fn the_initrd_goes_page_aligned_at_the_top_of_low_ram_and_must_fit_above_the_kernel() {
        assert_eq!(
            initrd_addr(256 << 20, 0x1800, u64::from(u32::MAX >> 1), 0),
            Some((256 << 20) - 0x2000)
        );
        // initrd_addr_max below the top of RAM bounds it.
        assert_eq!(
            initrd_addr(8 << 30, 0x1000, 0x7fff_ffff, 0),
            Some(0x7fff_f000)
        );
        assert_eq!(initrd_addr(64 << 20, 63 << 20, 0x7fff_ffff, 16 << 20), None);
    }
}
