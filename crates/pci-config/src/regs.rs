//! Offsets and bit definitions of the type-0 configuration header (PCI Local Bus 3.0 §6.1,
//! PCIe Base §7.5.1).

/// Size of the whole (PCIe) configuration space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional PCI configuration space (header plus standard capabilities).
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;
/// Size of the standard type-0 header; capabilities start at or after this offset.
pub const HEADER_SIZE: usize = 0x40;
/// First offset of the extended configuration space (the first extended capability lives here).
pub const EXTENDED_CONFIG_START: usize = 0x100;

/// Vendor ID register (16 bits, read-only).
pub const VENDOR_ID: usize = 0x00;
/// Device ID register (16 bits, read-only).
pub const DEVICE_ID: usize = 0x02;
/// Command register (16 bits).
pub const COMMAND: usize = 0x04;
/// Status register (16 bits; error bits are write-1-to-clear).
pub const STATUS: usize = 0x06;
/// Revision ID register (8 bits, read-only).
pub const REVISION_ID: usize = 0x08;
/// Programming interface byte of the class code.
pub const PROG_IF: usize = 0x09;
/// Sub-class byte of the class code.
pub const SUBCLASS: usize = 0x0a;
/// Base class byte of the class code.
pub const BASE_CLASS: usize = 0x0b;
/// Cache line size register (8 bits, writable).
pub const CACHE_LINE_SIZE: usize = 0x0c;
/// Latency timer register (8 bits).
pub const LATENCY_TIMER: usize = 0x0d;
/// Header type register; bit 7 is the multi-function bit.
pub const HEADER_TYPE: usize = 0x0e;
/// Built-in self test register.
pub const BIST: usize = 0x0f;
/// Base address register 0; BAR n is at `BAR0 + 4 * n`.
pub const BAR0: usize = 0x10;
/// CardBus CIS pointer.
pub const CARDBUS_CIS: usize = 0x28;
/// Subsystem vendor ID register (16 bits, read-only).
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID register (16 bits, read-only).
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Expansion ROM base address register.
pub const ROM_ADDRESS: usize = 0x30;
/// Capabilities pointer (8 bits; the low 2 bits are reserved).
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line register (8 bits, writable scratch register for the guest).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin register (8 bits, read-only; 0 = none, 1..=4 = INTA#..INTD#).
pub const INTERRUPT_PIN: usize = 0x3d;
/// Min_Gnt register.
pub const MIN_GNT: usize = 0x3e;
/// Max_Lat register.
pub const MAX_LAT: usize = 0x3f;

/// Multi-function bit of the header type register.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

/// Command: I/O space decode enable.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command: memory space decode enable.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: special cycles (hard-wired to 0 on PCIe).
pub const COMMAND_SPECIAL_CYCLES: u16 = 1 << 3;
/// Command: memory write and invalidate enable (hard-wired to 0 on PCIe).
pub const COMMAND_MWI: u16 = 1 << 4;
/// Command: VGA palette snoop (hard-wired to 0 on PCIe).
pub const COMMAND_VGA_PALETTE_SNOOP: u16 = 1 << 5;
/// Command: parity error response.
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
/// Command: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: fast back-to-back enable (hard-wired to 0 on PCIe).
pub const COMMAND_FAST_BACK_TO_BACK: u16 = 1 << 9;
/// Command: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits that [`crate::ConfigSpace::new`] makes writable by default: I/O, memory, bus
/// master, parity error response, SERR# and interrupt disable (the bits PCIe requires; the
/// conventional-PCI-only bits stay hard-wired to 0).
pub const COMMAND_DEFAULT_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

/// Status: INTx interrupt status (read-only).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: capabilities list present (read-only).
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status: 66 MHz capable (read-only).
pub const STATUS_66MHZ: u16 = 1 << 5;
/// Status: fast back-to-back capable (read-only).
pub const STATUS_FAST_BACK_TO_BACK: u16 = 1 << 7;
/// Status: master data parity error (write 1 to clear).
pub const STATUS_MASTER_DATA_PARITY_ERROR: u16 = 1 << 8;
/// Status: signaled target abort (write 1 to clear).
pub const STATUS_SIGNALED_TARGET_ABORT: u16 = 1 << 11;
/// Status: received target abort (write 1 to clear).
pub const STATUS_RECEIVED_TARGET_ABORT: u16 = 1 << 12;
/// Status: received master abort (write 1 to clear).
pub const STATUS_RECEIVED_MASTER_ABORT: u16 = 1 << 13;
/// Status: signaled system error (write 1 to clear).
pub const STATUS_SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
/// Status: detected parity error (write 1 to clear).
pub const STATUS_DETECTED_PARITY_ERROR: u16 = 1 << 15;
/// All write-1-to-clear bits of the status register (bits 8 and 11..=15).
pub const STATUS_RW1C: u16 = STATUS_MASTER_DATA_PARITY_ERROR
    | STATUS_SIGNALED_TARGET_ABORT
    | STATUS_RECEIVED_TARGET_ABORT
    | STATUS_RECEIVED_MASTER_ABORT
    | STATUS_SIGNALED_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY_ERROR;

/// BAR bit 0: set for I/O BARs, clear for memory BARs.
pub const BAR_IO_SPACE: u32 = 1 << 0;
/// Memory BAR type field (bits 2:1) value for a 64-bit BAR.
pub const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
/// Memory BAR: the type field (bits 2:1).
pub const BAR_MEM_TYPE_MASK: u32 = 0b11 << 1;
/// Memory BAR bit 3: prefetchable.
pub const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;
/// Address bits of a memory BAR's low dword.
pub const BAR_MEM_ADDRESS_MASK: u32 = !0xf;
/// Address bits of an I/O BAR.
pub const BAR_IO_ADDRESS_MASK: u32 = !0x3;
/// Expansion ROM BAR bit 0: address decode enable.
pub const ROM_ENABLE: u32 = 1 << 0;
/// Address bits of the expansion ROM BAR (bits 1..=10 are reserved and read as 0).
pub const ROM_ADDRESS_MASK: u32 = !0x7ff;
/// The smallest expansion ROM (§6.2.5.2: the address field starts at bit 11): 2 KiB.
pub const ROM_MIN_SIZE: u64 = 0x800;
/// Extended capability header: the id (bits 15:0) and version (bits 19:16); bits 31:20 are the
/// next pointer (PCIe Base §7.6.3).
pub const EXT_CAP_ID_VERSION_MASK: u32 = 0x000f_ffff;
