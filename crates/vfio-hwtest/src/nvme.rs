//! Scenarios on QEMU's NVMe controller, driven through our stack as a small NVMe driver.
//!
//! Register offsets, queue entry layouts and command encodings follow the NVM Express Base
//! Specification 2.0: controller registers in BAR0 (CAP 0x00, VS 0x08, CC 0x14, CSTS 0x1c,
//! AQA 0x24, ASQ 0x28, ACQ 0x30), doorbells at `0x1000 + (2 * qid + is_cq) * (4 << CAP.DSTRD)`,
//! 64-byte submission entries and 16-byte completion entries with a phase tag. Admin
//! completions arrive on MSI-X vector 0 (the admin queue always uses it); the I/O completion
//! queue is created on vector 1.
//!
//! The scenarios write blocks of namespace 1: run them only on a scratch controller (the
//! `--qemu` guest's is a throw-away 64 MiB image).

use crate::edu::pattern_seed;
use crate::harness::{Ctx, Outcome};
use crate::vmm::{self, Vm, RAM_BASE};
use anyhow::{bail, ensure, Context, Result};
use pci_interrupts::InterruptSourceGroup;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vfio_backend::Vfio;
use vfio_pci::IrqMode;

/// The serial number `cargo xtask hwtest --qemu` gives QEMU's NVMe controller.
pub const EXPECTED_SERIAL: &str = "hwtest0";

const BAR: usize = 0;
const REG_CAP: u64 = 0x00;
const REG_VS: u64 = 0x08;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

const CC_EN: u32 = 1;
/// I/O submission and completion queue entry sizes (log2): 64 and 16 bytes.
const CC_IOSQES_IOCQES: u32 = (6 << 16) | (4 << 20);
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 2;

const OPC_CREATE_IO_SQ: u32 = 0x01;
const OPC_CREATE_IO_CQ: u32 = 0x05;
const OPC_IDENTIFY: u32 = 0x06;
const OPC_WRITE: u32 = 0x01;
const OPC_READ: u32 = 0x02;
const CNS_NAMESPACE: u32 = 0;
const CNS_CONTROLLER: u32 = 1;

/// Entries per queue (admin and I/O).
const DEPTH: u16 = 16;
const SQE: u64 = 64;
const CQE: u64 = 16;
const PAGE: usize = 4096;

// Guest RAM layout (guest physical = IOVA), each piece page aligned.
const ASQ_GPA: u64 = RAM_BASE;
const ACQ_GPA: u64 = RAM_BASE + 0x1000;
const IDENT_GPA: u64 = RAM_BASE + 0x2000;
const IOSQ_GPA: u64 = RAM_BASE + 0x3000;
const IOCQ_GPA: u64 = RAM_BASE + 0x4000;
const WRITE_GPA: u64 = RAM_BASE + 0x10000;
const READ_GPA: u64 = RAM_BASE + 0x20000;

/// First block the scenarios write.
const TEST_LBA: u64 = 64;
/// The MSI-X vector of the I/O completion queue.
const IO_VECTOR: u32 = 1;
const IO_QID: u16 = 1;

/// How long a command's completion and its interrupt may take: generous, because
/// under TCG on a busy 2-core host a vCPU thread can be off the CPUs for seconds.
/// Waits return as soon as the interrupt arrives.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// One submission/completion queue pair in guest RAM.
struct Queue {
    qid: u16,
    sq: u64,
    cq: u64,
    tail: u16,
    head: u16,
    phase: bool,
    vector: u32,
}

impl Queue {
    fn new(qid: u16, sq: u64, cq: u64, vector: u32) -> Self {
        Queue {
            qid,
            sq,
            cq,
            tail: 0,
            head: 0,
            phase: true,
            vector,
        }
    }
}

/// What a completion entry says.
#[derive(Debug)]
struct Completion {
    /// Interrupts seen on the queue's vector while waiting.
    irqs: u64,
}

/// A controller brought up through our stack.
struct Nvme<'a> {
    vm: &'a Vm,
    dstrd: u32,
    group: Arc<dyn InterruptSourceGroup>,
    admin: Queue,
    io: Option<Queue>,
    cid: u16,
    version: u32,
}

/// The doorbell of queue `qid` (its completion queue's with `cq`).
fn doorbell(dstrd: u32, qid: u16, cq: bool) -> u64 {
    DOORBELLS + (2 * u64::from(qid) + u64::from(cq)) * (4u64 << dstrd)
}

fn split(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

impl<'a> Nvme<'a> {
    fn read64(vm: &Vm, off: u64) -> u64 {
        u64::from(vm.bar_read32(BAR, off)) | u64::from(vm.bar_read32(BAR, off + 4)) << 32
    }

    fn write64(vm: &Vm, off: u64, v: u64) -> Result<()> {
        let (lo, hi) = split(v);
        vm.bar_write32(BAR, off, lo)?;
        vm.bar_write32(BAR, off + 4, hi)
    }

    /// Enables decoding, bus mastering and MSI-X (vectors 0 and 1), then the controller with
    /// an admin queue pair, as a driver does at probe.
    fn bring_up(vm: &'a Vm) -> Result<Self> {
        vm.enable_memory_and_bus_master()?;
        vm.msix_enable(2)?;
        ensure!(
            vm.dev.irq_mode() == IrqMode::Msix,
            "irq mode {:?} after enabling MSI-X",
            vm.dev.irq_mode()
        );
        let group = vm.dev.msix_group().context("no MSI-X group")?;
        let cap = Self::read64(vm, REG_CAP);
        ensure!(cap != u64::MAX, "CAP reads all ones: BAR0 not reachable");
        let mqes = (cap & 0xffff) + 1;
        ensure!(
            mqes >= u64::from(DEPTH),
            "CAP.MQES allows {mqes} entries, need {DEPTH}"
        );
        ensure!(
            (cap >> 48) & 0xf == 0,
            "CAP.MPSMIN {} : 4 KiB pages not supported",
            (cap >> 48) & 0xf
        );
        ensure!(
            cap & (1 << 37) != 0,
            "CAP.CSS lacks the NVM command set ({cap:#x})"
        );
        let dstrd = ((cap >> 32) & 0xf) as u32;
        // CAP.TO is in 500 ms units: how long the controller may take to become ready.
        let ready_timeout =
            Duration::from_millis(500 * ((cap >> 24) & 0xff).max(2)).min(Duration::from_secs(30));
        if vm.bar_read32(BAR, REG_CC) & CC_EN != 0 {
            vm.bar_write32(BAR, REG_CC, 0)?;
            ensure!(
                vmm::poll_until(ready_timeout, || vm.bar_read32(BAR, REG_CSTS) & CSTS_RDY
                    == 0),
                "CSTS.RDY still set {ready_timeout:?} after clearing CC.EN"
            );
        }
        let zeros = vec![0u8; PAGE];
        for q in [ASQ_GPA, ACQ_GPA, IOSQ_GPA, IOCQ_GPA] {
            vm.ram_write(q, &zeros)?;
        }
        let d = u32::from(DEPTH - 1);
        vm.bar_write32(BAR, REG_AQA, (d << 16) | d)?;
        Self::write64(vm, REG_ASQ, ASQ_GPA)?;
        Self::write64(vm, REG_ACQ, ACQ_GPA)?;
        vm.bar_write32(BAR, REG_CC, CC_EN | CC_IOSQES_IOCQES)?;
        let ready = vmm::poll_until(ready_timeout, || {
            vm.bar_read32(BAR, REG_CSTS) & CSTS_RDY != 0
        });
        let csts = vm.bar_read32(BAR, REG_CSTS);
        ensure!(
            ready,
            "CSTS {csts:#x}: not ready {ready_timeout:?} after setting CC.EN"
        );
        ensure!(
            csts & CSTS_CFS == 0,
            "CSTS {csts:#x}: controller fatal status"
        );
        for v in 0..2 {
            vmm::drain(group.as_ref(), v)?;
        }
        Ok(Nvme {
            vm,
            dstrd,
            group,
            admin: Queue::new(0, ASQ_GPA, ACQ_GPA, 0),
            io: None,
            cid: 0,
            version: vm.bar_read32(BAR, REG_VS),
        })
    }

    /// Submits `sqe` (dwords; CID filled in) on the admin or I/O queue and waits for its
    /// completion, which must be announced by an interrupt on the queue's vector.
    fn submit(&mut self, io: bool, mut sqe: [u32; 16]) -> Result<Completion> {
        self.cid = self.cid.wrapping_add(1);
        let cid = self.cid;
        sqe[0] |= u32::from(cid) << 16;
        let vm = self.vm;
        let dstrd = self.dstrd;
        let q = if io {
            self.io.as_mut().context("no I/O queue")?
        } else {
            &mut self.admin
        };
        let bytes: Vec<u8> = sqe.iter().flat_map(|d| d.to_le_bytes()).collect();
        vm.ram_write(q.sq + u64::from(q.tail) * SQE, &bytes)?;
        q.tail = (q.tail + 1) % DEPTH;
        let sq_db = doorbell(dstrd, q.qid, false);
        let cq_db = doorbell(dstrd, q.qid, true);
        vm.bar_write32(BAR, sq_db, u32::from(q.tail))?;

        let deadline = Instant::now() + CMD_TIMEOUT;
        let mut irqs = 0;
        let entry = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            irqs += vmm::wait_irq(self.group.as_ref(), q.vector, left.min(CMD_TIMEOUT))?;
            let mut e = [0u8; CQE as usize];
            vm.ram_read(q.cq + u64::from(q.head) * CQE, &mut e)?;
            let dw =
                |i: usize| u32::from_le_bytes([e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3]]);
            // DW3: command id (15:0), phase tag (16), status (31:17).
            let dw3 = dw(3);
            if ((dw3 >> 16) & 1 == 1) == q.phase {
                break dw3;
            }
            if left.is_zero() {
                bail!(
                    "command {:#04x} (cid {cid}) on queue {}: no completion within \
                     {CMD_TIMEOUT:?} ({irqs} interrupt(s) on vector {})",
                    sqe[0] & 0xff,
                    q.qid,
                    q.vector
                );
            }
        };
        q.head = (q.head + 1) % DEPTH;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        vm.bar_write32(BAR, cq_db, u32::from(q.head))?;
        let got_cid = (entry & 0xffff) as u16;
        let status = entry >> 17;
        ensure!(
            got_cid == cid,
            "completion for cid {got_cid}, expected {cid}"
        );
        ensure!(
            status == 0,
            "command {:#04x} failed: status {status:#x} (SCT {}, SC {:#x})",
            sqe[0] & 0xff,
            (status >> 8) & 7,
            status & 0xff
        );
        ensure!(
            irqs > 0,
            "command {:#04x} completed without an interrupt on MSI-X vector {}",
            sqe[0] & 0xff,
            q.vector
        );
        Ok(Completion { irqs })
    }

    /// Identify (controller or namespace 1) into a zeroed buffer; returns the 4 KiB structure.
    fn identify(&mut self, cns: u32, nsid: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; PAGE];
        self.vm.ram_write(IDENT_GPA, &buf)?;
        let (lo, hi) = split(IDENT_GPA);
        let mut sqe = [0u32; 16];
        sqe[0] = OPC_IDENTIFY;
        sqe[1] = nsid;
        sqe[6] = lo;
        sqe[7] = hi;
        sqe[10] = cns;
        self.submit(false, sqe)?;
        self.vm.ram_read(IDENT_GPA, &mut buf)?;
        Ok(buf)
    }

    /// Identify Controller: checks the vendor id and the serial number, returns the serial
    /// and model.
    fn identify_controller(&mut self) -> Result<(String, String)> {
        let id = self.identify(CNS_CONTROLLER, 0)?;
        let vid = u16::from_le_bytes([id[0], id[1]]);
        let pci_vid = self.vm.cfg_read(0, 2) as u16;
        ensure!(
            vid == pci_vid,
            "Identify Controller VID {vid:#06x}, PCI vendor id {pci_vid:#06x}"
        );
        let text =
            |r: std::ops::Range<usize>| String::from_utf8_lossy(&id[r]).trim_end().to_string();
        let serial = text(4..24);
        let model = text(24..64);
        ensure!(
            serial == EXPECTED_SERIAL,
            "serial number {serial:?}, expected {EXPECTED_SERIAL:?}"
        );
        Ok((serial, model))
    }

    /// Identify Namespace 1: (number of blocks, block size).
    fn namespace(&mut self) -> Result<(u64, usize)> {
        let id = self.identify(CNS_NAMESPACE, 1)?;
        let nsze = u64::from_le_bytes(id[0..8].try_into().context("NSZE")?);
        let flbas = usize::from(id[26] & 0xf);
        let lbaf = 128 + 4 * flbas;
        let lbads = id[lbaf + 2];
        ensure!(
            (9..=12).contains(&lbads),
            "namespace 1 block size 2^{lbads} (FLBAS {flbas}) not in 512..=4096"
        );
        ensure!(nsze > TEST_LBA + 8, "namespace 1 has only {nsze} blocks");
        Ok((nsze, 1usize << lbads))
    }

    /// Creates I/O completion queue 1 (on MSI-X vector 1) and I/O submission queue 1.
    fn create_io_queues(&mut self) -> Result<()> {
        let size = u32::from(DEPTH - 1) << 16;
        let mut cq = [0u32; 16];
        cq[0] = OPC_CREATE_IO_CQ;
        (cq[6], cq[7]) = split(IOCQ_GPA);
        cq[10] = size | u32::from(IO_QID);
        // Interrupt vector, interrupts enabled, physically contiguous.
        cq[11] = (IO_VECTOR << 16) | 0b11;
        self.submit(false, cq)?;
        let mut sq = [0u32; 16];
        sq[0] = OPC_CREATE_IO_SQ;
        (sq[6], sq[7]) = split(IOSQ_GPA);
        sq[10] = size | u32::from(IO_QID);
        // Completion queue id, physically contiguous.
        sq[11] = (u32::from(IO_QID) << 16) | 1;
        self.submit(false, sq)?;
        self.io = Some(Queue::new(IO_QID, IOSQ_GPA, IOCQ_GPA, IO_VECTOR));
        Ok(())
    }

    /// Reads or writes `blocks` blocks at `lba` from/to the page at `gpa`.
    fn rw(&mut self, write: bool, lba: u64, blocks: u32, gpa: u64) -> Result<Completion> {
        let mut sqe = [0u32; 16];
        sqe[0] = if write { OPC_WRITE } else { OPC_READ };
        sqe[1] = 1;
        (sqe[6], sqe[7]) = split(gpa);
        (sqe[10], sqe[11]) = split(lba);
        sqe[12] = blocks - 1;
        self.submit(true, sqe)
    }

    /// Clears CC.EN and waits for the controller to stop, so nothing DMAs after detach.
    fn shut_down(&self) -> Result<()> {
        self.vm.bar_write32(BAR, REG_CC, 0)?;
        ensure!(
            vmm::poll_until(Duration::from_secs(10), || self
                .vm
                .bar_read32(BAR, REG_CSTS)
                & CSTS_RDY
                == 0),
            "controller still ready after clearing CC.EN"
        );
        Ok(())
    }
}

fn version(vs: u32) -> String {
    format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff)
}

/// The blocks written and read: one 4 KiB page of a pattern.
fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add((i >> 8) as u8) ^ seed)
        .collect()
}

/// Writes one page at [`TEST_LBA`] and reads it back into another page; returns the number of
/// I/O interrupts seen.
fn write_read(n: &mut Nvme<'_>, block_size: usize, seed: u8) -> Result<u64> {
    let blocks = u32::try_from(PAGE / block_size).context("block count")?;
    let data = pattern(seed);
    n.vm.ram_write(WRITE_GPA, &data)?;
    n.vm.ram_write(READ_GPA, &vec![0u8; PAGE])?;
    let w = n.rw(true, TEST_LBA, blocks, WRITE_GPA).context("write")?;
    let r = n.rw(false, TEST_LBA, blocks, READ_GPA).context("read")?;
    check_readback(n.vm, &data)?;
    Ok(w.irqs + r.irqs)
}

fn check_readback(vm: &Vm, data: &[u8]) -> Result<()> {
    let mut back = vec![0u8; data.len()];
    vm.ram_read(READ_GPA, &mut back)?;
    if let Some(i) = back.iter().zip(data).position(|(a, b)| a != b) {
        bail!(
            "block data read back differs from what was written at byte {i} ({:#04x} != {:#04x})",
            back[i],
            data[i]
        );
    }
    Ok(())
}

/// Brings the controller up (MSI-X, admin queues in DMA-mapped guest RAM), runs Identify
/// Controller (the controller reads the command from guest RAM and writes the completion and
/// the data there: DMA both ways) and shuts it down; returns the serial number.
pub fn identify_check(vm: &Vm) -> Result<String> {
    let mut n = Nvme::bring_up(vm)?;
    let (serial, _model) = n.identify_controller()?;
    n.shut_down()?;
    Ok(serial)
}

/// Enable MSI-X, bring the controller up with admin queues in DMA-mapped guest RAM, Identify
/// Controller: the serial number is the one QEMU was given.
pub fn identify(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, true)?;
    let mut n = Nvme::bring_up(&vm)?;
    let (serial, model) = n.identify_controller()?;
    let (nsze, bs) = n.namespace()?;
    n.shut_down()?;
    Ok(Outcome::Pass(format!(
        "NVMe {} serial {serial:?} model {model:?}; ns1 {nsze} blocks of {bs} bytes",
        version(n.version)
    )))
}

/// An I/O queue pair on MSI-X vector 1: blocks written with a pattern read back equal, each
/// completion announced by an interrupt on vector 1 (admin ones on vector 0).
pub fn io_roundtrip(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, true)?;
    let mut n = Nvme::bring_up(&vm)?;
    let route = vm
        .test_group(&n.group)
        .context("MSI-X group is not the test manager's")?
        .route(IO_VECTOR);
    ensure!(
        route.is_some_and(|r| r.address == vmm::MSI_ADDRESS && r.data == 0x40 + IO_VECTOR),
        "vector {IO_VECTOR} route {route:x?} is not what the guest programmed"
    );
    let (_, bs) = n.namespace()?;
    n.create_io_queues()?;
    let t0 = Instant::now();
    let irqs = write_read(&mut n, bs, pattern_seed())?;
    let took = t0.elapsed();
    n.shut_down()?;
    Ok(Outcome::Pass(format!(
        "{} blocks of {bs} bytes at LBA {TEST_LBA} written and read back equal in {} ms; \
         {irqs} interrupt(s) on MSI-X vector {IO_VECTOR}",
        PAGE / bs,
        took.as_millis()
    )))
}

/// After `reset()` the controller is disabled and interrupts are back to INTx; it comes up
/// again (MSI-X, admin queues, Identify) and the blocks written before the reset read back.
pub fn reset_reinit(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, true)?;
    if !vm.kernel.device_info()?.supports_reset() {
        return Ok(Outcome::Skip(
            "the kernel reports no function reset for this device (VFIO_DEVICE_FLAGS_RESET)".into(),
        ));
    }
    let seed = pattern_seed() ^ 0x5a;
    let bs = {
        let mut n = Nvme::bring_up(&vm)?;
        n.identify_controller()?;
        let (_, bs) = n.namespace()?;
        n.create_io_queues()?;
        write_read(&mut n, bs, seed)?;
        bs
    };
    let t0 = Instant::now();
    vm.dev.reset().context("VfioPciDevice::reset")?;
    let took = t0.elapsed();
    let mode = vm.dev.irq_mode();
    ensure!(
        mode == IrqMode::Intx,
        "irq mode {mode:?} after reset, expected Intx"
    );
    let cmd = vm.command();
    ensure!(
        cmd & (vmm::CMD_MEMORY | vmm::CMD_BUS_MASTER) == 0,
        "command register {cmd:#06x} after reset: decoding or bus mastering still on"
    );
    let msix = vm
        .msix_info()?
        .context("MSI-X capability gone after reset")?;
    let ctl = vm.cfg_read(msix.cap + 2, 2);
    ensure!(
        ctl & 0x8000 == 0,
        "MSI-X still enabled after reset ({ctl:#x})"
    );
    vm.command_set(vmm::CMD_MEMORY)?;
    let cc = vm.bar_read32(BAR, REG_CC);
    ensure!(
        cc & CC_EN == 0,
        "CC {cc:#x} after reset: the controller was not reset"
    );
    let mut n = Nvme::bring_up(&vm)?;
    let (serial, _) = n.identify_controller()?;
    n.create_io_queues()?;
    let blocks = u32::try_from(PAGE / bs).context("block count")?;
    vm.ram_write(READ_GPA, &vec![0u8; PAGE])?;
    n.rw(false, TEST_LBA, blocks, READ_GPA)
        .context("read after reset")?;
    check_readback(&vm, &pattern(seed))?;
    n.shut_down()?;
    Ok(Outcome::Pass(format!(
        "reset in {} ms; controller disabled, MSI-X off, irq mode {mode:?}; re-enabled, \
         serial {serial:?}, data written before the reset reads back",
        took.as_millis()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_are_spaced_by_the_cap_dstrd_stride() {
        // NVMe Base 2.0, 3.1.4.24/25: SQyTDBL at 1000h + (2y * (4 << DSTRD)),
        // CQyHDBL at 1000h + ((2y + 1) * (4 << DSTRD)).
        assert_eq!(doorbell(0, 0, false), 0x1000);
        assert_eq!(doorbell(0, 0, true), 0x1004);
        assert_eq!(doorbell(0, 1, false), 0x1008);
        assert_eq!(doorbell(0, 1, true), 0x100c);
        assert_eq!(doorbell(2, 1, false), 0x1000 + 2 * 16);
        assert_eq!(doorbell(2, 1, true), 0x1000 + 3 * 16);
    }

    #[test]
    fn version_register_prints_major_minor_tertiary() {
        assert_eq!(version(0x0001_0400), "1.4.0");
        assert_eq!(version(0x0002_0001), "2.0.1");
    }
}
