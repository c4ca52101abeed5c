//! Migration scenarios on the kernel backend: VFIO migration v2 with the kernel's own
//! migratable sample device, `mtty` (a mediated device: an emulated PCI function whose BAR0 and
//! BAR1 are the I/O ports of 16550 UARTs; `samples/vfio-mdev/mtty.c`), and type1 dirty page
//! tracking of guest RAM that QEMU's edu writes by DMA.
//!
//! What mtty migrates: a 24-byte header (magic, version, port count, flags) then, per port, its
//! registers and its loop-back FIFO (bytes written to THR wait there until RBR is read). Its
//! PRE_COPY stream holds the header only; STOP_COPY adds the ports. RESUMING checks the header
//! as it is written and loads the ports on leaving RESUMING, refusing a short stream. It
//! supports STOP_COPY, P2P and PRE_COPY, does no DMA, and its DMA logging is a stub that
//! accepts start and stop and never reports a page.
//!
//! The mdevs are created here (`mdev_supported_types/<type>/create` with a fresh UUID) and
//! removed when the scenario ends. A kernel without mtty (the Debian kernels: no
//! `CONFIG_SAMPLES`, no `mtty.ko`) skips these scenarios by design.

use crate::device::EDU;
use crate::edu;
use crate::harness::{Ctx, Outcome};
use crate::mode::{ByDesign, Mode};
use crate::vmm::{bar_index, RecordingMapper, Vm, RAM_BASE, RAM_SIZE};
use anyhow::{bail, ensure, Context, Result};
use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use pci_interrupts::{InterruptManager, InterruptSourceGroup, MsiRoute};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use vfio_backend::kernel::{IommufdIoas, KernelContainer, KernelDevice};
use vfio_backend::{region, IommuDomain, MigState, MigrationFlags, MigrationStream, Vfio};
use vfio_pci::{DeviceOptions, DeviceResources, GuestDma, VfioPciDevice};

/// The mtty parent's mdev types.
const MTTY_TYPES: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types";
/// mtty's PCI IDs (its emulated config space).
const MTTY_VENDOR: u16 = 0x4348;
const MTTY_DEVICE: u16 = 0x3253;
/// The size of mtty's migration header (`offsetof(struct mtty_data, ports)`).
const MTTY_HEADER: usize = 24;
/// 16550 registers (I/O BAR offsets, DLAB clear).
const UART_THR: u64 = 0;
const UART_LCR: u64 = 3;
/// The LCR's divisor latch access bit.
const LCR_DLAB: u8 = 0x80;
/// The most bytes a migration stream of mtty may be (it is under 100): a bound for reads.
const MAX_STREAM: usize = 4096;

/// One mtty instance, removed (best effort) when dropped: drop the devices opened on it first.
struct Mdev {
    uuid: String,
    path: PathBuf,
}

impl Mdev {
    /// Creates an instance of the mtty type with `ports` ports (`mtty-1` or `mtty-2`).
    fn create(ports: u32) -> Result<Mdev> {
        let types = Path::new(MTTY_TYPES);
        if !types.exists() {
            return Err(ByDesign(format!(
                "this kernel has no mtty ({MTTY_TYPES} is missing): the sample mdev needs \
                 CONFIG_SAMPLE_VFIO_MDEV_MTTY, which only --kernel custom builds (Debian's kernels \
                 set no CONFIG_SAMPLES and ship no mtty.ko)"
            ))
            .into());
        }
        let ty = fs::read_dir(types)
            .context("list mtty's mdev types")?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&format!("-{ports}")))
            })
            .with_context(|| format!("mtty has no {ports}-port type in {MTTY_TYPES}"))?;
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .context("read a fresh UUID")?
            .trim()
            .to_string();
        fs::write(ty.join("create"), &uuid)
            .with_context(|| format!("create mtty {uuid} in {}", ty.display()))?;
        Ok(Mdev {
            path: Path::new("/sys/bus/mdev/devices").join(&uuid),
            uuid,
        })
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        if let Err(e) = fs::write(self.path.join("remove"), "1") {
            log::warn!("remove mdev {}: {e}", self.uuid);
        }
    }
}

/// Opens an mdev the way `mode` reaches devices: legacy (and no-IOMMU, where an mdev still has
/// its emulated IOMMU group, which type1 takes without an IOMMU) through the group in a type1
/// container; iommufd through its vfio cdev. `bare` names it by its UUID rather than its path.
fn open_mdev(mode: Mode, m: &Mdev, bare: bool) -> Result<KernelDevice> {
    let name: PathBuf = if bare {
        PathBuf::from(&m.uuid)
    } else {
        m.path.clone()
    };
    match mode {
        Mode::Legacy | Mode::NoIommu => {
            KernelDevice::open(&name).with_context(|| format!("group open of mdev {}", m.uuid))
        }
        Mode::Iommufd => IommufdIoas::new()
            .context("iommufd: IOAS")?
            .open_device(&name)
            .with_context(|| format!("cdev open of mdev {}", m.uuid)),
    }
}

fn read_u8(dev: &dyn Vfio, index: u32, offset: u64) -> Result<u8> {
    let mut b = [0u8; 1];
    dev.region_read(index, offset, &mut b)
        .with_context(|| format!("read region {index} at {offset:#x}"))?;
    Ok(b[0])
}

fn write_u8(dev: &dyn Vfio, index: u32, offset: u64, v: u8) -> Result<()> {
    dev.region_write(index, offset, &[v])
        .with_context(|| format!("write {v:#04x} to region {index} at {offset:#x}"))
}

/// Writes `bytes` into the UART of port `port` (its I/O BAR), DLAB clear: they wait in its
/// loop-back FIFO.
fn uart_send(dev: &dyn Vfio, port: u32, bytes: &[u8]) -> Result<()> {
    let lcr = read_u8(dev, port, UART_LCR)?;
    ensure!(
        lcr & LCR_DLAB == 0,
        "port {port}: LCR {lcr:#04x} has DLAB set"
    );
    for &b in bytes {
        write_u8(dev, port, UART_THR, b)?;
    }
    Ok(())
}

/// Reads `n` bytes from port `port`'s RBR.
fn uart_receive(dev: &dyn Vfio, port: u32, n: usize) -> Result<Vec<u8>> {
    (0..n).map(|_| read_u8(dev, port, UART_THR)).collect()
}

/// Reads a stream until it says there is nothing more (bounded by [`MAX_STREAM`]).
fn read_all(s: &mut dyn MigrationStream, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("read the {what} stream"))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
        ensure!(
            out.len() <= MAX_STREAM,
            "the {what} stream goes on past {MAX_STREAM} bytes"
        );
    }
}

fn set(dev: &dyn Vfio, state: MigState) -> Result<Option<Box<dyn MigrationStream>>> {
    dev.set_mig_state(state)
        .with_context(|| format!("set migration state {state}"))
}

fn expect_state(dev: &dyn Vfio, want: MigState, after: &str) -> Result<()> {
    let got = dev.mig_state().context("get migration state")?;
    ensure!(got == want, "state {got} after {after}, expected {want}");
    Ok(())
}

/// The full state of `dev` as STOP_COPY streams it (from RUNNING, back to RUNNING).
fn save(dev: &dyn Vfio) -> Result<Vec<u8>> {
    let mut s =
        set(dev, MigState::StopCopy)?.context("RUNNING -> STOP_COPY returned no data fd")?;
    let data = read_all(s.as_mut(), "STOP_COPY")?;
    set(dev, MigState::Running)?;
    Ok(data)
}

/// mtty through the kernel backend: it opens by path and by bare UUID (group or cdev per
/// mode), its emulated config space and I/O BARs answer, and it reports migration with
/// STOP_COPY, P2P and PRE_COPY and device DMA logging.
pub fn mtty_open(ctx: &Ctx<'_>) -> Result<Outcome> {
    let m = Mdev::create(2)?;
    let dev = open_mdev(ctx.mode, &m, false)?;
    let mut id = [0u8; 4];
    dev.region_read(region::CONFIG, 0, &mut id)
        .context("read config space")?;
    let vendor = u16::from_le_bytes([id[0], id[1]]);
    let device = u16::from_le_bytes([id[2], id[3]]);
    ensure!(
        (vendor, device) == (MTTY_VENDOR, MTTY_DEVICE),
        "config space ids {vendor:04x}:{device:04x}, expected mtty's {MTTY_VENDOR:04x}:{MTTY_DEVICE:04x}"
    );
    for port in 0..2 {
        let r = dev.region_info(port).context("BAR region info")?;
        ensure!(
            r.size == 8,
            "BAR{port} is {} bytes, expected a 16550's 8",
            r.size
        );
    }
    uart_send(&dev, 1, b"hi")?;
    let back = uart_receive(&dev, 1, 2)?;
    ensure!(
        back == b"hi",
        "port 1 looped back {back:02x?}, expected \"hi\""
    );
    let flags = dev
        .migration_flags()
        .context("migration flags")?
        .context("mtty reports no migration support")?;
    let want = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
    ensure!(
        flags.0 == want,
        "migration flags {:#x}, expected STOP_COPY|P2P|PRE_COPY",
        flags.0
    );
    // mtty's DMA log is a stub that never reports a page (it does no DMA): start, a report
    // into a bitmap full of ones comes back clear (the kernel only sets bits: the backend
    // clears it first), stop.
    ensure!(
        dev.dma_logging_supported().context("probe DMA logging")?,
        "mtty offers DMA logging (a stub), the probe says no"
    );
    let page = 4096;
    let range = vfio_backend::DirtyRange {
        iova: 0x10_0000,
        length: 64 * page,
    };
    dev.dma_logging_start(page, &[range])
        .context("DMA logging start")?;
    let mut bitmap = [u64::MAX; 2];
    dev.dma_logging_report(range.iova, range.length, page, &mut bitmap)
        .context("DMA logging report")?;
    ensure!(bitmap[0] == 0, "DMA log of mtty names pages: {bitmap:x?}");
    ensure!(
        bitmap[1] == u64::MAX,
        "the report touched a word past its range"
    );
    let e = dev
        .dma_logging_report(range.iova, range.length, page / 2, &mut bitmap)
        .err()
        .context("a report at 2 KiB pages was taken")?;
    ensure!(
        matches!(e, vfio_backend::Error::InvalidArgument(_)),
        "report at 2 KiB: {e}"
    );
    dev.dma_logging_stop().context("DMA logging stop")?;
    drop(dev);
    let by_uuid = open_mdev(ctx.mode, &m, true)?;
    ensure!(
        by_uuid.name().contains(&m.uuid) || by_uuid.sysfs_path().is_some(),
        "opened by UUID as {}",
        by_uuid.name()
    );
    let how = match ctx.mode {
        Mode::Iommufd => "vfio cdev bound to iommufd",
        _ => "its emulated IOMMU group in a type1 container",
    };
    Ok(Outcome::Pass(format!(
        "mdev {} opened through {how} (path and bare UUID); {vendor:04x}:{device:04x}, two \
         8-byte UART BARs, port 1 loops bytes back; migration STOP_COPY|P2P|PRE_COPY; DMA \
         logging start / report (clear) / stop",
        m.uuid
    )))
}

/// Whether the kernel's path from `from` to `to` ends with an arc that opens a data fd.
fn opens_data_fd(from: MigState, to: MigState) -> bool {
    use MigState::*;
    if from == to {
        return false;
    }
    match to {
        Resuming => true,
        // PRE_COPY_P2P -> STOP_COPY continues the pre-copy session.
        StopCopy | PreCopy | PreCopyP2p => !matches!(from, PreCopy | PreCopyP2p),
        _ => false,
    }
}

/// Moves `dev` to `state` from wherever it is; entering RESUMING writes `saved` at once, so
/// that leaving it later loads a whole state.
fn goto(dev: &dyn Vfio, state: MigState, saved: &[u8]) -> Result<()> {
    let cur = dev.mig_state()?;
    if cur == state {
        return Ok(());
    }
    if cur == MigState::StopCopy && matches!(state, MigState::PreCopy | MigState::PreCopyP2p) {
        set(dev, MigState::Stop)?;
    }
    if let Some(mut s) = set(dev, state)? {
        if state == MigState::Resuming {
            s.write(saved).context("write the saved state")?;
        }
    }
    Ok(())
}

/// Every transition between the seven states, one arc or several, as `Vfio::set_mig_state`
/// makes them on mtty: the new state is the one asked for and a data fd comes back exactly
/// when the last arc opens a session; the refused ones (STOP_COPY -> PRE_COPY and
/// PRE_COPY_P2P, anything -> ERROR) fail with EINVAL and leave the state as it was; a short
/// RESUMING stream is refused on leaving RESUMING (the device stays RESUMING), a corrupt one
/// on write, an overlong one on write, each leaving the device RESUMING.
pub fn mtty_migration_states(ctx: &Ctx<'_>) -> Result<Outcome> {
    let m = Mdev::create(1)?;
    let dev = open_mdev(ctx.mode, &m, false)?;
    expect_state(&dev, MigState::Running, "open")?;
    let saved = save(&dev)?;
    let size = dev.mig_data_size().context("MIG_DATA_SIZE")?;
    ensure!(
        size as usize == saved.len(),
        "MIG_DATA_SIZE {size} but STOP_COPY streamed {} bytes",
        saved.len()
    );
    let states = [
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];
    let mut arcs = 0;
    let mut fds = 0;
    let mut refused = 0;
    for from in states {
        for to in states {
            let step = format!("{from} -> {to}");
            goto(&dev, MigState::Running, &saved).with_context(|| format!("{step}: reset path"))?;
            goto(&dev, from, &saved).with_context(|| format!("{step}: reach {from}"))?;
            expect_state(&dev, from, &format!("{step}: reaching {from}"))?;
            let blocked = from == MigState::StopCopy
                && matches!(to, MigState::PreCopy | MigState::PreCopyP2p);
            match dev.set_mig_state(to) {
                Ok(_) if blocked => bail!("{step} succeeded; vfio.h forbids it"),
                Err(e) if blocked => {
                    ensure!(
                        e.errno() == Some(libc::EINVAL),
                        "{step}: refused with {e}, expected EINVAL"
                    );
                    expect_state(&dev, from, &format!("refused {step}"))?;
                    refused += 1;
                }
                Err(e) => bail!("{step}: {e}"),
                Ok(stream) => {
                    expect_state(&dev, to, &step)?;
                    let want = opens_data_fd(from, to);
                    ensure!(
                        stream.is_some() == want,
                        "{step}: data fd {}, expected {}",
                        if stream.is_some() { "returned" } else { "none" },
                        if want { "one" } else { "none" }
                    );
                    if let (Some(mut s), MigState::Resuming) = (stream, to) {
                        s.write(&saved)
                            .with_context(|| format!("{step}: write state"))?;
                        fds += 1;
                    } else if want {
                        fds += 1;
                    }
                    arcs += 1;
                }
            }
        }
    }
    goto(&dev, MigState::Running, &saved)?;

    // ERROR is never a target.
    let e = dev
        .set_mig_state(MigState::Error)
        .err()
        .context("set to ERROR succeeded")?;
    ensure!(e.errno() == Some(libc::EINVAL), "set to ERROR: {e}");
    expect_state(&dev, MigState::Running, "refused set to ERROR")?;

    // A short stream: leaving RESUMING fails, the device stays RESUMING; the rest completes it.
    let mut s = set(&dev, MigState::Resuming)?.context("no RESUMING data fd")?;
    let (head, rest) = saved.split_at(MTTY_HEADER.min(saved.len()));
    s.write(head).context("write the header")?;
    let e = dev
        .set_mig_state(MigState::Stop)
        .err()
        .context("RESUMING -> STOP with only the header succeeded")?;
    ensure!(e.errno() == Some(libc::EINVAL), "short stream: {e}");
    expect_state(&dev, MigState::Resuming, "a refused short stream")?;
    s.write(rest).context("write the rest")?;
    set(&dev, MigState::Running)?;
    drop(s);

    // A corrupt header is refused as it is written; the device stays RESUMING and is brought
    // out by the rest of a whole state (mtty checks the header once, as it arrives; mtty has
    // no VFIO_DEVICE_FLAGS_RESET, so the reset vfio.h names for aborting is not offered).
    let mut s = set(&dev, MigState::Resuming)?.context("no RESUMING data fd")?;
    let mut bad = saved.clone();
    bad[0] ^= 0xff;
    let e = s
        .write(&bad[..MTTY_HEADER])
        .err()
        .context("a header with a wrong magic was taken")?;
    expect_state(&dev, MigState::Resuming, "a refused header")?;
    s.write(&saved[MTTY_HEADER..]).context("write the ports")?;
    set(&dev, MigState::Running)?;
    drop(s);
    // An overlong stream is refused before any of it is taken; the whole state then resumes.
    let mut s = set(&dev, MigState::Resuming)?.context("no RESUMING data fd")?;
    let mut long = saved.clone();
    long.push(0);
    let e2 = s
        .write(&long)
        .err()
        .context("a stream longer than the state was taken")?;
    expect_state(&dev, MigState::Resuming, "a refused overlong stream")?;
    s.write(&saved).context("write the state")?;
    set(&dev, MigState::Running)?;
    drop(s);
    Ok(Outcome::Pass(format!(
        "{arcs} transitions as asked ({fds} with a new data fd), {refused} blocked ones EINVAL \
         with the state kept, ERROR refused; short stream refused at RESUMING -> STOP (still \
         RESUMING), corrupt header refused on write ({e}), overlong stream refused ({e2}), each \
         leaving RESUMING"
    )))
}

/// A migration of mtty's UARTs at the `Vfio` level: bytes wait in the source's two FIFOs; the
/// source goes PRE_COPY (initial bytes read, precopy info falls to 0), then STOP_COPY (read to
/// the end, no new fd); the destination RESUMING takes it all and goes RUNNING; the same bytes
/// come out of the destination's ports. Then both through the P2P states a multi-device VMM
/// uses: all to RUNNING_P2P, then all to STOP, then all back to RUNNING.
pub fn mtty_migrate(ctx: &Ctx<'_>) -> Result<Outcome> {
    let src_m = Mdev::create(2)?;
    let dst_m = Mdev::create(2)?;
    let src = open_mdev(ctx.mode, &src_m, false)?;
    let dst = open_mdev(ctx.mode, &dst_m, true)?;
    let msg0 = b"migrate!";
    let msg1 = b"port 1";
    uart_send(&src, 0, msg0)?;
    uart_send(&src, 1, msg1)?;

    let mut stream = set(&src, MigState::PreCopy)?.context("RUNNING -> PRE_COPY: no data fd")?;
    let info = stream.precopy_info().context("precopy info")?;
    ensure!(
        info.initial_bytes > 0,
        "precopy info reports no initial bytes: {info:?}"
    );
    let mut data = read_all(stream.as_mut(), "PRE_COPY")?;
    ensure!(
        data.len() as u64 == info.initial_bytes,
        "PRE_COPY streamed {} bytes, precopy info said {}",
        data.len(),
        info.initial_bytes
    );
    let after = stream.precopy_info().context("precopy info")?;
    ensure!(
        after.initial_bytes == 0 && after.dirty_bytes == 0,
        "precopy info after reading everything: {after:?}"
    );
    let more = stream.read(&mut [0u8; 16]).context("read past the end")?;
    ensure!(more == 0, "PRE_COPY gave {more} more bytes past its end");
    let again = set(&src, MigState::StopCopy)?;
    ensure!(
        again.is_none(),
        "PRE_COPY -> STOP_COPY opened a new data fd instead of continuing the session"
    );
    let rest = read_all(stream.as_mut(), "STOP_COPY")?;
    ensure!(
        !rest.is_empty(),
        "STOP_COPY streamed nothing after PRE_COPY"
    );
    data.extend_from_slice(&rest);
    let e = stream
        .precopy_info()
        .err()
        .context("precopy info answered in STOP_COPY")?;
    ensure!(
        e.errno() == Some(libc::EINVAL),
        "precopy info in STOP_COPY: {e}"
    );
    drop(stream);

    let mut sink = set(&dst, MigState::Resuming)?.context("RUNNING -> RESUMING: no data fd")?;
    sink.write(&data).context("write the state")?;
    set(&dst, MigState::Running)?;
    drop(sink);
    expect_state(&dst, MigState::Running, "resume")?;
    let got0 = uart_receive(&dst, 0, msg0.len())?;
    let got1 = uart_receive(&dst, 1, msg1.len())?;
    ensure!(
        got0 == msg0 && got1 == msg1,
        "destination ports gave {got0:02x?} / {got1:02x?}, expected {msg0:02x?} / {msg1:02x?}"
    );
    // The source keeps its state and runs again (a VMM may abort).
    set(&src, MigState::Running)?;
    let back0 = uart_receive(&src, 0, msg0.len())?;
    ensure!(
        back0 == msg0,
        "source port 0 after STOP_COPY -> RUNNING gave {back0:02x?}"
    );

    for state in [MigState::RunningP2p, MigState::Stop, MigState::Running] {
        for (name, d) in [("source", &src), ("destination", &dst)] {
            let fd = set(d, state).context(name)?;
            ensure!(fd.is_none(), "{name}: {state} opened a data fd");
            expect_state(d, state, name)?;
        }
    }
    Ok(Outcome::Pass(format!(
        "{} bytes ({} in PRE_COPY, precopy info {} -> 0), STOP_COPY on the same fd; \
         destination resumed; {:?} and {:?} read back there; source runs on; both through \
         RUNNING_P2P -> STOP -> RUNNING",
        data.len(),
        info.initial_bytes,
        info.initial_bytes,
        String::from_utf8_lossy(msg0),
        String::from_utf8_lossy(msg1)
    )))
}

/// Type1 dirty page tracking with edu (legacy mode): edu's DMA writes one page of guest RAM
/// while tracking runs. type1 cannot see what a device behind the IOMMU writes (vfio-pci pins
/// nothing through the vendor pin API), so as the kernel documents
/// (`update_user_bitmap`: "mark all pages dirty if any IOMMU capable device is not able to
/// report dirty pages") every page of the mapping is reported dirty, and again on the next
/// report; the written page is among them. The report takes only the smallest IOMMU page and
/// whole mappings; after STOP a report fails. In iommufd mode the IOAS answers Unsupported,
/// saying why, and the IOMMU (QEMU's intel-iommu) reports no dirty-tracking capability.
pub fn type1_dirty_edu(ctx: &Ctx<'_>) -> Result<Outcome> {
    let device = ctx.device()?;
    ensure!(device.id == EDU, "not an edu");
    let vm = Vm::attach(device, true)?;
    vm.enable_memory_and_bus_master()?;
    let domain: Arc<dyn IommuDomain> = vm.kernel.iommu_domain();
    if ctx.mode == Mode::Iommufd {
        let e = domain
            .dirty_page_sizes()
            .err()
            .context("the IOAS claims dirty tracking")?;
        ensure!(
            matches!(e, vfio_backend::Error::Unsupported(_))
                && e.to_string().contains("IOMMU_HWPT_ALLOC_DIRTY_TRACKING"),
            "IOAS dirty tracking: {e}"
        );
        let hw = vm
            .kernel
            .iommu_hw_dirty_tracking()
            .context("IOMMU_GET_HW_INFO")?;
        ensure!(
            !hw,
            "QEMU's intel-iommu reports IOMMU_HW_CAP_DIRTY_TRACKING"
        );
        return Ok(Outcome::Pass(format!(
            "IOAS dirty tracking Unsupported ({e}); IOMMU_GET_HW_INFO: no \
             IOMMU_HW_CAP_DIRTY_TRACKING"
        )));
    }
    let page = domain.dirty_page_sizes().context("dirty page sizes")?;
    ensure!(
        page.is_power_of_two(),
        "dirty page sizes {page:#x}: expected the one smallest page"
    );
    let size = RAM_SIZE as u64;
    let pages = size / page;
    let words = usize::try_from(pages.div_ceil(64))?;
    let mut bitmap = vec![0u64; words];
    domain.dirty_tracking_start().context("start")?;
    edu::dma_check(&vm)?;
    domain
        .dirty_bitmap(RAM_BASE, size, page, &mut bitmap)
        .context("first report")?;
    let dirty: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
    let written = (0x8000 / page) as usize;
    ensure!(
        bitmap[written / 64] & (1 << (written % 64)) != 0,
        "the page edu wrote (RAM + 0x8000) is not dirty"
    );
    ensure!(
        dirty == pages,
        "{dirty} of {pages} pages dirty: type1 with a vfio-pci device reports every mapped page"
    );
    domain
        .dirty_bitmap(RAM_BASE, size, page, &mut bitmap)
        .context("second report")?;
    let dirty2: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
    ensure!(dirty2 == pages, "second report: {dirty2} of {pages} pages");
    let e = domain
        .dirty_bitmap(RAM_BASE, page, page, &mut bitmap)
        .err()
        .context("a report cutting the mapping was taken")?;
    ensure!(e.errno() == Some(libc::EINVAL), "partial report: {e}");
    let e = domain
        .dirty_bitmap(RAM_BASE, size, page * 2, &mut bitmap)
        .err()
        .context("a report at twice the page size was taken")?;
    ensure!(
        matches!(e, vfio_backend::Error::InvalidArgument(_)),
        "report at {:#x}: {e}",
        page * 2
    );
    domain.dirty_tracking_stop().context("stop")?;
    let e = domain
        .dirty_bitmap(RAM_BASE, size, page, &mut bitmap)
        .err()
        .context("a report after stop was taken")?;
    ensure!(e.errno() == Some(libc::EINVAL), "report after stop: {e}");
    Ok(Outcome::Pass(format!(
        "{page:#x}-byte pages; edu DMA wrote RAM + 0x8000; both reports: all {pages} pages \
         dirty (type1 cannot see a vfio-pci device's writes); partial-mapping report EINVAL, \
         wrong page size refused, report after stop EINVAL"
    )))
}

/// Type1 dirty tracking in a container whose only device is an mdev (a pinned-scope device,
/// whose vendor driver tells type1 what it touches): mtty writes no guest memory, so with
/// tracking on, reports of a mapped buffer are clear, exactly.
pub fn type1_dirty_mdev(ctx: &Ctx<'_>) -> Result<Outcome> {
    if ctx.mode == Mode::Iommufd {
        return Err(ByDesign(
            "type1 dirty tracking needs a legacy container (iommufd's is covered by \
             type1-dirty-edu, which checks that the IOAS says Unsupported)"
                .into(),
        )
        .into());
    }
    let m = Mdev::create(1)?;
    let container = KernelContainer::new().context("container")?;
    let dev = container.open_device(&m.path).context("open mtty")?;
    let page = container.dirty_page_sizes().context("dirty page sizes")?;
    let len = 16 * page as usize;
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), len)])
        .context("buffer")?;
    let host = {
        use vm_memory::GuestMemoryBackend;
        mem.get_host_address(vm_memory::GuestAddress(0))
            .context("host address")? as u64
    };
    let iova = 0x1000_0000;
    // SAFETY: `mem` is a private anonymous mapping of `len` bytes that lives until after the
    // unmap below; mtty never accesses guest memory.
    unsafe {
        container.map(
            iova,
            len as u64,
            vfio_backend::DmaSource {
                host_addr: host,
                file: None,
                read_only: false,
            },
        )
    }
    .context("map")?;
    container.dirty_tracking_start().context("start")?;
    let mut bitmap = vec![u64::MAX; 1];
    container
        .dirty_bitmap(iova, len as u64, page, &mut bitmap)
        .context("report")?;
    ensure!(
        bitmap[0] == 0,
        "bitmap {:#x}: mtty wrote nothing",
        bitmap[0]
    );
    container
        .dirty_bitmap(iova, len as u64, page, &mut bitmap)
        .context("second report")?;
    ensure!(bitmap[0] == 0, "second bitmap {:#x}", bitmap[0]);
    container.dirty_tracking_stop().context("stop")?;
    container.unmap(iova, len as u64).context("unmap")?;
    drop(dev);
    Ok(Outcome::Pass(format!(
        "container with mdev {} only: {page:#x}-byte pages, two reports of 16 mapped pages \
         clear (pinned scope: exact)",
        m.uuid
    )))
}

/// The command register's I/O space enable.
const CMD_IO: u16 = 1 << 0;

/// A VMM without irqfd resampling: the test interrupt manager's groups, minus their INTx
/// resample eventfd. mtty refuses an INTx unmask eventfd (`VFIO_IRQ_SET_ACTION_UNMASK` with
/// `DATA_EVENTFD`: ENOTTY), and `VfioPciDevice` fails to attach when the one it is given is
/// refused, so its INTx is unmasked by ioctl instead.
struct NoResample(pci_interrupts::testing::TestInterruptManager);

struct NoResampleGroup(Arc<dyn InterruptSourceGroup>);

impl InterruptSourceGroup for NoResampleGroup {
    fn len(&self) -> u32 {
        self.0.len()
    }
    fn notifier(&self, vector: u32) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.0.notifier(vector)
    }
    fn update(&self, vector: u32, route: MsiRoute, masked: bool) -> pci_interrupts::Result<()> {
        self.0.update(vector, route, masked)
    }
    fn enable(&self) -> pci_interrupts::Result<()> {
        self.0.enable()
    }
    fn disable(&self) -> pci_interrupts::Result<()> {
        self.0.disable()
    }
    fn trigger(&self, vector: u32) -> pci_interrupts::Result<()> {
        self.0.trigger(vector)
    }
}

impl InterruptManager for NoResample {
    fn create_msi_group(
        &self,
        count: u32,
    ) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        self.0.create_msi_group(count)
    }
    fn create_intx_group(&self) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        Ok(Arc::new(NoResampleGroup(self.0.create_intx_group()?)))
    }
}

/// An mtty attached through `VfioPciDevice` (no guest RAM: mtty does no DMA), I/O decoding on.
struct MttyVm {
    dev: VfioPciDevice,
    kernel: Arc<KernelDevice>,
}

impl MttyVm {
    fn attach(ctx: &Ctx<'_>, m: &Mdev) -> Result<MttyVm> {
        let kernel = Arc::new(open_mdev(ctx.mode, m, false)?);
        let vfio: Arc<dyn Vfio> = kernel.clone();
        let allocator = BarAllocator::new(
            BarWindows::new(AddressWindow::new(0xC000_0000, 0x2000_0000))
                .with_io(AddressWindow::new(0xC000, 0x4000)),
        )
        .context("BAR allocator")?;
        let dev = VfioPciDevice::new(
            vfio,
            DeviceResources {
                interrupts: Arc::new(NoResample(
                    pci_interrupts::testing::TestInterruptManager::new(),
                )),
                mapper: Arc::new(RecordingMapper::default()),
                allocator: Arc::new(Mutex::new(allocator)),
                dma: GuestDma::new(),
            },
            DeviceOptions::default(),
        )
        .context("VfioPciDevice::new on mtty")?;
        let vm = MttyVm { dev, kernel };
        let cmd = vm.command();
        vm.dev
            .write_config(4, &(cmd | CMD_IO).to_le_bytes())
            .context("enable I/O decoding")?;
        Ok(vm)
    }

    fn command(&self) -> u16 {
        let mut b = [0u8; 2];
        self.dev.read_config(4, &mut b);
        u16::from_le_bytes(b)
    }

    /// Writes `bytes` into port `port`'s THR (the guest's view of the I/O BAR).
    fn send(&self, port: usize, bytes: &[u8]) -> Result<()> {
        for &b in bytes {
            self.dev
                .write_bar(bar_index(port), UART_THR, &[b])
                .with_context(|| format!("THR write on port {port}"))?;
        }
        Ok(())
    }

    /// Reads `n` bytes from port `port`'s RBR.
    fn receive(&self, port: usize, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8; 1];
                self.dev.read_bar(bar_index(port), UART_THR, &mut b);
                b[0]
            })
            .collect()
    }
}

/// The same migration through `VfioPciDevice`'s API (what a VMM calls): bytes wait in the
/// source's UARTs; `start_migration`, a pre-copy round, `quiesce` (PRE_COPY_P2P),
/// `stop_and_copy`, `complete` write one checked stream; the destination's
/// `resume_migration` checks it whole, loads it and runs; the bytes come out of the
/// destination's ports and its command register (I/O decoding) came along. A stream with one
/// byte flipped and a truncated one are refused with the destination left RUNNING; a
/// migration aborted after pre-copy leaves the device RUNNING with its bytes.
pub fn mtty_migrate_vfio_pci(ctx: &Ctx<'_>) -> Result<Outcome> {
    let src_m = Mdev::create(2)?;
    let dst_m = Mdev::create(2)?;
    let src = MttyVm::attach(ctx, &src_m)?;
    let dst = MttyVm::attach(ctx, &dst_m)?;
    let msg0 = b"VfioPci0";
    let msg1 = b"pci1";
    src.send(0, msg0)?;
    src.send(1, msg1)?;

    let mut stream = Vec::new();
    let mut mig = src.dev.start_migration().context("start_migration")?;
    let caps = mig.caps();
    ensure!(
        caps.pre_copy() && caps.p2p(),
        "mtty's caps through VfioPciDevice: {caps:?}"
    );
    let left = mig.precopy(&mut stream).context("pre-copy round")?;
    ensure!(
        left.initial_bytes == 0,
        "pre-copy left {left:?} after one round"
    );
    let after_precopy = stream.len();
    mig.quiesce().context("quiesce")?;
    expect_state(src.kernel.as_ref(), MigState::PreCopyP2p, "quiesce")?;
    mig.stop_and_copy(&mut stream).context("stop_and_copy")?;
    expect_state(src.kernel.as_ref(), MigState::Stop, "stop_and_copy")?;
    mig.complete().context("complete")?;

    // Refused streams leave the destination RUNNING and untouched.
    let mut flipped = stream.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let e1 = dst
        .dev
        .resume_migration(flipped.as_slice())
        .err()
        .context("a stream with a flipped byte was loaded")?;
    let e2 = dst
        .dev
        .resume_migration(&stream[..stream.len() - 7])
        .err()
        .context("a truncated stream was loaded")?;
    expect_state(dst.kernel.as_ref(), MigState::Running, "refused streams")?;

    dst.dev
        .resume_migration(stream.as_slice())
        .context("resume_migration")?;
    expect_state(dst.kernel.as_ref(), MigState::Running, "resume")?;
    ensure!(
        dst.command() & CMD_IO != 0,
        "the destination's command register {:#x} lost I/O decoding",
        dst.command()
    );
    let got0 = dst.receive(0, msg0.len());
    let got1 = dst.receive(1, msg1.len());
    ensure!(
        got0 == msg0 && got1 == msg1,
        "destination ports gave {got0:02x?} / {got1:02x?}"
    );

    // Abort after pre-copy: the device runs on with its bytes.
    dst.send(0, b"ab")?;
    let mut scratch = Vec::new();
    let mut mig = dst.dev.start_migration().context("second start")?;
    mig.precopy(&mut scratch).context("pre-copy")?;
    mig.abort().context("abort")?;
    expect_state(dst.kernel.as_ref(), MigState::Running, "abort")?;
    let kept = dst.receive(0, 2);
    ensure!(kept == b"ab", "after abort port 0 gave {kept:02x?}");
    Ok(Outcome::Pass(format!(
        "{} stream bytes ({after_precopy} after pre-copy); PRE_COPY_P2P on quiesce, STOP after \
         stop_and_copy; flipped byte refused ({e1}), truncated refused ({e2}), destination \
         still RUNNING; resumed with I/O decoding and both ports' bytes; abort after pre-copy \
         keeps the device RUNNING with its data",
        stream.len()
    )))
}

/// `vfio-passthrough check <edu> --json` on the live device: its migration report says edu
/// cannot migrate (QEMU's edu has no migration v2) after opening it for real, and what the
/// IOMMU domain tracks in each access mode the host offers: type1 at the 4 KiB page (legacy),
/// nothing through iommufd (saying the IOMMU has no dirty-tracking capability) or no-IOMMU.
pub fn cli_check_migration(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    if !ctx.cli.is_file() {
        return Ok(Outcome::Skip(format!(
            "{} does not exist: the vfio-passthrough binary is not installed here",
            ctx.cli.display()
        )));
    }
    let out = std::process::Command::new(ctx.cli)
        .args(["check", &dev.bdf, "--json"])
        .output()
        .context("run vfio-passthrough check")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "check printed no JSON (stderr: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let m = &v["migration"];
    let detail = m["detail"].as_str().unwrap_or_default();
    ensure!(m["checked"] == true, "migration not checked: {detail}");
    ensure!(m["can_migrate"] == false, "edu reported migratable: {m}");
    ensure!(
        m["device_dma_logging"] == false,
        "edu reported DMA logging: {m}"
    );
    let via = m["opened_via"].as_str().unwrap_or_default();
    let by_mode = m["dirty_tracking_by_mode"]
        .as_array()
        .context("no dirty_tracking_by_mode")?;
    let mode = |name: &str| by_mode.iter().find(|e| e["mode"] == name);
    match ctx.mode {
        Mode::Legacy | Mode::Iommufd => {
            let legacy = mode("legacy").context("legacy mode not reported")?;
            ensure!(
                legacy["supported"] == true && legacy["page_sizes"] == serde_json::json!([4096]),
                "type1 dirty tracking: {legacy}"
            );
            // Asked through iommufd where the host offers the cdev (the custom kernel; the
            // Debian ones have no iommufd).
            let cdev = v["modes"]["cdev"]["available"] == true;
            match mode("iommufd") {
                Some(iommufd) => ensure!(
                    cdev && iommufd["supported"] == false
                        && iommufd["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("no IOMMU_HW_CAP_DIRTY_TRACKING")),
                    "iommufd dirty tracking (cdev offered: {cdev}): {iommufd}"
                ),
                None => ensure!(!cdev, "the host offers the cdev but iommufd was not asked"),
            }
            ensure!(
                m["domain_dirty_tracking"] == true
                    && m["dirty_page_sizes"] == serde_json::json!([4096]),
                "summary: {m}"
            );
        }
        Mode::NoIommu => {
            let noiommu = mode("noiommu").context("noiommu mode not reported")?;
            ensure!(noiommu["supported"] == false, "no-IOMMU: {noiommu}");
            ensure!(m["domain_dirty_tracking"] == false, "summary: {m}");
        }
    }
    let item = v["items"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "migration"))
        .context("no migration item")?;
    ensure!(item["verdict"] == "ok", "migration item {item}");
    Ok(Outcome::Pass(format!("opened via {via}: {detail}")))
}

/// iommufd dirty tracking through a HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`
/// (`IommufdIoas::new_dirty_tracking`): before any device it reports no page table; opening
/// edu agrees with `IOMMU_GET_HW_INFO`: QEMU's intel-iommu has no dirty-tracking capability,
/// so the kernel refuses the page table (EOPNOTSUPP) and the open fails with `Unsupported`
/// naming it. On an IOMMU that has the capability the page table is tracked: start, a
/// report, stop.
pub fn iommufd_dirty_hwpt(ctx: &Ctx<'_>) -> Result<Outcome> {
    let device = ctx.device()?;
    if ctx.mode != Mode::Iommufd {
        return Err(ByDesign("an iommufd HWPT exists in iommufd mode only".into()).into());
    }
    let hw = {
        let plain = IommufdIoas::new()
            .context("IOAS")?
            .open_device(&device.sysfs)
            .context("open on a plain IOAS")?;
        plain
            .iommu_hw_dirty_tracking()
            .context("IOMMU_GET_HW_INFO")?
    };
    let ioas = IommufdIoas::new_dirty_tracking().context("IOAS")?;
    let e = ioas
        .dirty_page_sizes()
        .err()
        .context("dirty page sizes before any device")?;
    ensure!(
        matches!(e, vfio_backend::Error::InvalidArgument(_)),
        "before a device: {e}"
    );
    match ioas.open_device(&device.sysfs) {
        Err(e) => {
            ensure!(
                !hw,
                "the IOMMU reports dirty tracking but the HWPT was refused: {e}"
            );
            ensure!(
                matches!(e, vfio_backend::Error::Unsupported(_))
                    && e.to_string().contains("IOMMU_HWPT_ALLOC_DIRTY_TRACKING"),
                "refusal: {e}"
            );
            Ok(Outcome::Pass(format!(
                "no IOMMU_HW_CAP_DIRTY_TRACKING, and the dirty-tracking HWPT is refused: {e}"
            )))
        }
        Ok(dev) => {
            ensure!(
                hw,
                "a dirty-tracking HWPT on an IOMMU without the capability"
            );
            let page = 4096;
            let pages = ioas.dirty_page_sizes().context("page sizes")?;
            ensure!(pages & page != 0, "page sizes {pages:#x}");
            ioas.dirty_tracking_start().context("start")?;
            let mut bitmap = [u64::MAX; 1];
            let r = ioas.dirty_bitmap(0, 64 * page, page, &mut bitmap);
            ioas.dirty_tracking_stop().context("stop")?;
            r.context("report")?;
            drop(dev);
            Ok(Outcome::Pass(format!(
                "HW dirty tracking: HWPT allocated, start / report ({:#x}) / stop",
                bitmap[0]
            )))
        }
    }
}

/// Two mttys of one VMM migrated together through `VfioPciDevice`, in the order a VMM with
/// peer devices needs: both sources quiesce (PRE_COPY_P2P) before either stops, both streams
/// follow each other in one wire; the destinations are both loaded (left RUNNING_P2P) before
/// either runs. Each destination gets its own source's bytes.
pub fn mtty_migrate_two_vfio_pci(ctx: &Ctx<'_>) -> Result<Outcome> {
    let ms: Vec<Mdev> = (0..4).map(|_| Mdev::create(1)).collect::<Result<_>>()?;
    let vms: Vec<MttyVm> = ms
        .iter()
        .map(|m| MttyVm::attach(ctx, m))
        .collect::<Result<_>>()?;
    let (a, b, x, y) = (&vms[0], &vms[1], &vms[2], &vms[3]);
    a.send(0, b"first")?;
    b.send(0, b"second")?;
    let mut wire = Vec::new();
    let mut ma = a.dev.start_migration().context("start A")?;
    let mut mb = b.dev.start_migration().context("start B")?;
    ma.quiesce().context("quiesce A")?;
    mb.quiesce().context("quiesce B")?;
    for (n, v) in [("A", a), ("B", b)] {
        expect_state(v.kernel.as_ref(), MigState::PreCopyP2p, n)?;
    }
    ma.stop_and_copy(&mut wire).context("stop A")?;
    mb.stop_and_copy(&mut wire).context("stop B")?;
    ma.complete()?;
    mb.complete()?;
    let mut r = wire.as_slice();
    let lx = x.dev.load_migration(&mut r).context("load X")?;
    let ly = y.dev.load_migration(&mut r).context("load Y")?;
    ensure!(r.is_empty(), "{} bytes left after both loads", r.len());
    for (n, v) in [("X", x), ("Y", y)] {
        expect_state(v.kernel.as_ref(), MigState::RunningP2p, n)?;
    }
    lx.run().context("run X")?;
    ly.run().context("run Y")?;
    let gx = x.receive(0, 5);
    let gy = y.receive(0, 6);
    ensure!(
        gx == b"first" && gy == b"second",
        "destinations gave {gx:02x?} / {gy:02x?}"
    );
    Ok(Outcome::Pass(format!(
        "{} bytes for two devices: both quiesced (PRE_COPY_P2P) before either stopped; both \
         loaded (RUNNING_P2P) before either ran; each destination has its source's bytes",
        wire.len()
    )))
}
