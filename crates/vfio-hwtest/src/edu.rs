//! Scenarios on QEMU's `edu` teaching device, driven through our stack.
//!
//! The device (QEMU `docs/specs/edu.rst`): BAR0 is 1 MiB of registers. 0x00 identification
//! (`0x010000ed` for version 1.0), 0x04 liveness (reads back the bitwise inverse of the last
//! write), 0x08 factorial, 0x20 status (bit 0 computing, bit 7 raise an interrupt when the
//! factorial is done), 0x24 interrupt status, 0x60 raise interrupt, 0x64 acknowledge
//! interrupt, 0x80/0x88/0x90/0x98 DMA source, destination, count and command (bit 0 start,
//! bit 1 direction: 0 RAM to device, 1 device to RAM; bit 2 interrupt on completion). The DMA
//! buffer is at device address 0x40000 (4 KiB). Registers below 0x80 take 4-byte accesses only.
//! DMA addresses are masked to 28 bits and each transfer waits for a 100 ms timer. Interrupts
//! go out as MSI when the device's MSI is enabled, else on INTx.

use crate::harness::{Ctx, Outcome};
use crate::vmm::{self, Vm, CMD_INTX_DISABLE, CMD_MEMORY, MSI_ADDRESS, RAM_BASE};
use anyhow::{bail, ensure, Context, Result};
use pci_interrupts::MsiRoute;
use std::time::{Duration, Instant};
use vfio_pci::IrqMode;

const BAR: usize = 0;
const IDENT: u64 = 0x00;
const LIVENESS: u64 = 0x04;
const FACTORIAL: u64 = 0x08;
const STATUS: u64 = 0x20;
const IRQ_STATUS: u64 = 0x24;
const IRQ_RAISE: u64 = 0x60;
const IRQ_ACK: u64 = 0x64;
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;

/// Status bit: raise an interrupt when the factorial is computed.
const STATUS_IRQ_ON_FACTORIAL: u32 = 0x80;
/// Status bit: computing.
const STATUS_COMPUTING: u32 = 0x01;
/// Interrupt status bit set by a finished factorial.
const IRQ_FACTORIAL: u32 = 0x01;
/// DMA command bits.
const DMA_START: u64 = 0x1;
const DMA_TO_RAM: u64 = 0x2;
/// The device's DMA buffer (device address) and its size.
const EDU_BUFFER: u64 = 0x40000;
const EDU_BUFFER_SIZE: usize = 4096;

/// The identification register of edu 1.0.
const EDU_IDENT: u32 = 0x0100_00ed;

/// Long enough for TCG, a 100 ms DMA timer and a busy host (a vCPU thread of the
/// guest can be off the host's CPUs for seconds); waits return as soon as they can.
const IRQ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a masked INTx must stay silent.
const QUIET: Duration = Duration::from_millis(300);

/// Identification and liveness registers read and written through `read_bar`/`write_bar`.
pub fn registers(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    vm.command_set(CMD_MEMORY)?;
    let bar = vm
        .dev
        .bars()
        .into_iter()
        .find(|b| b.index.slot() == BAR)
        .context("edu BAR0 missing from bars()")?;
    let ident = vm.bar_read32(BAR, IDENT);
    ensure!(
        ident == EDU_IDENT,
        "identification register reads {ident:#010x}, expected {EDU_IDENT:#010x}"
    );
    let mut seen = Vec::new();
    for v in [0x1234_5678u32, 0xa5a5_0000, 0] {
        vm.bar_write32(BAR, LIVENESS, v)?;
        let r = vm.bar_read32(BAR, LIVENESS);
        ensure!(
            r == !v,
            "liveness register reads {r:#010x} after writing {v:#010x}, expected {:#010x}",
            !v
        );
        seen.push(format!("{v:#x}->{r:#x}"));
    }
    Ok(Outcome::Pass(format!(
        "ident {ident:#010x}; liveness {}; BAR0 {:#x} bytes at {:#x}, {} guest mapping(s)",
        seen.join(" "),
        bar.region_size,
        bar.base.unwrap_or(0),
        bar.mapped.len()
    )))
}

/// A factorial computed with "interrupt on completion" raises MSI on the eventfd our stack
/// registered for the vector, routed to the address and data the guest programmed.
pub fn factorial_msi(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    vm.enable_memory_and_bus_master()?;
    let data = 0x0041;
    vm.msi_enable(data)?;
    ensure!(
        vm.dev.irq_mode() == IrqMode::Msi(1),
        "irq mode {:?} after enabling MSI, expected Msi(1)",
        vm.dev.irq_mode()
    );
    let group = vm.dev.msi_group().context("no MSI group")?;
    let route = vm
        .test_group(&group)
        .context("MSI group is not the test manager's")?
        .route(0);
    let want = MsiRoute {
        address: MSI_ADDRESS,
        data: u32::from(data),
    };
    ensure!(
        route == Some(want),
        "vector 0 routed to {route:x?}, expected {want:x?}"
    );
    vmm::drain(group.as_ref(), 0)?;

    let t0 = Instant::now();
    vm.bar_write32(BAR, STATUS, STATUS_IRQ_ON_FACTORIAL)?;
    vm.bar_write32(BAR, FACTORIAL, 10)?;
    let n = vmm::wait_irq(group.as_ref(), 0, IRQ_TIMEOUT)?;
    let took = t0.elapsed();
    ensure!(
        n > 0,
        "no MSI within {IRQ_TIMEOUT:?} of starting factorial(10)"
    );
    let status = vm.bar_read32(BAR, STATUS);
    ensure!(
        status & STATUS_COMPUTING == 0,
        "status {status:#x}: still computing after its interrupt"
    );
    let result = vm.bar_read32(BAR, FACTORIAL);
    ensure!(
        result == 3_628_800,
        "factorial(10) = {result}, expected 3628800"
    );
    let irq = vm.bar_read32(BAR, IRQ_STATUS);
    ensure!(
        irq & IRQ_FACTORIAL != 0,
        "interrupt status {irq:#x} lacks the factorial bit"
    );
    vm.bar_write32(BAR, IRQ_ACK, irq)?;
    vm.bar_write32(BAR, STATUS, 0)?;
    vm.msi_disable()?;
    ensure!(
        vm.dev.irq_mode() == IrqMode::Intx,
        "irq mode {:?} after disabling MSI, expected Intx",
        vm.dev.irq_mode()
    );
    Ok(Outcome::Pass(format!(
        "factorial(10) = {result}; MSI (addr {MSI_ADDRESS:#x} data {data:#x}) signalled {n}x \
         after {} ms; back to INTx",
        took.as_millis()
    )))
}

/// Starts one edu DMA and waits (bounded) for its command register to go idle.
fn edu_dma(vm: &Vm, src: u64, dst: u64, count: usize, to_ram: bool) -> Result<Duration> {
    vm.bar_write64(BAR, DMA_SRC, src)?;
    vm.bar_write64(BAR, DMA_DST, dst)?;
    vm.bar_write64(BAR, DMA_COUNT, count as u64)?;
    let cmd = DMA_START | if to_ram { DMA_TO_RAM } else { 0 };
    let t0 = Instant::now();
    vm.bar_write64(BAR, DMA_CMD, cmd)?;
    let done = vmm::poll_until(IRQ_TIMEOUT, || vm.bar_read64(BAR, DMA_CMD) & DMA_START == 0);
    ensure!(
        done,
        "DMA {src:#x} -> {dst:#x} ({count} bytes) still running after {IRQ_TIMEOUT:?}"
    );
    Ok(t0.elapsed())
}

/// A pattern goes RAM -> edu buffer -> RAM (at another address) by the edu's DMA; returns the
/// time of both transfers. Fails when the pattern does not come back.
pub fn dma_check(vm: &Vm) -> Result<(Duration, Duration)> {
    let src = RAM_BASE + 0x1000;
    let dst = RAM_BASE + 0x8000;
    let seed = pattern_seed();
    let pattern: Vec<u8> = (0..EDU_BUFFER_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    vm.ram_write(src, &pattern)?;
    vm.ram_write(dst, &vec![0u8; EDU_BUFFER_SIZE])?;
    let mut back = vec![0u8; EDU_BUFFER_SIZE];
    vm.ram_read(dst, &mut back)?;
    ensure!(back != pattern, "destination already holds the pattern");

    let t_in = edu_dma(vm, src, EDU_BUFFER, EDU_BUFFER_SIZE, false)?;
    let t_out = edu_dma(vm, EDU_BUFFER, dst, EDU_BUFFER_SIZE, true)?;
    vm.ram_read(dst, &mut back)?;
    if let Some(i) = back.iter().zip(&pattern).position(|(a, b)| a != b) {
        bail!(
            "RAM at {dst:#x} differs from the pattern from byte {i} ({:#04x} != {:#04x})",
            back[i],
            pattern[i]
        );
    }
    Ok((t_in, t_out))
}

/// Data goes RAM -> edu buffer -> RAM (at another address) through an IOMMU mapping of guest
/// RAM that `GuestDma` made when the device attached; once the RAM is hot-unplugged
/// (`GuestDma::remove_region`) the same DMA no longer reaches RAM.
pub fn dma_roundtrip(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, true)?;
    vm.enable_memory_and_bus_master()?;
    let src = RAM_BASE + 0x1000;
    let dst = RAM_BASE + 0x8000;
    let (t_in, t_out) = dma_check(&vm)?;
    let mut back = vec![0u8; EDU_BUFFER_SIZE];

    // Without the mapping, the device's write must not land: the IOMMU blocks it.
    let ram_size = vmm::RAM_SIZE as u64;
    vm.dma
        .remove_region(RAM_BASE, ram_size)
        .context("hot-unplug of guest RAM")?;
    let left = vm.dma.mappings(vm.dev.dma_domain());
    ensure!(left.is_empty(), "mappings left after unmap: {left:x?}");
    let zeros = vec![0u8; EDU_BUFFER_SIZE];
    vm.ram_write(dst, &zeros)?;
    edu_dma(&vm, EDU_BUFFER, dst, EDU_BUFFER_SIZE, true)?;
    vm.ram_read(dst, &mut back)?;
    ensure!(
        back == zeros,
        "a DMA to IOVA {dst:#x} reached RAM after the mapping was removed"
    );
    Ok(Outcome::Pass(format!(
        "{EDU_BUFFER_SIZE} bytes RAM {src:#x} -> edu {EDU_BUFFER:#x} ({} ms) -> RAM {dst:#x} \
         ({} ms) match; after unmap the DMA is blocked",
        t_in.as_millis(),
        t_out.as_millis()
    )))
}

/// INTx: a raised interrupt signals the trigger eventfd; the kernel masks the line until it is
/// unmasked, by the resample eventfd (what a VMM's irqfd resampler does) or by
/// `unmask_intx()`; a still-asserted line fires again on unmask.
pub fn intx_unmask(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    ensure!(
        vm.dev.irq_mode() == IrqMode::Intx,
        "irq mode {:?} at attach, expected Intx",
        vm.dev.irq_mode()
    );
    vm.command_set(CMD_MEMORY)?;
    vm.command_clear(CMD_INTX_DISABLE)?;
    let group = vm.dev.intx_group().context("no INTx group")?;
    let resample = group
        .resample_notifier(0)
        .context("INTx group has no resample eventfd")?;
    vmm::drain(group.as_ref(), 0)?;
    let mut steps = Vec::new();

    // 1. Raise: fires.
    vm.bar_write32(BAR, IRQ_RAISE, 0x1)?;
    let n = vmm::wait_irq(group.as_ref(), 0, IRQ_TIMEOUT)?;
    ensure!(n > 0, "no INTx within {IRQ_TIMEOUT:?} of raising it");
    let st = vm.bar_read32(BAR, IRQ_STATUS);
    ensure!(st & 1 != 0, "interrupt status {st:#x} after raising bit 0");
    vm.bar_write32(BAR, IRQ_ACK, st)?;
    steps.push("raise fired");

    // 2. Raise again without unmasking: the kernel keeps the line masked.
    vm.bar_write32(BAR, IRQ_RAISE, 0x1)?;
    let n = vmm::wait_irq(group.as_ref(), 0, QUIET)?;
    ensure!(
        n == 0,
        "INTx fired again before it was unmasked (the kernel should keep it masked)"
    );
    steps.push("masked until unmask");

    // 3. Unmask through the resample eventfd: the still-asserted line fires.
    vmm::signal_eventfd(resample)?;
    let n = vmm::wait_irq(group.as_ref(), 0, IRQ_TIMEOUT)?;
    ensure!(
        n > 0,
        "no INTx within {IRQ_TIMEOUT:?} of unmasking an asserted line via the resample eventfd"
    );
    let st = vm.bar_read32(BAR, IRQ_STATUS);
    vm.bar_write32(BAR, IRQ_ACK, st)?;
    steps.push("resample unmask re-fired");

    // 4. Unmask through the ioctl, then a new interrupt fires.
    vm.dev.unmask_intx().context("unmask_intx")?;
    vm.bar_write32(BAR, IRQ_RAISE, 0x2)?;
    let n = vmm::wait_irq(group.as_ref(), 0, IRQ_TIMEOUT)?;
    ensure!(
        n > 0,
        "no INTx within {IRQ_TIMEOUT:?} of raising it after unmask_intx()"
    );
    let st = vm.bar_read32(BAR, IRQ_STATUS);
    ensure!(st & 2 != 0, "interrupt status {st:#x} after raising bit 1");
    vm.bar_write32(BAR, IRQ_ACK, st)?;
    vm.dev.unmask_intx().context("unmask_intx")?;
    steps.push("unmask_intx then raise fired");
    Ok(Outcome::Pass(steps.join(", ")))
}

/// A byte that differs between runs, so data left by an earlier run never passes for new data.
pub fn pattern_seed() -> u8 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos >> 10) as u8 | 1
}
