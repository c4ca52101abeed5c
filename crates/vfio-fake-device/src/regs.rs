//! What trapped BAR ranges do: the register kinds of
//! [`crate::RegisterKind`]. Register values live in the BAR memory itself,
//! so a reset that restores the memory restores the registers.

use crate::bar::Bar;
use crate::dma::{DmaFault, DmaMappings};
use crate::inject::Counters;
use crate::irq::{IrqState, Trigger};
use crate::template::{RegisterBlock, RegisterKind};

/// Register layout of QEMU's `edu` device (`docs/specs/edu.rst`), as the
/// fake implements it.
///
/// Offsets below 0x80 take 4-byte accesses only, the DMA registers 4 or 8
/// bytes; other sizes read all ones and are ignored on write. Offsets that
/// are not registers read all ones too.
///
/// Differences from QEMU: the factorial completes synchronously inside the
/// write that starts it, and so does a DMA whose guest memory is mapped
/// into this process (the busy bits are clear again when the write
/// returns); a DMA whose guest memory is reached by file I/O or by
/// requests to a vfio-user client (see [`crate::FakeDevice`]) completes
/// later, on the device's DMA thread, like QEMU's (its DMA runs on a
/// timer): [`edu::DMA_CMD_START`] stays set until then, and writes to the
/// DMA registers meanwhile are ignored, as in QEMU. A DMA outside the
/// device buffer or the IOVA mappings, one started while Bus Master Enable
/// is clear (it touches no memory), or one whose memory fails the access,
/// sets [`edu::DMA_ERROR`] (a fake extension); DMA addresses are
/// not masked to 28 bits; the device buffer at [`edu::DMA_BUFFER`] is also
/// readable and writable through the BAR.
pub mod edu {
    /// Vendor id (QEMU).
    pub const VENDOR_ID: u16 = 0x1234;
    /// Device id.
    pub const DEVICE_ID: u16 = 0x11e8;
    /// Size of BAR 0.
    pub const BAR_SIZE: u64 = 1 << 20;
    /// The smallest BAR the edu registers fit in (registers + buffer).
    pub const BAR_SIZE_MIN: u64 = 512 << 10;
    /// Size of the register file at the start of BAR 0.
    pub const REGISTERS_SIZE: u64 = 0x100;
    /// Identification (RO): `0xRRrr00ed`, major 1 minor 0.
    pub const ID: u64 = 0x00;
    /// The identification value.
    pub const ID_VALUE: u32 = 0x0100_00ed;
    /// Liveness check: reads back the bitwise inverse of the last write.
    pub const LIVENESS: u64 = 0x04;
    /// Factorial: write n, read n! (32-bit, wrapping).
    pub const FACTORIAL: u64 = 0x08;
    /// Status: bit 0 computing (RO), bit 7 raise an interrupt when the
    /// factorial is done.
    pub const STATUS: u64 = 0x20;
    /// Status bit: computing the factorial.
    pub const STATUS_COMPUTING: u32 = 0x01;
    /// Status bit: interrupt on factorial completion.
    pub const STATUS_IRQ_FACT: u32 = 0x80;
    /// Interrupt status (RO): the OR of the values that raised interrupts.
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise (WO): ORs the value into the interrupt status and
    /// raises the interrupt.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge (WO): clears the value's bits from the
    /// interrupt status; INTx is lowered when it reaches zero.
    pub const IRQ_ACK: u64 = 0x64;
    /// Interrupt status value of a finished factorial.
    pub const FACT_IRQ: u32 = 0x001;
    /// Interrupt status value of a finished DMA.
    pub const DMA_IRQ: u32 = 0x100;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA transfer count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;
    /// DMA command bit: start (clear again when the transfer is over).
    pub const DMA_CMD_START: u64 = 0x1;
    /// DMA command bit: direction, 0 RAM to device, 1 device to RAM.
    pub const DMA_CMD_TO_RAM: u64 = 0x2;
    /// DMA command bit: raise [`DMA_IRQ`] when done.
    pub const DMA_CMD_IRQ: u64 = 0x4;
    /// Fake extension (RO): 0 after a good DMA, else a
    /// [`crate::DmaFault::code`].
    pub const DMA_ERROR: u64 = 0xa0;
    /// The device's DMA buffer, in device addresses and BAR offsets.
    pub const DMA_BUFFER: u64 = 0x40000;
    /// Size of the DMA buffer.
    pub const DMA_BUFFER_SIZE: u64 = 4096;
}

/// Register layout of the generic DMA engine
/// ([`crate::RegisterKind::DmaEngine`]): copies `LEN` bytes from IOVA `SRC`
/// to IOVA `DST` through the device's DMA mappings when a command with
/// [`dma_engine::CMD_START`] is written: synchronously when both ranges are
/// host memory mapped into this process; otherwise (file I/O, requests to
/// a vfio-user client) on the device's DMA thread after the write returns,
/// `CMD_START` staying set and `STATUS` 0 until then. Writes to the block
/// while `CMD_START` is set are ignored.
pub mod dma_engine {
    /// Source IOVA (8 bytes).
    pub const SRC: u64 = 0x00;
    /// Destination IOVA (8 bytes).
    pub const DST: u64 = 0x08;
    /// Length in bytes (8 bytes), at most [`MAX_LEN`].
    pub const LEN: u64 = 0x10;
    /// Command (4 bytes).
    pub const CMD: u64 = 0x18;
    /// Command bit: start the transfer.
    pub const CMD_START: u32 = 0x1;
    /// Command bit: raise the engine's vector when done (not on error).
    pub const CMD_IRQ: u32 = 0x2;
    /// Status (4 bytes, RO): bit 0 done, bit 1 error, bits 15:8 the
    /// [`crate::DmaFault::code`] of the error.
    pub const STATUS: u64 = 0x1c;
    /// Status bit: the last transfer completed.
    pub const STATUS_DONE: u32 = 0x1;
    /// Status bit: the last transfer failed. Nothing was copied, except
    /// after a [`crate::DmaFault::Unreachable`] met mid-transfer.
    pub const STATUS_ERROR: u32 = 0x2;
    /// Size of the register block.
    pub const BLOCK_SIZE: u64 = 0x20;
    /// Longest transfer.
    pub const MAX_LEN: u64 = 16 << 20;
}

/// What a register access may touch besides the BAR memory.
pub(crate) struct Ctx<'a> {
    pub bar: &'a Bar,
    pub irq: &'a mut IrqState,
    pub dma: &'a DmaMappings,
    pub counters: &'a Counters,
    /// A transfer the access started that must run after it returns.
    pub deferred: Option<Job>,
    /// Bus Master Enable (command bit 2): without it the DMA engines refuse every transfer
    /// with [`DmaFault::BusMasterDisabled`] and touch no memory.
    pub bus_master: bool,
    /// The device is quiesced for migration (a P2P or stopped state): a
    /// transfer started now does not run until the device runs again.
    pub quiesced: bool,
    /// Where the device logs the guest pages its DMA writes.
    pub log: &'a crate::mig::DmaLog,
}

/// A DMA transfer that needs file or message I/O: the engine stays busy,
/// and the device's DMA thread runs it once the register write that
/// started it has returned, then calls [`edu_finish`] / [`engine_finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// An edu transfer (`cnt` bytes, at most the device buffer).
    Edu {
        cmd: u64,
        src: u64,
        dst: u64,
        cnt: u64,
    },
    /// A generic engine's transfer, its block at `base`.
    Engine {
        base: u64,
        cmd: u32,
        src: u64,
        dst: u64,
        len: u64,
        vector: u32,
    },
}

/// How a transfer runs.
enum Plan {
    /// Not at all: this fault.
    Refuse(DmaFault),
    /// Now, by loads and stores, inside the register write.
    Now,
    /// Later, on the DMA thread.
    Later,
}

/// Where every engine decides whether, and how, it may DMA: the guest
/// memory it reads (`reads`) and writes (`writes`), as (IOVA, length),
/// must be mapped (writable where written); a transfer that touches only
/// host-mapped memory runs now, any other later, and so does every one
/// started while the device is quiesced (it waits for the device to run).
fn plan(ctx: &Ctx<'_>, reads: Option<(u64, u64)>, writes: Option<(u64, u64)>) -> Plan {
    for (range, write) in [(reads, false), (writes, true)] {
        if let Some((iova, len)) = range {
            if let Err(f) = ctx.dma.check(iova, len, write) {
                return Plan::Refuse(f);
            }
        }
    }
    let host = |r: Option<(u64, u64)>| r.is_none_or(|(iova, len)| ctx.dma.all_host(iova, len));
    if !ctx.quiesced && host(reads) && host(writes) {
        Plan::Now
    } else {
        Plan::Later
    }
}

pub(crate) fn read(ctx: &mut Ctx<'_>, block: &RegisterBlock, off: u64, data: &mut [u8]) {
    match block.kind {
        RegisterKind::Edu => edu_read(ctx, off - block.offset, data),
        _ => {
            ctx.bar.read(off, data);
        }
    }
}

pub(crate) fn write(ctx: &mut Ctx<'_>, block: &RegisterBlock, off: u64, data: &[u8]) {
    let rel = off - block.offset;
    match block.kind {
        RegisterKind::Memory | RegisterKind::MsixTable => {
            ctx.bar.write(off, data);
        }
        RegisterKind::ReadOnly | RegisterKind::MsixPba => {}
        RegisterKind::Doorbell {
            first_vector,
            stride,
        } => {
            ctx.bar.write(off, data);
            let stride = u64::from(stride.max(1));
            if rel % stride == 0 {
                let k = u32::try_from(rel / stride).unwrap_or(u32::MAX);
                ctx.irq
                    .raise(first_vector.saturating_add(k), Trigger::Pulse, ctx.counters);
            }
        }
        RegisterKind::DmaEngine { irq_vector } => {
            engine_write(ctx, block.offset, rel, data, irq_vector)
        }
        RegisterKind::Edu => edu_write(ctx, rel, data),
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

fn engine_write(ctx: &mut Ctx<'_>, base: u64, rel: u64, data: &[u8], vector: u32) {
    use dma_engine::*;
    let end = rel.saturating_add(data.len() as u64);
    if rel >= STATUS || (rel < CMD && end > CMD) {
        // STATUS is read-only; writes may not straddle into CMD.
        return;
    }
    if ctx.bar.read_u32(base + CMD) & CMD_START != 0 {
        // Busy with a transfer on the DMA thread.
        return;
    }
    if rel < CMD {
        ctx.bar.write(base + rel, data);
        return;
    }
    // CMD.
    ctx.bar.write(base + rel, data);
    let cmd = ctx.bar.read_u32(base + CMD);
    if cmd & CMD_START == 0 {
        return;
    }
    let src = ctx.bar.read_u64(base + SRC);
    let dst = ctx.bar.read_u64(base + DST);
    let len = ctx.bar.read_u64(base + LEN);
    let result = if !ctx.bus_master {
        Err(DmaFault::BusMasterDisabled)
    } else if len > MAX_LEN {
        Err(DmaFault::TooLong)
    } else {
        match plan(ctx, Some((src, len)), Some((dst, len))) {
            Plan::Refuse(f) => Err(f),
            Plan::Now => {
                let r = ctx.dma.copy(src, dst, len);
                if r.is_ok() {
                    ctx.log.mark(dst, len);
                }
                r
            }
            Plan::Later => {
                ctx.bar.write_u32(base + STATUS, 0);
                ctx.deferred = Some(Job::Engine {
                    base,
                    cmd,
                    src,
                    dst,
                    len,
                    vector,
                });
                return;
            }
        }
    };
    engine_finish(ctx, base, cmd, vector, result);
}

/// Ends a generic engine's transfer: not busy, the status, the interrupt.
pub(crate) fn engine_finish(
    ctx: &mut Ctx<'_>,
    base: u64,
    cmd: u32,
    vector: u32,
    result: Result<(), DmaFault>,
) {
    use dma_engine::*;
    ctx.bar.write_u32(base + CMD, cmd & !CMD_START);
    match result {
        Ok(()) => {
            ctx.bar.write_u32(base + STATUS, STATUS_DONE);
            ctx.counters.dma_ok();
            if cmd & CMD_IRQ != 0 {
                ctx.irq.raise(vector, Trigger::Pulse, ctx.counters);
            }
        }
        Err(f) => {
            ctx.bar
                .write_u32(base + STATUS, STATUS_ERROR | (f.code() << 8));
            ctx.counters.dma_err();
        }
    }
}

fn edu_size_ok(rel: u64, len: usize) -> bool {
    if rel < 0x80 {
        len == 4
    } else {
        len == 4 || len == 8
    }
}

fn edu_read(ctx: &mut Ctx<'_>, rel: u64, data: &mut [u8]) {
    use edu::*;
    data.fill(0xff);
    if !edu_size_ok(rel, data.len()) {
        return;
    }
    match rel {
        ID | LIVENESS | FACTORIAL | STATUS | IRQ_STATUS | DMA_SRC | DMA_DST | DMA_COUNT
        | DMA_CMD | DMA_ERROR => {
            ctx.bar.read(rel, data);
        }
        _ => {}
    }
}

/// n! in 32 bits, wrapping, as the edu device computes it. From 34 on the
/// product holds at least 32 factors of two, so it is 0.
fn factorial(n: u32) -> u32 {
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

fn edu_raise(ctx: &mut Ctx<'_>, val: u32) {
    let status = ctx.bar.read_u32(edu::IRQ_STATUS) | val;
    ctx.bar.write_u32(edu::IRQ_STATUS, status);
    if status != 0 {
        ctx.irq.raise(0, Trigger::Level, ctx.counters);
    }
}

fn edu_write(ctx: &mut Ctx<'_>, rel: u64, data: &[u8]) {
    use edu::*;
    if !edu_size_ok(rel, data.len()) {
        return;
    }
    let val = le(data);
    let val32 = val as u32;
    match rel {
        LIVENESS => ctx.bar.write_u32(LIVENESS, !val32),
        FACTORIAL => {
            let status = ctx.bar.read_u32(STATUS);
            if status & STATUS_COMPUTING != 0 {
                return;
            }
            ctx.bar.write_u32(FACTORIAL, factorial(val32));
            if status & STATUS_IRQ_FACT != 0 {
                edu_raise(ctx, FACT_IRQ);
            }
        }
        STATUS => {
            let status = ctx.bar.read_u32(STATUS);
            let new = (status & !STATUS_IRQ_FACT) | (val32 & STATUS_IRQ_FACT);
            ctx.bar.write_u32(STATUS, new);
        }
        IRQ_RAISE => edu_raise(ctx, val32),
        IRQ_ACK => {
            let status = ctx.bar.read_u32(IRQ_STATUS) & !val32;
            ctx.bar.write_u32(IRQ_STATUS, status);
            if status == 0 {
                ctx.irq.deassert();
            }
        }
        // QEMU ignores them while a DMA runs.
        DMA_SRC | DMA_DST | DMA_COUNT | DMA_CMD
            if ctx.bar.read_u64(DMA_CMD) & DMA_CMD_START != 0 => {}
        // A 4-byte write zero-extends, as in QEMU.
        DMA_SRC | DMA_DST | DMA_COUNT => ctx.bar.write_u64(rel, val),
        DMA_CMD if val & DMA_CMD_START != 0 => {
            ctx.bar.write_u64(DMA_CMD, val);
            edu_dma(ctx, val);
        }
        _ => {}
    }
}

fn edu_dma(ctx: &mut Ctx<'_>, cmd: u64) {
    use edu::*;
    let src = ctx.bar.read_u64(DMA_SRC);
    let dst = ctx.bar.read_u64(DMA_DST);
    let cnt = ctx.bar.read_u64(DMA_COUNT);
    let to_ram = cmd & DMA_CMD_TO_RAM != 0;
    let dev = if to_ram { src } else { dst };
    let (reads, writes) = if to_ram {
        (None, Some((dst, cnt)))
    } else {
        (Some((src, cnt)), None)
    };
    let in_buffer = dev
        .checked_sub(DMA_BUFFER)
        .filter(|o| o.checked_add(cnt).is_some_and(|e| e <= DMA_BUFFER_SIZE));
    let result = match in_buffer {
        _ if !ctx.bus_master => Err(DmaFault::BusMasterDisabled),
        None => Err(DmaFault::OutOfDeviceRange),
        Some(_) if cnt == 0 => Ok(()),
        Some(_) => match ctx.bar.ptr(dev, cnt as usize) {
            None => Err(DmaFault::OutOfDeviceRange),
            Some(p) => match plan(ctx, reads, writes) {
                Plan::Refuse(f) => Err(f),
                Plan::Later => {
                    // DMA_CMD_START stays set: busy until the DMA thread
                    // calls edu_finish.
                    ctx.deferred = Some(Job::Edu { cmd, src, dst, cnt });
                    return;
                }
                Plan::Now if to_ram => {
                    // SAFETY: `p .. p + cnt` is inside the BAR mapping
                    // (checked by `ptr`); the DMA mappings are host memory
                    // (plan) that stays live while we hold the mapping lock
                    // (see DmaMappings::write).
                    let r = unsafe { ctx.dma.write(dst, p, cnt) };
                    if r.is_ok() {
                        ctx.log.mark(dst, cnt);
                    }
                    r
                }
                // SAFETY: as for the write above, copying the other way.
                Plan::Now => unsafe { ctx.dma.read(src, p, cnt) },
            },
        },
    };
    edu_finish(ctx, cmd, result);
}

/// Ends an edu DMA: not busy, the error register, the interrupt.
pub(crate) fn edu_finish(ctx: &mut Ctx<'_>, cmd: u64, result: Result<(), DmaFault>) {
    use edu::*;
    ctx.bar.write_u64(DMA_CMD, cmd & !DMA_CMD_START);
    match result {
        Ok(()) => {
            ctx.bar.write_u32(DMA_ERROR, 0);
            ctx.counters.dma_ok();
            if cmd & DMA_CMD_IRQ != 0 {
                edu_raise(ctx, DMA_IRQ);
            }
        }
        Err(f) => {
            ctx.bar.write_u32(DMA_ERROR, f.code());
            ctx.counters.dma_err();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::factorial;

    #[test]
    fn factorial_wraps_in_32_bits_like_the_edu_thread() {
        for n in 0..40u32 {
            let mut want = 1u32;
            let mut k = n;
            while k > 0 {
                want = want.wrapping_mul(k);
                k -= 1;
            }
            assert_eq!(factorial(n), want, "{n}!");
        }
    }
}
