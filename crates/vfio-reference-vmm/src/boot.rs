//! Loading Linux and the state of the boot vCPU for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): linux-loader loads the bzImage and writes boot_params;
//! this file fills boot_params (e820, command line, initrd), and writes the identity page
//! tables and the GDT, and gives the vCPU registers (long mode, RSI = boot_params, RIP = the
//! 64-bit entry point at the protected-mode kernel's start + 0x200).

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::*;

/// `boot_flag` magic.
const BOOT_FLAG: u16 = 0xaa55;
/// `header` magic ("HdrS").
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined loader.
const LOADER_OTHER: u8 = 0xff;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const ENTRY_64_OFFSET: u64 = 0x200;

/// What loading left for the vCPU and boot_params.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    /// The bzImage's setup header, as linux-loader read it.
    pub header: setup_header,
    /// The 64-bit entry point.
    pub entry: u64,
    /// End of the loaded kernel.
    pub kernel_end: u64,
}

/// Loads the bzImage at `path` at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Loaded> {
    let mut f = File::open(path).map_err(|source| Error::File {
        what: "kernel",
        path: path.display().to_string(),
        source,
    })?;
    let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| Error::Boot(format!("loading bzImage {}: {e}", path.display())))?;
    let header = r
        .setup_header
        .ok_or_else(|| Error::Boot(format!("{}: no setup header", path.display())))?;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Boot(format!(
            "{}: boot protocol {:#x}, xloadflags {:#x}: no 64-bit entry point (needs 2.12 and XLF_KERNEL_64)",
            path.display(),
            { header.version },
            { header.xloadflags }
        )));
    }
    Ok(Loaded {
        header,
        entry: r.kernel_load.0 + ENTRY_64_OFFSET,
        kernel_end: r.kernel_end,
    })
}

/// Loads the initrd at `path` at the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    loaded: &Loaded,
) -> Result<(u64, u64)> {
    let data = std::fs::read(path).map_err(|source| Error::File {
        what: "initrd",
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let addr = initrd_addr(
        mem_size,
        size,
        u64::from(loaded.header.initrd_addr_max),
        loaded.kernel_end,
    )
    .ok_or_else(|| {
        Error::Boot(format!(
            "initrd {} ({size} bytes) does not fit in low RAM above the kernel: give more --memory",
            path.display()
        ))
    })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| Error::Memory(format!("writing the initrd at {addr:#x}: {e}")))?;
    Ok((addr, size))
}

/// Writes the command line at [`CMDLINE_ADDR`]; returns its length with the NUL.
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str, loaded: &Loaded) -> Result<usize> {
    let limit = usize::try_from(loaded.header.cmdline_size)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .min(CMDLINE_MAX);
    let c = Cmdline::try_from(cmdline, limit)
        .map_err(|e| Error::Boot(format!("command line (at most {} bytes): {e}", limit - 1)))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &c)
        .map_err(|e| Error::Boot(format!("writing the command line: {e}")))?;
    Ok(cmdline.len() + 1)
}

/// The boot_params of a guest with `mem_size` bytes of RAM.
pub fn boot_params(
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<boot_params> {
    let mut p = boot_params {
        hdr: header,
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_OTHER;
    p.hdr.boot_flag = BOOT_FLAG;
    p.hdr.header = HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = u32::try_from(addr)
            .map_err(|_| Error::Boot(format!("initrd at {addr:#x} above 4 GiB")))?;
        p.hdr.ramdisk_size = u32::try_from(size)
            .map_err(|_| Error::Boot(format!("initrd of {size} bytes: 4 GiB at most")))?;
    }
    let map = e820(mem_size);
    if map.len() > p.e820_table.len() {
        return Err(Error::Boot(format!("{} e820 entries", map.len())));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len() as u8;
    Ok(p)
}

/// Writes boot_params at [`ZERO_PAGE_ADDR`] (with linux-loader's configurator).
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| Error::Boot(format!("writing boot_params: {e}")))
}

/// GDT entries: null, 64-bit code, data, TSS (selectors 0x8, 0x10, 0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

/// The kvm_segment for GDT entry `index`.
pub fn segment(index: u16) -> kvm_segment {
    let e = GDT.get(usize::from(index)).copied().unwrap_or(0);
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | (((e >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from((e >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT, and page tables identity-mapping the first GiB with 2 MiB
/// pages.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| Error::Memory(format!("writing boot tables at {at:#x}: {e}")))
    };
    for (i, e) in GDT.iter().enumerate() {
        w(*e, GDT_ADDR + 8 * i as u64)?;
    }
    w(0, IDT_ADDR)?;
    w(PDPT_ADDR | 0x3, PML4_ADDR)?;
    w(PD_ADDR | 0x3, PDPT_ADDR)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w((i << 21) | 0x83, PD_ADDR + 8 * i)?;
    }
    Ok(())
}

/// The boot vCPU's special registers: long mode with paging, the GDT's segments.
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 7;
    s.cs = segment(1);
    let data = segment(2);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(3);
    // CR0: PE, ET, PG; CR4: PAE; EFER: LME, LMA.
    s.cr0 |= 0x1 | 0x10 | 0x8000_0000;
    s.cr3 = PML4_ADDR;
    s.cr4 |= 0x20;
    s.efer |= 0x100 | 0x400;
    s
}

/// The boot vCPU's registers: RIP at the 64-bit entry, RSI at boot_params.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn boot_params_carry_the_e820_map_the_command_line_and_the_initrd() {
        let header = setup_header {
            cmdline_size: 2047,
            ..Default::default()
        };
        let p = boot_params(header, 20, Some((0x0f00_0000, 0x1234)), 256 << 20).unwrap();
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.header }, HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, LOADER_OTHER);
        assert_eq!(
            ({ p.hdr.cmd_line_ptr }, { p.hdr.cmdline_size }),
            (CMDLINE_ADDR as u32, 20)
        );
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x0f00_0000, 0x1234)
        );
        let map = e820(256 << 20);
        assert_eq!(usize::from(p.e820_entries), map.len());
        for (got, want) in p.e820_table.iter().zip(map.iter()) {
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (want.addr, want.size, want.kind)
            );
        }
    }

    #[test]
    fn gdt_segments_are_flat_64_bit_code_and_flat_data() {
        let cs = segment(1);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        let ds = segment(2);
        assert_eq!(
            (ds.l, ds.db, ds.type_, ds.limit, ds.selector),
            (0, 1, 3, 0xffff_ffff, 0x10)
        );
        assert_eq!(segment(0).unusable, 1);
    }
}
