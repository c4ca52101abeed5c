//! What a guest driver does to a [`VfioPciDevice`]: config-space reads and
//! writes, capability walks bounded as Linux bounds them, BAR sizing and
//! MSI-X programming.

use vfio_pci::VfioPciDevice;

/// Capability ids: pci-config's, the one PCI vocabulary of the workspace.
pub use pci_config::cap_id;
/// Size of one MSI-X table entry.
pub const MSIX_ENTRY: u64 = 16;

/// Reads a config dword.
pub fn cfg_read32(dev: &VfioPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

/// Reads a config word.
pub fn cfg_read16(dev: &VfioPciDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    dev.read_config(off, &mut b);
    u16::from_le_bytes(b)
}

/// Reads a config byte.
pub fn cfg_read8(dev: &VfioPciDevice, off: u64) -> u8 {
    let mut b = [0u8; 1];
    dev.read_config(off, &mut b);
    b[0]
}

/// The BAR at slot `n` (0..=5 BARs, 6 the ROM, as VFIO numbers its regions); past that, a
/// BAR number that names no BAR.
pub fn bar_index(n: usize) -> vfio_pci::BarIndex {
    vfio_pci::BarIndex::from_slot(n).unwrap_or(vfio_pci::BarIndex::Bar(n as u8))
}

/// Writes a config dword.
pub fn cfg_write32(
    dev: &VfioPciDevice,
    off: u64,
    v: u32,
) -> vfio_pci::Result<vfio_pci::ConfigWriteOutcome> {
    dev.write_config(off, &v.to_le_bytes())
}

/// Writes a config word.
pub fn cfg_write16(
    dev: &VfioPciDevice,
    off: u64,
    v: u16,
) -> vfio_pci::Result<vfio_pci::ConfigWriteOutcome> {
    dev.write_config(off, &v.to_le_bytes())
}

/// The standard capability chain as Linux walks it: at most 48 entries,
/// pointers below 0x40 end it. Returns (id, offset) pairs.
pub fn walk_caps(dev: &VfioPciDevice) -> Vec<(u8, u64)> {
    let mut out = Vec::new();
    if cfg_read16(dev, 0x06) & 0x10 == 0 {
        return out;
    }
    let mut ptr = u64::from(cfg_read8(dev, 0x34) & 0xfc);
    let mut ttl = 48;
    while ptr >= 0x40 && ttl > 0 {
        out.push((cfg_read8(dev, ptr), ptr));
        ptr = u64::from(cfg_read8(dev, ptr + 1) & 0xfc);
        ttl -= 1;
    }
    out
}

/// The extended capability chain as Linux walks it (bounded by the number
/// of dwords above 0x100; id 0 is skipped). Returns (id, offset) pairs.
pub fn walk_ext_caps(dev: &VfioPciDevice) -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    let mut ptr = 0x100u64;
    let mut ttl = (4096 - 0x100) / 8;
    while ptr >= 0x100 && ttl > 0 {
        let hdr = cfg_read32(dev, ptr);
        if hdr == 0 || hdr == u32::MAX {
            break;
        }
        let id = (hdr & 0xffff) as u16;
        if id != 0 {
            out.push((id, ptr));
        }
        ptr = u64::from((hdr >> 20) & 0xffc);
        ttl -= 1;
    }
    out
}

/// Offset of the first standard capability with `id`.
pub fn find_cap(dev: &VfioPciDevice, id: u8) -> Option<u64> {
    walk_caps(dev).into_iter().find(|c| c.0 == id).map(|c| c.1)
}

/// Sizes BAR `i` as a guest does (save, all ones, read, restore); returns
/// the size (0 when unimplemented). A 64-bit BAR is sized over both halves.
pub fn size_bar(dev: &VfioPciDevice, i: u64) -> vfio_pci::Result<u64> {
    let reg = 0x10 + 4 * i;
    let orig = cfg_read32(dev, reg);
    cfg_write32(dev, reg, u32::MAX)?;
    let lo = cfg_read32(dev, reg);
    cfg_write32(dev, reg, orig)?;
    if lo == 0 {
        return Ok(0);
    }
    if lo & 1 == 1 {
        let mask = lo & !0x3;
        return Ok(u64::from((!mask).wrapping_add(1)));
    }
    if (lo >> 1) & 3 == 2 && i < 5 {
        let orig_hi = cfg_read32(dev, reg + 4);
        cfg_write32(dev, reg + 4, u32::MAX)?;
        let hi = cfg_read32(dev, reg + 4);
        cfg_write32(dev, reg + 4, orig_hi)?;
        let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        Ok((!mask).wrapping_add(1))
    } else {
        Ok(u64::from((!(lo & !0xf)).wrapping_add(1)))
    }
}

/// Sets memory decoding and bus mastering in the command register.
pub fn enable_device(dev: &VfioPciDevice) -> vfio_pci::Result<()> {
    let cmd = cfg_read16(dev, 0x04);
    cfg_write16(dev, 0x04, cmd | 0x6).map(drop)
}

/// Where the guest finds the MSI-X table: (capability offset, BAR index,
/// table offset in that BAR), from the capability as the guest reads it.
pub fn msix_table(dev: &VfioPciDevice) -> Option<(u64, usize, u64)> {
    let cap = find_cap(dev, cap_id::MSIX)?;
    let table = cfg_read32(dev, cap + 4);
    Some((cap, (table & 7) as usize, u64::from(table & !7)))
}

/// Where the guest finds the PBA: (BAR index, offset in that BAR).
pub fn msix_pba(dev: &VfioPciDevice) -> Option<(usize, u64)> {
    let cap = find_cap(dev, cap_id::MSIX)?;
    let pba = cfg_read32(dev, cap + 8);
    Some(((pba & 7) as usize, u64::from(pba & !7)))
}

/// Programs MSI-X entry `v`: address, data, and its vector control.
pub fn program_msix_entry(
    dev: &VfioPciDevice,
    bar: usize,
    table: u64,
    v: u64,
    addr: u64,
    data: u32,
    masked: bool,
) -> vfio_pci::Result<()> {
    let e = table + MSIX_ENTRY * v;
    let bar = bar_index(bar);
    dev.write_bar(bar, e, &(addr as u32).to_le_bytes())?;
    dev.write_bar(bar, e + 4, &((addr >> 32) as u32).to_le_bytes())?;
    dev.write_bar(bar, e + 8, &data.to_le_bytes())?;
    dev.write_bar(bar, e + 12, &u32::from(masked).to_le_bytes())
}

/// Masks or unmasks MSI-X vector `v` through its vector control dword.
pub fn mask_msix_vector(
    dev: &VfioPciDevice,
    bar: usize,
    table: u64,
    v: u64,
    masked: bool,
) -> vfio_pci::Result<()> {
    dev.write_bar(
        bar_index(bar),
        table + MSIX_ENTRY * v + 12,
        &u32::from(masked).to_le_bytes(),
    )
}

/// Sets or clears MSI-X enable (clearing the function mask when enabling).
pub fn msix_enable(dev: &VfioPciDevice, cap: u64, on: bool) -> vfio_pci::Result<()> {
    let ctl = cfg_read16(dev, cap + 2);
    let ctl = if on {
        (ctl | 0x8000) & !0x4000
    } else {
        ctl & !0x8000
    };
    cfg_write16(dev, cap + 2, ctl).map(drop)
}

/// Enables MSI-X with every vector programmed (address 0xfee0_0000, data
/// 0x20 + vector) and unmasked. Returns (capability offset, BAR, table offset).
pub fn enable_msix_all(dev: &VfioPciDevice) -> Option<(u64, usize, u64)> {
    let (cap, bar, table) = msix_table(dev)?;
    let n = u64::from(dev.msix_vectors());
    for v in 0..n {
        program_msix_entry(dev, bar, table, v, 0xfee0_0000, 0x20 + v as u32, false).ok()?;
    }
    msix_enable(dev, cap, true).ok()?;
    Some((cap, bar, table))
}
