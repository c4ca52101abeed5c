//! The fuzz targets' bodies, as plain functions of the input bytes.
//!
//! `fuzz/fuzz_targets/*.rs` (cargo-fuzz) call these; the regression tests
//! in `tests/fuzz_regressions.rs` replay the committed corpora and every
//! input that once crashed through the same functions, so that a crash
//! found by the fuzzer stays fixed without cargo-fuzz.
//!
//! Each function panics (with `assert!`) when an invariant breaks: that is
//! the fuzzer's oracle. Invariants: no panic and no hang anywhere in the
//! stack; what the spec makes read-only stays so; detaching leaves no guest
//! mapping and no interrupt enabled; a vfio-user client never hangs past
//! its timeout.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pci_interrupts::InterruptSourceGroup;
use vfio_backend::user::protocol::{self, header_flags, Header, HEADER_SIZE};
use vfio_backend::user::{UserDevice, UserOptions};
use vfio_backend::{DmaFile, DmaSource, SparseArea, Vfio};
use vfio_fake_device::{DeviceTemplate, FakeDevice};
use vfio_pci::VfioPciDevice;

use crate::guest::*;
use crate::vmm::Vm;

/// Reads the fuzzer's bytes as numbers; zeros once they run out.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Over `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// No bytes left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for (d, s) in b.iter_mut().zip(self.bytes(N)) {
            *d = *s;
        }
        b
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    /// The next two bytes, little endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    /// The next four bytes, little endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    /// The next eight bytes, little endian.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }
}

/// The most operations one input drives (keeps each run short).
const MAX_OPS: usize = 512;

/// A device for a fuzz case, picked by `which`: mostly nvme-like, then
/// edu, MSI-X with 1 vector, and (rarely: 2048 eventfds per attach) MSI-X
/// with 2048 vectors.
fn pick_device(which: u8) -> Option<Arc<FakeDevice>> {
    match which % 8 {
        0..=3 => crate::devices::profile("nvme-like").ok(),
        4 | 5 => crate::devices::profile("edu").ok(),
        6 => crate::devices::msix_device(1).ok(),
        _ => crate::devices::msix_device(2048).ok(),
    }
}

/// Register and decode agree: a BAR that decodes (found by `bar_at`) decodes at the address
/// its register holds, and every guest mapping lies in a decoding BAR.
fn assert_register_and_decode_agree(vm: &Vm, dev: &VfioPciDevice) {
    let bars = dev.bars();
    for b in &bars {
        let Some(base) = b.base else { continue };
        let found = dev.bar_at(base, b.space()) == Some((b.index, 0));
        assert_eq!(
            found, b.decoding,
            "{}: bar_at and decoding disagree",
            b.index
        );
        if !found {
            continue;
        }
        let reg = if b.index.is_rom() {
            u64::from(cfg_read32(dev, 0x30) & 0xffff_f800)
        } else {
            let off = 0x10 + 4 * b.index.slot() as u64;
            let lo = cfg_read32(dev, off);
            match b.kind {
                pci_config::BarKind::Io => u64::from(lo & !3),
                pci_config::BarKind::Memory32 { .. } => u64::from(lo & !0xf),
                pci_config::BarKind::Memory64 { .. } => {
                    u64::from(lo & !0xf) | (u64::from(cfg_read32(dev, off + 4)) << 32)
                }
            }
        };
        assert_eq!(
            reg, base,
            "BAR{} decodes at {base:#x}, its register holds {reg:#x}",
            b.index
        );
    }
    for (gpa, len) in vm.mapper.live() {
        assert!(
            bars.iter().any(|b| b.decoding
                && b.base
                    .is_some_and(|x| gpa >= x && gpa.saturating_add(len) <= x + b.guest_size)),
            "guest mapping {gpa:#x}+{len:#x} outside every decoding BAR"
        );
    }
}

/// What must hold of any attached device whatever the guest did.
fn check_and_detach(vm: &Vm, fake: &FakeDevice, dev: VfioPciDevice, ids: u32, class: u32) {
    assert_register_and_decode_agree(vm, &dev);
    // Vendor, device and class codes are read-only (PCI 3.0 6.2.1).
    assert_eq!(cfg_read32(&dev, 0), ids, "vendor/device id changed");
    assert_eq!(cfg_read32(&dev, 8) >> 8, class >> 8, "class code changed");
    // Every placed BAR is naturally aligned (PCI 3.0 6.2.5.1).
    for b in dev.bars() {
        if let Some(base) = b.base {
            assert_eq!(base % b.guest_size.max(1), 0, "BAR{} misaligned", b.index);
        }
    }
    drop(dev);
    assert!(vm.mapper.live().is_empty(), "guest mappings left behind");
    assert_eq!(fake.active_irq(), None, "interrupts left enabled");
    assert_eq!(fake.dma_mapping_count(), 0, "DMA mappings left behind");
}

fn attach(which: u8) -> Option<(Vm, Arc<FakeDevice>, VfioPciDevice)> {
    let fake = pick_device(which)?;
    let vm = Vm::new().ok()?;
    let dev = vm.attach(fake.clone()).ok()?;
    Some((vm, fake, dev))
}

fn access_len(sel: u8, max: usize) -> usize {
    // Mostly valid widths, sometimes anything up to 9 bytes.
    let len = match sel % 8 {
        0 | 1 => 4,
        2 => 2,
        3 => 1,
        4 => 8,
        _ => usize::from(sel >> 3) % 10,
    };
    len.min(max)
}

/// Guest config-space reads and writes on a device over the fake.
pub fn config_space(data: &[u8]) {
    let mut inp = Input::new(data);
    let Some((vm, fake, dev)) = attach(inp.u8()) else {
        return;
    };
    let (ids, class) = (cfg_read32(&dev, 0), cfg_read32(&dev, 8));
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let op = inp.u8();
        let off = u64::from(inp.u16() % 0x1100);
        let len = access_len(inp.u8(), 8);
        let val = inp.u64().to_le_bytes();
        match op % 8 {
            0..=3 => {
                let mut b = [0u8; 9];
                if let Some(buf) = b.get_mut(..len) {
                    dev.read_config(off, buf);
                }
            }
            4..=6 => {
                let _ = dev.write_config(off, val.get(..len).unwrap_or(&[]));
            }
            _ => {
                let _ = dev.reset();
            }
        }
    }
    check_and_detach(&vm, &fake, dev, ids, class);
}

/// MSI-X table and PBA accesses, enable/disable and device interrupts.
pub fn msix(data: &[u8]) {
    let mut inp = Input::new(data);
    let which = inp.u8();
    let Some((vm, fake, dev)) = attach(match which % 4 {
        0 | 1 => 0,
        2 => 6,
        _ => 7,
    }) else {
        return;
    };
    let (ids, class) = (cfg_read32(&dev, 0), cfg_read32(&dev, 8));
    let Some((cap, bar, table)) = msix_table(&dev) else {
        return;
    };
    let pba = msix_pba(&dev).map_or(table, |p| p.1);
    let vectors = u64::from(dev.msix_vectors().max(1));
    let _ = enable_device(&dev);
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let op = inp.u8();
        let arg = inp.u32();
        let len = access_len(inp.u8(), 8);
        let val = inp.u64().to_le_bytes();
        let data = val.get(..len).unwrap_or(&[]);
        match op % 10 {
            0 | 1 => {
                // Anywhere in the table, aligned or not.
                let off = table + u64::from(arg) % (vectors * MSIX_ENTRY + 16);
                let _ = dev.write_bar(bar_index(bar), off, data);
            }
            2 => {
                let off = table + u64::from(arg) % (vectors * MSIX_ENTRY + 16);
                let mut b = [0u8; 9];
                if let Some(buf) = b.get_mut(..len) {
                    dev.read_bar(bar_index(bar), off, buf);
                }
            }
            3 => {
                let off = pba + u64::from(arg) % 0x110;
                let mut b = [0u8; 9];
                if let Some(buf) = b.get_mut(..len) {
                    dev.read_bar(bar_index(bar), off, buf);
                }
            }
            4 => {
                let _ = dev.write_bar(bar_index(bar), pba + u64::from(arg) % 0x110, data);
            }
            5 => {
                // Message control: enable, function mask, anything.
                let _ = dev.write_config(cap + 2, &(arg as u16).to_le_bytes());
            }
            6 => {
                let _ = msix_enable(&dev, cap, arg & 1 == 1);
            }
            7 => {
                let v = u64::from(arg) % vectors;
                let _ = mask_msix_vector(&dev, bar, table, v, arg & 0x8000_0000 != 0);
            }
            8 => fake.raise_irq(arg % 4096),
            _ => {
                // The read-only dwords of the capability (table and PBA offsets).
                let _ = dev.write_config(cap + 4 + u64::from(arg % 8), data);
            }
        }
        // Whatever the guest did: VFIO's MSI-X wiring follows the enable bit.
        let enabled = cfg_read16(&dev, cap + 2) & 0x8000 != 0;
        if enabled && dev.irq_mode() != vfio_pci::IrqMode::Msix {
            // Only a refused SET_IRQS may leave MSI-X unwired.
            assert_eq!(dev.irq_mode(), vfio_pci::IrqMode::None);
        }
    }
    check_and_detach(&vm, &fake, dev, ids, class);
}

/// Trapped BAR (and ROM) accesses, with BAR moves and decode toggles.
pub fn bar_access(data: &[u8]) {
    let mut inp = Input::new(data);
    let Some((vm, fake, dev)) = attach(inp.u8()) else {
        return;
    };
    let (ids, class) = (cfg_read32(&dev, 0), cfg_read32(&dev, 8));
    let _ = enable_device(&dev);
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let op = inp.u8();
        let index = usize::from(inp.u8() % 8);
        let off = u64::from(inp.u32() % 0x3_0000);
        let len = access_len(inp.u8(), 8);
        let val = inp.u64().to_le_bytes();
        match op % 8 {
            0..=2 => {
                let mut b = [0u8; 9];
                if let Some(buf) = b.get_mut(..len) {
                    dev.read_bar(bar_index(index), off, buf);
                }
            }
            3..=5 => {
                let _ = dev.write_bar(bar_index(index), off, val.get(..len).unwrap_or(&[]));
            }
            6 => {
                // The guest reprograms a BAR register (or the ROM BAR).
                let reg = if index >= 6 {
                    0x30
                } else {
                    0x10 + 4 * index as u64
                };
                let _ = cfg_write32(
                    &dev,
                    reg,
                    u32::from_le_bytes([val[0], val[1], val[2], val[3]]),
                );
            }
            _ => {
                let _ = cfg_write16(&dev, 4, u16::from_le_bytes([val[0], val[1]]));
            }
        }
        assert_register_and_decode_agree(&vm, &dev);
    }
    check_and_detach(&vm, &fake, dev, ids, class);
}

/// Config-space templates and capability chains from arbitrary bytes: the
/// parsers, the fake's template derivation, and attaching the result.
pub fn templates(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let mut sizes = [None; 6];
    for s in &mut sizes {
        let v = inp.u8();
        if v != 0 {
            *s = Some(1u64 << (v % 24).max(4));
        }
    }
    let rest = inp.bytes(usize::MAX);
    // The same bytes as `lspci` dump text: every size a dump names (`[size=2G]` on an
    // Expansion ROM line) is checked against the fake's limits before anything is allocated.
    if let Ok(t) = DeviceTemplate::from_lspci(&String::from_utf8_lossy(rest), Some(&sizes)) {
        let _ = FakeDevice::new(t);
    }
    let len = match sel % 3 {
        0 => 64,
        1 => 256,
        _ => 4096,
    };
    let mut config = rest.to_vec();
    config.resize(len, 0);
    // Status: the capability list bit, most of the time.
    if sel & 0x80 == 0 {
        if let Some(b) = config.get_mut(6) {
            *b |= 0x10;
        }
    }

    let _ = pci_config::parse_capabilities(&config);
    let (caps, _) = pci_config::parse_capabilities_lenient(&config);
    assert!(caps.len() <= 64, "more standard capabilities than dwords");
    let _ = pci_config::parse_extended_capabilities(&config);
    let (ext, _) = pci_config::parse_extended_capabilities_lenient(&config);
    assert!(ext.len() <= 960, "more extended capabilities than dwords");
    let _ = pci_config::ConfigSpace::from_bytes(&config);
    if let Ok(t) = DeviceTemplate::from_config(config, &sizes) {
        let Ok(fake) = FakeDevice::new(t) else {
            return;
        };
        let fake = Arc::new(fake);
        let Ok(vm) = Vm::new() else {
            return;
        };
        if let Ok(dev) = vm.attach(fake.clone()) {
            let caps = walk_caps(&dev);
            let ext = walk_ext_caps(&dev);
            assert!(
                caps.len() < 48 && ext.len() < 480,
                "guest chain does not end"
            );
            for i in 0..6 {
                let _ = size_bar(&dev, i);
            }
            let _ = enable_device(&dev);
            let _ = enable_msix_all(&dev);
            drop(dev);
            assert!(vm.mapper.live().is_empty(), "guest mappings left behind");
        }
    }
}

/// The pure decoders facing the kernel and a vfio-user peer.
pub fn backend_parsers(data: &[u8]) {
    use vfio_backend::kernel::ioctls;
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let first = inp.u32();
    let rest = inp.bytes(usize::MAX);
    match sel % 8 {
        0 => drop(ioctls::parse_region_info(rest)),
        1 => drop(ioctls::parse_cap_chain(rest, first % 0x1_0000, 8)),
        2 => drop(ioctls::parse_iommu_type1_info(rest)),
        3 => drop(ioctls::parse_hot_reset_info(rest)),
        4 => drop(Header::decode(rest)),
        5 => drop(protocol::decode_region_info(rest)),
        6 => drop(protocol::decode_version(rest)),
        _ => {
            drop(protocol::DmaMapPayload::decode(rest));
            drop(protocol::SetIrqsPayload::decode(rest));
            drop(protocol::RegionAccessPayload::decode(rest));
            drop(protocol::DeviceInfoPayload::decode(rest));
            drop(protocol::IrqInfoPayload::decode(rest));
            drop(protocol::DmaUnmapPayload::decode(rest));
            drop(protocol::DmaAccessPayload::decode(rest));
        }
    }
}

/// How long the client waits for a reply in [`user_client`].
pub const CLIENT_TIMEOUT: Duration = Duration::from_millis(100);

/// A malicious vfio-user server. For each message it receives (the client's
/// replies to the server's own commands are skipped) it takes chunks of the
/// input until one answers the message. A chunk is `[mode, len_lo, len_hi,
/// bytes..]`:
/// - `mode & 1 == 1`: the bytes framed as a reply to the message (its id and
///   command; the error flag from bit 1, with errno `mode >> 4`; an fd from
///   bit 2; from bit 3, id and command off by `mode >> 6` and
///   `(mode >> 4) & 3`);
/// - `mode & 3 == 2`: a command of the server's own, sent before the answer
///   (so at any point of a session, before and during the version handshake
///   included), with the bytes as its payload (for `DMA_READ` / `DMA_WRITE`:
///   address, count, data, see [`server_command_chunk`]): `DMA_WRITE` from
///   bit 2, else `DMA_READ`; no reply wanted from bit 3; `mode >> 4 == 1`
///   attaches an fd, `mode >> 4 >= 2` sends command number `mode >> 4`
///   instead;
/// - `mode & 3 == 0`: the bytes are sent as they are, and the connection is
///   closed after them.
///
/// When the input runs out the connection is closed.
fn malicious_server(stream: UnixStream, data: Vec<u8>) {
    let mut inp = Input::new(&data);
    let memfd = crate::user::memfd(c"fuzz-region", 0x1000).ok();
    let mut next_id = 0x8000u16;
    'messages: loop {
        let m = loop {
            match protocol::read_message(stream.as_fd(), 1 << 22, 64) {
                // The client's answer to one of our commands.
                Ok(Some(m)) if m.header.is_reply() => continue,
                Ok(Some(m)) => break m,
                _ => break 'messages,
            }
        };
        loop {
            if inp.is_empty() {
                break 'messages;
            }
            let mode = inp.u8();
            let n = usize::from(inp.u16() % 0x2000);
            let bytes = inp.bytes(n);
            if mode & 3 == 2 {
                let kind = mode >> 4;
                let command = match kind {
                    0 | 1 if mode & 4 != 0 => protocol::command::DMA_WRITE,
                    0 | 1 => protocol::command::DMA_READ,
                    k => u16::from(k),
                };
                let mut flags = header_flags::TYPE_COMMAND;
                if mode & 8 != 0 {
                    flags |= header_flags::NO_REPLY;
                }
                let h = Header {
                    id: next_id,
                    command,
                    size: (HEADER_SIZE + bytes.len()) as u32,
                    flags,
                    error: 0,
                };
                next_id = next_id.wrapping_add(1);
                let fds: Vec<_> = match (&memfd, kind == 1) {
                    (Some(f), true) => vec![f.as_fd()],
                    _ => Vec::new(),
                };
                if protocol::write_message(stream.as_fd(), &h, &[bytes], &fds).is_err() {
                    break 'messages;
                }
                continue;
            }
            if mode & 1 == 0 {
                let _ = (&stream).write_all(bytes);
                break 'messages;
            }
            let mut h = Header {
                id: m.header.id,
                command: m.header.command,
                size: 0,
                flags: header_flags::TYPE_REPLY,
                error: 0,
            };
            if mode & 2 != 0 {
                h.flags |= header_flags::ERROR;
                h.error = u32::from(mode >> 4);
            }
            if mode & 8 != 0 {
                // Sometimes lie about the id or command.
                h.id = h.id.wrapping_add(u16::from(mode >> 6));
                h.command = h.command.wrapping_add(u16::from((mode >> 4) & 3));
            }
            h.size = (HEADER_SIZE + bytes.len()) as u32;
            let fds: Vec<_> = match (&memfd, mode & 4 != 0) {
                (Some(f), true) => vec![f.as_fd()],
                _ => Vec::new(),
            };
            if protocol::write_message(stream.as_fd(), &h, &[bytes], &fds).is_err() {
                break 'messages;
            }
            continue 'messages;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A chunk of [`malicious_server`]'s input: its own `DMA_READ` (or, with
/// `write`, `DMA_WRITE` carrying `data`) of `count` bytes at `address`.
fn server_command_chunk(
    write: bool,
    no_reply: bool,
    address: u64,
    count: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut mode = 2u8;
    if write {
        mode |= 4;
    }
    if no_reply {
        mode |= 8;
    }
    let mut payload = address.to_le_bytes().to_vec();
    payload.extend_from_slice(&count.to_le_bytes());
    payload.extend_from_slice(data);
    raw_chunk(mode, &payload)
}

/// One chunk of [`malicious_server`]'s input.
fn raw_chunk(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Where [`exercise_client`] maps host memory the server may reach with
/// `DMA_READ` / `DMA_WRITE` messages: writable, then read-only.
const HOST_DMA_IOVA: u64 = 0x20_0000;
const HOST_DMA_RO_IOVA: u64 = 0x30_0000;
const HOST_DMA_SIZE: u64 = 0x1000;

/// The vfio-user client facing a malicious server: every call returns (an
/// error is fine) within its timeout, and nothing panics.
pub fn user_client(data: &[u8]) {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let data = data.to_vec();
    let Ok(server) = std::thread::Builder::new()
        .name("fuzz-malicious-server".into())
        .spawn(move || malicious_server(theirs, data))
    else {
        return;
    };
    let options = UserOptions::default()
        .with_timeout(CLIENT_TIMEOUT)
        .with_reset_timeout(CLIENT_TIMEOUT);
    let bounded = |what: &str, t: Instant| {
        // A generous bound: the timeout plus scheduling on a loaded machine.
        assert!(
            t.elapsed() < CLIENT_TIMEOUT * 20,
            "{what} took {:?}",
            t.elapsed()
        );
    };
    let t = Instant::now();
    let client = UserDevice::from_stream(ours, options);
    bounded("connect", t);
    if let Ok(dev) = client {
        exercise_client(Arc::new(dev), &bounded);
    }
    let _ = server.join();
}

fn exercise_client(dev: Arc<UserDevice>, bounded: &dyn Fn(&str, Instant)) {
    let irqs = crate::vmm::EventGroup::new(1, false).ok();
    let memfd = crate::user::memfd(c"fuzz-dma", 0x2000).ok();
    // First as a PCI device: what the server says is config space and BARs.
    let t = Instant::now();
    if let Ok(vm) = Vm::new() {
        if let Ok(pci) = vm.attach(dev.clone()) {
            let _ = walk_caps(&pci);
            let _ = walk_ext_caps(&pci);
            let _ = size_bar(&pci, 0);
            let _ = enable_msix_all(&pci);
            // Touch what is mapped into the guest, as the guest would: a
            // mapping past the end of the server's file would raise SIGBUS.
            for b in pci.bars() {
                let base = b.base.unwrap_or(0);
                for (gpa, _) in b.mapped {
                    let mut d = [0u8; 4];
                    pci.read_bar(b.index, gpa.wrapping_sub(base), &mut d);
                }
            }
            drop(pci);
            assert!(vm.mapper.live().is_empty(), "guest mappings left behind");
        }
    }
    bounded("attach", t);
    let t = Instant::now();
    let _ = dev.device_info();
    for i in 0..10 {
        if let Ok(info) = dev.region_info(i) {
            for a in info.mmap_areas().into_iter().take(2) {
                // Map only what is page sized and small; never touch it (a
                // server may share a file smaller than the region).
                if a.size <= 0x10_0000 {
                    let _ = dev.mmap_region(
                        i,
                        SparseArea {
                            offset: a.offset,
                            size: a.size,
                        },
                    );
                }
            }
        }
        let mut b = [0u8; 8];
        let _ = dev.region_read(i, 0, &mut b);
        let _ = dev.region_write(i, 4, &b[..4]);
        let _ = dev.irq_info(i % 5);
    }
    bounded("region and irq calls", t);
    let t = Instant::now();
    if let Some(e) = irqs.as_ref().and_then(|g| g.notifier(0)) {
        let _ = dev.set_irq_eventfds(2, 0, &[Some(e)]);
        let _ = dev.set_irq_unmask_eventfd(0, Some(e));
    }
    let _ = dev.disable_irqs(2);
    let _ = dev.unmask_irq(0);
    let _ = dev.mask_irq(0);
    let domain = dev.iommu_domain();
    if let Some(f) = &memfd {
        // SAFETY: no host address: the memfd is ours, made for the server
        // to read and write.
        let _ = unsafe {
            domain.map(
                0x10_0000,
                0x2000,
                DmaSource {
                    host_addr: 0,
                    file: Some(DmaFile {
                        fd: f.as_fd(),
                        offset: 0,
                    }),
                    read_only: false,
                },
            )
        };
        let _ = domain.unmap(0x10_0000, 0x2000);
    }
    let _ = domain.iova_ranges();
    // Migration and device DMA logging: every size the server names in its
    // replies is checked (state values, read lengths, bitmap sizes).
    let _ = dev.migration_flags();
    let _ = dev.mig_state();
    let _ = dev.mig_data_size();
    if let Ok(Some(mut s)) = dev.set_mig_state(vfio_backend::MigState::StopCopy) {
        let mut b = [0u8; 4096];
        for _ in 0..4 {
            if !matches!(s.read(&mut b), Ok(n) if n > 0) {
                break;
            }
        }
    }
    if let Ok(Some(mut s)) = dev.set_mig_state(vfio_backend::MigState::Resuming) {
        let _ = s.write(&[0u8; 64]);
    }
    let _ = dev.dma_logging_start(
        4096,
        &[vfio_backend::DirtyRange {
            iova: 0,
            length: 1 << 20,
        }],
    );
    let mut bm = [0u64; 4];
    let _ = dev.dma_logging_report(0, 1 << 20, 4096, &mut bm);
    let _ = dev.dma_logging_stop();
    let _ = dev.reset();
    bounded("irq, dma, migration and reset calls", t);
    // Host memory the server may reach with DMA_READ / DMA_WRITE while a
    // request waits: each one checked against the mapping and our limits.
    let t = Instant::now();
    let mut host = vec![0u8; 2 * HOST_DMA_SIZE as usize];
    let (rw, ro) = host.split_at_mut(HOST_DMA_SIZE as usize);
    for (iova, mem, read_only) in [(HOST_DMA_IOVA, rw, false), (HOST_DMA_RO_IOVA, ro, true)] {
        // SAFETY: the client reaches `mem` only through its mapping table,
        // and `unmap` below removes the range from it whatever the server
        // answers, before `host` drops; nothing reads `host` meanwhile.
        let _ = unsafe {
            domain.map(
                iova,
                HOST_DMA_SIZE,
                DmaSource {
                    host_addr: mem.as_mut_ptr() as u64,
                    file: None,
                    read_only,
                },
            )
        };
    }
    let mut b = [0u8; 4];
    let _ = dev.region_read(0, 0, &mut b);
    // The client forgets a range before it asks the server to unmap it,
    // whatever the answer: after these the memory may go.
    let _ = domain.unmap(HOST_DMA_IOVA, HOST_DMA_SIZE);
    let _ = domain.unmap(HOST_DMA_RO_IOVA, HOST_DMA_SIZE);
    drop(host);
    bounded("host-memory dma calls", t);
}

/// How long the server in [`user_server`] may take to end once its client
/// hung up (it has nothing to wait for: a longer wait is a wedge).
pub const SERVER_END_BOUND: Duration = Duration::from_secs(5);

/// Operations of [`user_server`] (the first byte of each).
const SRV_MESSAGE: u8 = 0;
const SRV_RAW: u8 = 1;
const SRV_LYING_HEADER: u8 = 2;
const SRV_RAISE: u8 = 3;
const SRV_FILL: u8 = 4;
const SRV_OPS: u8 = 5;

/// The file descriptors a hostile client of [`user_server`] sends from:
/// two blocking eventfds, both ends of a pipe whose buffer is full, a
/// memfd of 64 KiB and a socket.
struct FdPool {
    fds: Vec<std::os::fd::OwnedFd>,
}

impl FdPool {
    fn new() -> FdPool {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = Vec::new();
        for _ in 0..2 {
            // SAFETY: eventfd takes no pointers; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if fd >= 0 {
                // SAFETY: a fresh descriptor we own, taken over once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == 0 {
            // SAFETY: fresh descriptors we own, each taken over once.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
            let chunk = [0u8; 4096];
            // SAFETY: writes from a live buffer of the length given.
            while unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
            // Blocking again: a write to it would wait forever.
            // SAFETY: F_SETFL on a descriptor we own.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
            fds.push(w);
            fds.push(r);
        }
        if let Ok(f) = crate::user::memfd(c"fuzz-server-dma", 0x1_0000) {
            fds.push(f.into());
        }
        if let Ok((a, _)) = UnixStream::pair() {
            fds.push(a.into());
        }
        FdPool { fds }
    }

    fn get(&self, sel: u8) -> Option<std::os::fd::BorrowedFd<'_>> {
        let n = self.fds.len();
        (n > 0).then(|| self.fds.get(usize::from(sel) % n).map(AsFd::as_fd))?
    }
}

/// The id of [`user_server`]'s barrier messages.
const BARRIER_ID: u16 = 0xfffe;

/// The longest [`user_server`] waits for a barrier's reply (none comes when
/// the barrier ended up inside a message the input left unfinished).
const BARRIER_WAIT: Duration = Duration::from_millis(100);

/// Sends a request whose reply tells that the server handled everything
/// sent before it, and waits for that reply (bounded). Returns false when
/// no reply came: the stream is inside a message the input left unfinished,
/// and later barriers of the input are skipped (each would wait in vain).
fn barrier(ours: &UnixStream, replies: &std::sync::mpsc::Receiver<()>) -> bool {
    while replies.try_recv().is_ok() {}
    let info = [16u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let Ok(h) = Header::command(BARRIER_ID, protocol::command::DEVICE_GET_INFO, info.len()) else {
        return false;
    };
    protocol::write_message(ours.as_fd(), &h, &[&info], &[]).is_ok()
        && replies.recv_timeout(BARRIER_WAIT).is_ok()
}

/// Drives one hostile client of [`user_server`] over `ours`.
fn hostile_client(
    ours: &UnixStream,
    fake: &FakeDevice,
    inp: &mut Input<'_>,
    version_first: bool,
    replies: &std::sync::mpsc::Receiver<()>,
) {
    let pool = FdPool::new();
    let mut id = 0u16;
    // Whether the server still answers barriers.
    let mut in_step = true;
    if version_first {
        let v = protocol::encode_version(0, 1, &vfio_backend::user::Capabilities::default());
        if let Ok(h) = Header::command(id, protocol::command::VERSION, v.len()) {
            if protocol::write_message(ours.as_fd(), &h, &[&v], &[]).is_err() {
                return;
            }
        }
    }
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let sent = match inp.u8() % SRV_OPS {
            SRV_MESSAGE => {
                let command = u16::from(inp.u8() % 24);
                id = id.wrapping_add(1);
                let flags = match inp.u8() {
                    0..=0xef => 0,
                    f => u32::from(f & 0xf),
                };
                let len = usize::from(inp.u16() % 0x1000);
                let payload = inp.bytes(len);
                let fd_sel = inp.u8();
                let fds: Vec<_> = (0..fd_sel % 4)
                    .filter_map(|k| pool.get(fd_sel.wrapping_shr(2).wrapping_add(k)))
                    .collect();
                match Header::command(id, command, payload.len()) {
                    Ok(mut h) => {
                        h.flags |= flags;
                        protocol::write_message(ours.as_fd(), &h, &[payload], &fds).is_ok()
                    }
                    Err(_) => true,
                }
            }
            SRV_RAW => {
                let n = usize::from(inp.u8());
                let mut w = ours;
                w.write_all(inp.bytes(n)).is_ok()
            }
            SRV_LYING_HEADER => {
                let h = Header {
                    id: inp.u16(),
                    command: inp.u16(),
                    size: inp.u32(),
                    flags: inp.u32(),
                    error: inp.u32(),
                };
                let n = usize::from(inp.u8());
                let mut w = ours;
                w.write_all(&h.encode()).is_ok() && w.write_all(inp.bytes(n)).is_ok()
            }
            SRV_RAISE => {
                // The device's side: whatever fds the client installed, this
                // must not wait (it holds the device lock while it signals).
                // After what was sent before has been handled.
                if in_step {
                    in_step = barrier(ours, replies);
                }
                let t = Instant::now();
                fake.raise_irq(u32::from(inp.u8()));
                assert!(
                    t.elapsed() < SERVER_END_BOUND,
                    "raising an interrupt took {:?}",
                    t.elapsed()
                );
                true
            }
            _ => {
                // SRV_FILL: the client raises one of its eventfds' counter to
                // the maximum, so that a blocking write to it would wait.
                if let Some(fd) = pool.get(inp.u8() % 2) {
                    let max: u64 = 0xffff_ffff_ffff_fffe;
                    // SAFETY: F_GETFL/F_SETFL and an 8-byte write from a live
                    // u64 on a descriptor we own.
                    unsafe {
                        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                        libc::write(fd.as_raw_fd(), std::ptr::from_ref(&max).cast(), 8);
                    }
                }
                true
            }
        };
        if !sent {
            // The server closed the connection (it may, on a protocol error).
            break;
        }
    }
}

/// Our vfio-user server (serving the fake device) facing a hostile client:
/// any bytes, headers that lie about their size, any command with any
/// payload, eventfds, pipes (full ones), files and sockets as fds, counters
/// filled up, interrupts raised by the device meanwhile. Nothing panics,
/// raising an interrupt never waits, and the server ends promptly once the
/// client hangs up. The input: a byte picking the device (bit 7 set: no
/// VERSION is sent first), then operations (see `SRV_*`).
pub fn user_server(data: &[u8]) {
    let mut inp = Input::new(data);
    let first = inp.u8();
    let Some(fake) = pick_device(first & 0x7f) else {
        return;
    };
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let Ok(reader) = ours.try_clone() else {
        return;
    };
    let options = vfio_backend::user::ServerOptions::default()
        .with_max_data_xfer_size(1 << 16)
        .with_stall_timeout(SERVER_END_BOUND);
    let (done, ended) = std::sync::mpsc::channel();
    let device: Arc<dyn Vfio> = fake.clone();
    let Ok(server) = std::thread::Builder::new()
        .name("fuzz-server".into())
        .spawn(move || {
            let _ = vfio_backend::user::serve_connection_with_options(theirs, device, options);
            let _ = done.send(());
        })
    else {
        return;
    };
    // Replies are read (and dropped, fds included) as they come; barrier
    // replies are reported.
    let (barrier_done, replies) = std::sync::mpsc::channel();
    let Ok(drain) = std::thread::Builder::new()
        .name("fuzz-drain".into())
        .spawn(move || {
            while let Ok(Some(m)) = protocol::read_message(reader.as_fd(), 1 << 22, 64) {
                if m.header.id == BARRIER_ID {
                    let _ = barrier_done.send(());
                }
            }
        })
    else {
        let _ = ours.shutdown(std::net::Shutdown::Both);
        let _ = server.join();
        return;
    };
    hostile_client(&ours, &fake, &mut inp, first & 0x80 == 0, &replies);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let t = Instant::now();
    let ended = ended.recv_timeout(SERVER_END_BOUND);
    assert!(
        ended.is_ok(),
        "the server did not end {:?} after its client hung up",
        t.elapsed()
    );
    assert!(server.join().is_ok(), "the server thread panicked");
    let _ = ours.shutdown(std::net::Shutdown::Both);
    let _ = drain.join();
    // The client's interrupt fds are gone with it.
    assert_eq!(
        fake.active_irq(),
        None,
        "interrupts left enabled by a gone client"
    );
}

/// Encodes one [`user_server`] message operation: `command`, `payload`,
/// and `fds` picked from its pool (0, 1: eventfds; 2: a full pipe's write
/// end; 3: its read end; 4: a memfd; 5: a socket).
fn srv_msg(out: &mut Vec<u8>, command: u16, payload: &[u8], fds: &[u8]) {
    out.push(SRV_MESSAGE);
    out.push(command as u8);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
    // Consecutive pool entries from the first one named.
    let first = fds.first().copied().unwrap_or(0);
    out.push((fds.len() as u8 & 3) | (first << 2));
}

/// Seeds of [`user_server`]: sessions as a VMM opens them, and the attacks
/// the server was found to give in to.
fn user_server_seeds(out: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    use protocol::{command, irq_set, RegionAccessPayload, SetIrqsPayload};
    let set_irqs = |flags: u32, index: u32, start: u32, count: u32| {
        SetIrqsPayload {
            argsz: SetIrqsPayload::SIZE as u32,
            flags,
            index,
            start,
            count,
        }
        .encode()
        .to_vec()
    };
    let access = |region: u32, offset: u64, data: &[u8], count: u32| {
        let mut p = RegionAccessPayload {
            offset,
            region,
            count,
        }
        .encode()
        .to_vec();
        p.extend_from_slice(data);
        p
    };
    let trigger = irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER;

    // A VMM's probe: info, every region, every interrupt index, config reads.
    let mut s = vec![0u8];
    srv_msg(
        &mut s,
        command::DEVICE_GET_INFO,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    );
    for i in 0..9u32 {
        let mut p = vec![0u8; 32];
        p[0] = 32;
        p[8..12].copy_from_slice(&i.to_le_bytes());
        srv_msg(&mut s, command::DEVICE_GET_REGION_INFO, &p, &[]);
    }
    for i in 0..5u32 {
        let mut p = vec![0u8; 16];
        p[0] = 16;
        p[8..12].copy_from_slice(&i.to_le_bytes());
        srv_msg(&mut s, command::DEVICE_GET_IRQ_INFO, &p, &[]);
    }
    srv_msg(&mut s, command::REGION_READ, &access(7, 0, &[], 64), &[]);
    srv_msg(
        &mut s,
        command::REGION_WRITE,
        &access(7, 4, &[6, 0], 2),
        &[],
    );
    srv_msg(&mut s, command::REGION_READ, &access(0, 0, &[], 8), &[]);
    srv_msg(&mut s, command::DEVICE_RESET, &[], &[]);
    out.push(("user_server", "probe-nvme", s.clone()));
    s[0] = 4;
    out.push(("user_server", "probe-edu", s));

    // MSI-X through a full eventfd, a pipe refused, a doorbell, a raise.
    let mut s = vec![0u8];
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(trigger, 2, 0, 2),
        &[0, 1],
    );
    s.extend_from_slice(&[SRV_FILL, 0, SRV_FILL, 1]);
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(trigger, 2, 2, 1),
        &[2],
    );
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(trigger, 2, 3, 1),
        &[3],
    );
    srv_msg(
        &mut s,
        command::REGION_WRITE,
        &access(7, 4, &[6, 0], 2),
        &[],
    );
    srv_msg(
        &mut s,
        command::REGION_WRITE,
        &access(0, 0x1000, &[1, 0, 0, 0], 4),
        &[],
    );
    s.extend_from_slice(&[SRV_RAISE, 0, SRV_RAISE, 1, SRV_RAISE, 2]);
    out.push(("user_server", "msix-full-eventfd-and-pipe", s));

    // INTx with an unmask eventfd, then a pipe as the unmask fd.
    let mut s = vec![0u8];
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(trigger, 0, 0, 1),
        &[0],
    );
    let unmask = irq_set::DATA_EVENTFD | irq_set::ACTION_UNMASK;
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(unmask, 0, 0, 1),
        &[1],
    );
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(unmask, 0, 0, 1),
        &[2],
    );
    s.extend_from_slice(&[SRV_RAISE, 0, SRV_FILL, 0, SRV_RAISE, 0]);
    srv_msg(
        &mut s,
        command::DEVICE_SET_IRQS,
        &set_irqs(irq_set::DATA_NONE | irq_set::ACTION_UNMASK, 0, 0, 1),
        &[],
    );
    out.push(("user_server", "intx-unmask-fds", s));

    // DMA: map the memfd, unmap it; and a map with a socket as its fd.
    let mut s = vec![4u8];
    let map = protocol::DmaMapPayload {
        argsz: 32,
        flags: 3,
        offset: 0,
        address: 0x10_0000,
        size: 0x1_0000,
    }
    .encode();
    srv_msg(&mut s, command::DMA_MAP, &map, &[4]);
    srv_msg(&mut s, command::DMA_MAP, &map, &[5]);
    let unmap = protocol::DmaUnmapPayload {
        argsz: 24,
        flags: 0,
        address: 0x10_0000,
        size: 0x1_0000,
    }
    .encode();
    srv_msg(&mut s, command::DMA_UNMAP, &unmap, &[]);
    out.push(("user_server", "dma-map-unmap", s));

    // Half a header; a header announcing more than the limit; no VERSION.
    out.push((
        "user_server",
        "half-header",
        vec![0u8, SRV_RAW, 7, 1, 0, 3, 0, 0, 0, 0],
    ));
    let mut s = vec![0u8, SRV_LYING_HEADER];
    s.extend_from_slice(&[1, 0, 9, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.push(("user_server", "lying-header", s));
    let mut s = vec![0x80u8];
    srv_msg(&mut s, command::REGION_READ, &access(7, 0, &[], 4), &[]);
    out.push(("user_server", "no-version", s));
}

/// The body of a fuzz target.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name, with their bodies.
pub const TARGETS: [(&str, Target); 8] = [
    ("config_space", config_space),
    ("msix", msix),
    ("bar_access", bar_access),
    ("user_client", user_client),
    ("user_server", user_server),
    ("templates", templates),
    ("backend_parsers", backend_parsers),
    ("migration_stream", migration_stream),
];

/// Sets the CRC of every whole chunk of a migration stream (after its
/// 16-byte prefix) to the right one, so that the fuzzer's changes reach the
/// payload decoders; a chunk cut short is left as it is.
fn repair_chunk_crcs(stream: &mut [u8]) {
    let mut at = 16usize;
    for _ in 0..4096 {
        let Some(len) = stream
            .get(at + 8..at + 12)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
        else {
            return;
        };
        let end = at.saturating_add(12).saturating_add(len);
        let Some(crc) = stream.get(at..end).map(vfio_pci::migration::crc32) else {
            return;
        };
        let Some(slot) = stream.get_mut(end..end + 4) else {
            return;
        };
        slot.copy_from_slice(&crc.to_le_bytes());
        at = end + 4;
    }
}

/// `migration_stream`: a migration stream as a destination reads it. The
/// first byte picks: bit 0 repairs every chunk's CRC (reaching the identity,
/// emulated-state and end decoders); bit 1 also loads the stream into a
/// migratable nvme-like fake through `VfioPciDevice::resume_migration`.
/// Invariants: no panic; a stream `check_stream` refuses is refused by the
/// destination too; whatever the stream, the destination device ends
/// RUNNING.
pub fn migration_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut stream = rest.to_vec();
    if mode & 1 != 0 {
        repair_chunk_crcs(&mut stream);
    }
    let checked = vfio_pci::migration::check_stream(&stream[..], 1 << 20);
    if let Ok(s) = &checked {
        assert!(s.stream_bytes <= stream.len() as u64);
    }
    if mode & 2 == 0 {
        return;
    }
    let Some((_vm, fake, dev)) = attach(0) else {
        return;
    };
    let r = dev.resume_migration(&stream[..]);
    assert!(
        checked.is_ok() || r.is_err(),
        "the destination took a stream check_stream refuses"
    );
    assert_eq!(
        fake.mig_state().ok(),
        Some(vfio_backend::MigState::Running),
        "the destination device is left RUNNING ({r:?})"
    );
}

/// A whole migration stream of an nvme-like fake, for the seeds.
fn a_migration_stream() -> Option<Vec<u8>> {
    let (_vm, _fake, dev) = attach(0)?;
    let mut out = Vec::new();
    let mut m = dev.start_migration().ok()?;
    m.stop_and_copy(&mut out).ok()?;
    m.complete().ok()?;
    Some(out)
}

/// Encodes one operation of [`config_space`].
fn cfg_op(out: &mut Vec<u8>, op: u8, off: u16, len_sel: u8, val: u64) {
    out.push(op);
    out.extend_from_slice(&off.to_le_bytes());
    out.push(len_sel);
    out.extend_from_slice(&val.to_le_bytes());
}

/// Encodes one operation of [`msix`].
fn msix_op(out: &mut Vec<u8>, op: u8, arg: u32, len_sel: u8, val: u64) {
    out.push(op);
    out.extend_from_slice(&arg.to_le_bytes());
    out.push(len_sel);
    out.extend_from_slice(&val.to_le_bytes());
}

/// Encodes one operation of [`bar_access`].
fn bar_op(out: &mut Vec<u8>, op: u8, index: u8, off: u32, len_sel: u8, val: u64) {
    out.push(op);
    out.push(index);
    out.extend_from_slice(&off.to_le_bytes());
    out.push(len_sel);
    out.extend_from_slice(&val.to_le_bytes());
}

/// A session of a real server (the fake behind [`vfio_backend::user::serve_connection`])
/// answering exactly what [`user_client`] asks, recorded in the malicious
/// server's chunk format, one chunk per request with the request's command:
/// a seed that reaches deep into the client.
fn recorded_user_session(fake: Arc<FakeDevice>) -> Vec<(u16, Vec<u8>)> {
    let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
    let Ok((ours, proxy_client)) = UnixStream::pair() else {
        return Vec::new();
    };
    let Ok((proxy_server, theirs)) = UnixStream::pair() else {
        return Vec::new();
    };
    let server = std::thread::spawn(move || {
        let _ = vfio_backend::user::serve_connection(theirs, fake);
    });
    let rec = recorded.clone();
    let proxy = std::thread::spawn(move || loop {
        let Ok(Some(req)) = protocol::read_message(proxy_client.as_fd(), 1 << 22, 64) else {
            break;
        };
        let fds: Vec<_> = req.fds.iter().map(|f| f.as_fd()).collect();
        if protocol::write_message(proxy_server.as_fd(), &req.header, &[&req.payload], &fds)
            .is_err()
        {
            break;
        }
        let Ok(Some(rep)) = protocol::read_message(proxy_server.as_fd(), 1 << 22, 64) else {
            break;
        };
        let mut mode = 1u8;
        if rep.header.is_error() {
            mode |= 2 | (u8::try_from(rep.header.error.min(15)).unwrap_or(5) << 4);
        }
        if !rep.fds.is_empty() {
            mode |= 4;
        }
        if let Ok(mut r) = rec.lock() {
            r.push((req.header.command, raw_chunk(mode, &rep.payload)));
        }
        let fds: Vec<_> = rep.fds.iter().map(|f| f.as_fd()).collect();
        if protocol::write_message(proxy_client.as_fd(), &rep.header, &[&rep.payload], &fds)
            .is_err()
        {
            break;
        }
    });
    let options = UserOptions::default().with_timeout(Duration::from_secs(5));
    if let Ok(dev) = UserDevice::from_stream(ours, options) {
        exercise_client(Arc::new(dev), &|_, _| {});
    }
    let _ = proxy.join();
    let _ = server.join();
    let out = recorded.lock().map(|r| r.clone()).unwrap_or_default();
    out
}

/// Seed inputs for each target: (target, seed name, bytes).
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();

    // config_space: a driver's probe of each device.
    for (which, name) in [(0u8, "probe-nvme"), (4, "probe-edu"), (7, "probe-msix2048")] {
        let mut s = vec![which];
        for off in (0..0x40).step_by(4) {
            cfg_op(&mut s, 0, off, 0, 0);
        }
        // Size BAR 0 and restore, enable decoding, walk capabilities.
        cfg_op(&mut s, 4, 0x10, 0, u64::from(u32::MAX));
        cfg_op(&mut s, 0, 0x10, 0, 0);
        cfg_op(&mut s, 4, 0x10, 0, 0xc000_0000);
        cfg_op(&mut s, 4, 0x04, 2, 0x0006);
        cfg_op(&mut s, 0, 0x34, 3, 0);
        cfg_op(&mut s, 0, 0x40, 0, 0);
        cfg_op(&mut s, 0, 0x100, 0, 0);
        out.push(("config_space", name, s));
    }
    let mut s = vec![0u8];
    cfg_op(&mut s, 4, 0x30, 0, 0xffff_f801);
    cfg_op(&mut s, 4, 0x62, 2, 0x8000);
    cfg_op(&mut s, 7, 0, 0, 0);
    out.push(("config_space", "rom-msix-reset", s));

    // msix: program, enable, mask, fire, read the PBA.
    for (which, name) in [(0u8, "enable-fire-nvme"), (3, "enable-fire-2048")] {
        let mut s = vec![which];
        msix_op(&mut s, 0, 0, 0, 0xfee0_0000);
        msix_op(&mut s, 0, 8, 0, 0x41);
        msix_op(&mut s, 0, 12, 0, 0);
        msix_op(&mut s, 6, 1, 0, 0);
        msix_op(&mut s, 8, 0, 0, 0);
        msix_op(&mut s, 7, 0x8000_0000, 0, 0);
        msix_op(&mut s, 8, 0, 0, 0);
        msix_op(&mut s, 3, 0, 4, 0);
        msix_op(&mut s, 7, 0, 0, 0);
        msix_op(&mut s, 5, 0xc000, 0, 0);
        msix_op(&mut s, 6, 0, 0, 0);
        out.push(("msix", name, s));
    }

    // bar_access: registers of each device, a BAR move, the ROM.
    for (which, name) in [(0u8, "nvme-regs"), (4, "edu-regs")] {
        let mut s = vec![which];
        bar_op(&mut s, 0, 0, 0, 0, 0);
        bar_op(&mut s, 0, 0, 8, 0, 0);
        bar_op(&mut s, 3, 0, 0x14, 0, 1);
        bar_op(&mut s, 3, 0, 0x1000, 0, 1);
        bar_op(&mut s, 0, 0, 0x2000, 4, 0);
        bar_op(&mut s, 6, 0, 0, 0, 0xd000_0000);
        bar_op(&mut s, 0, 6, 0, 0, 0);
        bar_op(&mut s, 7, 0, 0, 0, 0);
        out.push(("bar_access", name, s));
    }

    // templates: the configs of the built-in profiles.
    for (name, prof) in [("nvme-like", "nvme-like"), ("edu", "edu")] {
        if let Ok(t) = vfio_fake_device::profile_template(prof) {
            let config = t.config();
            let mut s = vec![if config.len() == 4096 { 2u8 } else { 1 }];
            for i in 0..6u8 {
                let size = t.bar(i).map_or(0, |b| b.size);
                s.push(if size == 0 {
                    0
                } else {
                    size.trailing_zeros() as u8
                });
            }
            s.extend_from_slice(config);
            // Trailing zeros add nothing: the target pads.
            while s.last() == Some(&0) && s.len() > 7 {
                s.pop();
            }
            out.push(("templates", name, s));
        }
    }

    // backend_parsers: a header, a VERSION payload, a region info.
    let mut s = vec![4u8, 0, 0, 0, 0];
    s.extend_from_slice(
        &Header {
            id: 1,
            command: protocol::command::REGION_READ,
            size: 36,
            flags: header_flags::TYPE_REPLY,
            error: 0,
        }
        .encode(),
    );
    out.push(("backend_parsers", "header", s));
    let mut s = vec![6u8, 0, 0, 0, 0];
    s.extend_from_slice(&protocol::encode_version(
        0,
        1,
        &vfio_backend::user::Capabilities::default(),
    ));
    out.push(("backend_parsers", "version", s));
    let mut s = vec![5u8, 0, 0, 0, 0];
    s.extend_from_slice(
        &protocol::RegionInfoPayload {
            argsz: 32,
            flags: 7,
            index: 0,
            cap_offset: 0,
            size: 0x4000,
            offset: 0,
        }
        .encode(),
    );
    out.push(("backend_parsers", "region-info", s));

    // user_client: a real server's answers.
    if let Ok(f) = crate::devices::profile("nvme-like") {
        out.push((
            "user_client",
            "nvme-like-session",
            join(&recorded_user_session(f)),
        ));
    }
    if let Ok(f) = crate::devices::profile("edu") {
        let session = recorded_user_session(f);
        out.push(("user_client", "edu-session", join(&session)));
        out.extend(
            server_command_seeds(&session)
                .into_iter()
                .map(|(name, s)| ("user_client", name, s)),
        );
    }
    user_server_seeds(&mut out);
    if let Some(stream) = a_migration_stream() {
        for (mode, name) in [
            (0u8, "whole"),
            (1, "whole-crc-repaired"),
            (3, "whole-loaded"),
        ] {
            let mut s = vec![mode];
            s.extend_from_slice(&stream);
            out.push(("migration_stream", name, s));
        }
        let mut s = vec![3u8];
        s.extend_from_slice(&stream[..stream.len() / 2]);
        out.push(("migration_stream", "half-loaded", s));
    }
    out
}

/// The chunks of a recorded session, one after the other.
fn join(chunks: &[(u16, Vec<u8>)]) -> Vec<u8> {
    chunks.iter().flat_map(|(_, c)| c.iter().copied()).collect()
}

/// Seeds of [`user_client`] where the server sends its own `DMA_READ` /
/// `DMA_WRITE` into a recorded session: before the version reply, between
/// it and the device info, and while host memory is mapped.
fn server_command_seeds(session: &[(u16, Vec<u8>)]) -> Vec<(&'static str, Vec<u8>)> {
    use protocol::command;
    let huge = [
        server_command_chunk(false, false, 0, 1 << 40, &[]),
        server_command_chunk(false, false, 0, u64::MAX, &[]),
        server_command_chunk(true, false, 0, 1 << 40, &[0xaa; 16]),
        server_command_chunk(false, true, 0, 1 << 40, &[]),
    ]
    .concat();
    // Inserted before the chunk that answers the `nth` request of `cmd`
    // (0 based), or at the end.
    let insert = |cmd: u16, nth: usize, extra: &[u8], patch: &dyn Fn(u16, usize) -> bool| {
        let mut out = Vec::new();
        let mut seen = 0usize;
        let mut done = false;
        for (i, (c, chunk)) in session.iter().enumerate() {
            if *c == cmd && !done {
                if seen == nth {
                    out.extend_from_slice(extra);
                    done = true;
                }
                seen += 1;
            }
            if patch(*c, i) {
                // Answer with success and no payload.
                out.extend_from_slice(&raw_chunk(1, &[]));
            } else {
                out.extend_from_slice(chunk);
            }
        }
        if !done {
            out.extend_from_slice(extra);
        }
        out
    };
    let no_patch = |_: u16, _: usize| false;
    let mut out = vec![
        (
            "dma-before-version-reply",
            insert(command::VERSION, 0, &huge, &no_patch),
        ),
        (
            "dma-before-device-info-reply",
            insert(command::DEVICE_GET_INFO, 0, &huge, &no_patch),
        ),
    ];
    // The host-memory mappings are the last two DMA_MAPs: make the server
    // accept them (the real one wants a file), then DMA into them while the
    // region read after them waits.
    let maps: Vec<usize> = session
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c == command::DMA_MAP)
        .map(|(i, _)| i)
        .collect();
    let host_maps: Vec<usize> = maps.iter().rev().take(2).copied().collect();
    let accept_host_maps = |_: u16, i: usize| host_maps.contains(&i);
    let reads_before = session
        .iter()
        .take(maps.last().copied().unwrap_or(0))
        .filter(|(c, _)| *c == command::REGION_READ)
        .count();
    let rw = HOST_DMA_IOVA;
    let ro = HOST_DMA_RO_IOVA;
    let end = HOST_DMA_IOVA + HOST_DMA_SIZE;
    let max = u64::from(UserOptions::default().max_data_xfer_size);
    let mut fd_command = server_command_chunk(false, false, rw, 4, &[]);
    fd_command[0] |= 0x10;
    let mut reset_command = server_command_chunk(false, false, 0, 0, &[]);
    reset_command[0] |= (protocol::command::DEVICE_RESET as u8) << 4;
    let in_mapping = [
        server_command_chunk(true, false, rw + 8, 4, &[1, 2, 3, 4]),
        server_command_chunk(false, false, rw + 8, 4, &[]),
        server_command_chunk(true, true, rw, 2, &[5, 6]),
        server_command_chunk(false, false, rw, HOST_DMA_SIZE, &[]),
        server_command_chunk(false, false, end - 2, 4, &[]),
        server_command_chunk(false, false, rw, max + 1, &[]),
        server_command_chunk(false, false, rw, 1 << 40, &[]),
        server_command_chunk(true, false, ro, 4, &[7; 4]),
        server_command_chunk(false, false, ro, 4, &[]),
        server_command_chunk(true, false, rw, 8, &[9; 4]),
        fd_command,
        reset_command,
        huge,
    ]
    .concat();
    out.push((
        "dma-into-host-mappings",
        insert(
            command::REGION_READ,
            reads_before,
            &in_mapping,
            &accept_host_maps,
        ),
    ));
    out
}
