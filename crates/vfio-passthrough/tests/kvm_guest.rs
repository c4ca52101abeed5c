//! End to end with a real vCPU: a tiny real-mode guest reads and writes memory that
//! `KvmGuestMapper` mapped and reports through I/O ports (KVM_EXIT_IO), and takes an MSI that a
//! `KvmInterruptGroup` latched while masked. Skips where /dev/kvm cannot be opened or this KVM
//! cannot run a real-mode vCPU.
#![cfg(feature = "kvm")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use std::time::Duration;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pci_interrupts::{InterruptSourceGroup, MsiRoute};
use vfio_passthrough::kvm::{GsiRouting, KvmGuestMapper, KvmInterruptManager};
use vfio_pci::GuestMapper;

const PAGE: usize = 4096;

struct HostPages {
    ptr: *mut u8,
    len: usize,
}

impl HostPages {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE;
        // SAFETY: plain syscalls on a name we own; results are checked.
        unsafe {
            let fd = libc::memfd_create(c"kvm-guest-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as i64), 0);
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            libc::close(fd);
            Self {
                ptr: ptr.cast(),
                len,
            }
        }
    }

    fn page(&self, n: usize) -> *mut u8 {
        assert!(n * PAGE < self.len);
        self.ptr.wrapping_add(n * PAGE)
    }

    fn write(&self, page: usize, bytes: &[u8]) {
        assert!(bytes.len() <= PAGE);
        // SAFETY: in bounds of the page (checked above), which this process mapped writable.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.page(page), bytes.len()) };
    }

    fn read(&self, page: usize) -> u8 {
        // SAFETY: the first byte of a mapped page; volatile because the guest writes it.
        unsafe { std::ptr::read_volatile(self.page(page)) }
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("skipped: cannot open /dev/kvm: {e}");
            None
        }
    }
}

/// A vCPU in real mode at `0000:ip` with flat data segments, or `None` if KVM refuses.
fn real_mode_vcpu(vm: &VmFd, ip: u64) -> Option<VcpuFd> {
    let vcpu = vm.create_vcpu(0).ok()?;
    let mut sregs = vcpu.get_sregs().ok()?;
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).ok()?;
    let regs = kvm_bindings::kvm_regs {
        rip: ip,
        rflags: 2,
        rsp: 0xff0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).ok()?;
    Some(vcpu)
}

#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Out(u16, u8),
    MmioWrite(u64, u8),
}

/// Runs until the guest writes to port `done_port`; returns the exits seen before. `None` if
/// this KVM cannot run the vCPU at all (the first run fails).
fn run_until(vcpu: &mut VcpuFd, done_port: u16) -> Option<Vec<Exit>> {
    let mut exits = Vec::new();
    for n in 0..32 {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if n == 0 => {
                eprintln!("skipped: this KVM cannot run a real-mode vCPU: {e}");
                return None;
            }
            Err(e) => panic!("KVM_RUN: {e}"),
        };
        match exit {
            VcpuExit::IoOut(port, _) if port == done_port => return Some(exits),
            VcpuExit::IoOut(port, data) => exits.push(Exit::Out(port, data[0])),
            VcpuExit::MmioWrite(addr, data) => exits.push(Exit::MmioWrite(addr, data[0])),
            other => panic!("unexpected exit {other:?} after {exits:?}"),
        }
    }
    panic!("guest did not finish: {exits:?}");
}

/// Maps through the trait.
fn map(
    mapper: &KvmGuestMapper,
    gpa: u64,
    size: u64,
    host: *mut u8,
    read_only: bool,
) -> std::io::Result<vfio_pci::MappingId> {
    // SAFETY: every test declares its `HostPages` before the mapper, so the
    // pages stay mapped for as long as any slot of the mapper (which
    // deletes its slots when dropped) may point at them; the test touches
    // them through raw pointers only.
    unsafe { mapper.map(gpa, size, host, read_only) }
}

#[test]
fn a_guest_reads_and_writes_host_memory_through_the_slots_and_read_only_slots_trap_writes() {
    let Some(kvm) = kvm() else { return };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let host = HostPages::new(3);
    #[rustfmt::skip]
    let code = [
        0xa0, 0x00, 0x20, // mov al, [0x2000]
        0xe6, 0x10,       // out 0x10, al
        0xa2, 0x00, 0x30, // mov [0x3000], al   (read-only: exits as an MMIO write)
        0xa0, 0x00, 0x30, // mov al, [0x3000]
        0xe6, 0x10,       // out 0x10, al
        0xa2, 0x00, 0x20, // mov [0x2000], al
        0xe6, 0x11,       // out 0x11, al       (done)
    ];
    host.write(0, &code);
    host.write(1, &[0x5a]);
    host.write(2, &[0xa5]);

    let mapper = KvmGuestMapper::new(vm.clone(), 1..4).unwrap();
    map(&mapper, 0x1000, PAGE as u64, host.page(0), false).unwrap();
    map(&mapper, 0x2000, PAGE as u64, host.page(1), false).unwrap();
    let read_only = mapper.readonly_supported();
    map(&mapper, 0x3000, PAGE as u64, host.page(2), read_only).unwrap();

    let Some(mut vcpu) = real_mode_vcpu(&vm, 0x1000) else {
        eprintln!("skipped: cannot set up a real-mode vCPU");
        return;
    };
    let Some(exits) = run_until(&mut vcpu, 0x11) else {
        return;
    };
    if read_only {
        assert_eq!(
            exits,
            vec![
                Exit::Out(0x10, 0x5a),
                Exit::MmioWrite(0x3000, 0x5a),
                Exit::Out(0x10, 0xa5)
            ]
        );
        assert_eq!(host.read(2), 0xa5, "the read-only page kept its byte");
    } else {
        assert_eq!(exits, vec![Exit::Out(0x10, 0x5a), Exit::Out(0x10, 0x5a)]);
    }
    assert_eq!(
        host.read(1),
        if read_only { 0xa5 } else { 0x5a },
        "guest store reached host memory"
    );
}

/// Whether an eventfd has a count pending (readable), without consuming it.
fn is_signalled(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    pfd.revents & libc::POLLIN != 0
}

#[test]
fn an_msi_signalled_while_masked_reaches_the_guest_once_unmasked() {
    let Some(kvm) = kvm() else { return };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let host = HostPages::new(2);
    // Real-mode interrupt vector table: vector 0x40 -> 0000:1100.
    host.write(0, &[0; 0x100]);
    // SAFETY: offset 0x100 of a mapped page, 4 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            [0x00u8, 0x11, 0x00, 0x00].as_ptr(),
            host.page(0).add(0x100),
            4,
        )
    };
    #[rustfmt::skip]
    let code = [
        0xfb,       // sti
        0xf4,       // hlt          (the interrupt wakes the vCPU)
        0xe6, 0x13, // out 0x13, al (only reached if woken without the interrupt)
    ];
    host.write(1, &code);
    #[rustfmt::skip]
    let handler = [
        0xb0, 0x40, // mov al, 0x40
        0xe6, 0x12, // out 0x12, al
    ];
    // SAFETY: offset 0x100 of the second mapped page, 4 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(handler.as_ptr(), host.page(1).add(0x100), handler.len())
    };

    let mapper = KvmGuestMapper::new(vm.clone(), 1..3).unwrap();
    map(&mapper, 0, PAGE as u64, host.page(0), false).unwrap();
    map(&mapper, 0x1000, PAGE as u64, host.page(1), false).unwrap();
    let Some(mut vcpu) = real_mode_vcpu(&vm, 0x1000) else {
        eprintln!("skipped: cannot set up a real-mode vCPU");
        return;
    };
    // Software-enable the local APIC (spurious vector register, bit 8; Intel SDM vol. 3, 11.9).
    let mut lapic = vcpu.get_lapic().unwrap();
    lapic.regs[0xf1] |= 1;
    vcpu.set_lapic(&lapic).unwrap();

    let routing = Arc::new(GsiRouting::new(vm.clone()));
    routing.add_x86_legacy_routes().unwrap();
    let manager = KvmInterruptManager::new(routing, 24..32).unwrap();
    let group = manager.new_msi_group(1).unwrap();
    // Fixed delivery, physical destination APIC id 0, vector 0x40, edge.
    let route = MsiRoute {
        address: 0xfee0_0000,
        data: 0x40,
    };
    group.enable().unwrap();
    group.update(0, route, true).unwrap();
    group.trigger(0).unwrap();
    assert!(
        is_signalled(group.notifier(0).unwrap()),
        "masked: the signal waits"
    );
    group.update(0, route, false).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok((port, data[0])),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        let _ = tx.send(exit);
    });
    // A vCPU that never gets the interrupt stays halted: give up after a while.
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(exit)) => assert_eq!(exit, (0x12, 0x40), "the vector 0x40 handler ran"),
        Ok(Err(exit)) => panic!("unexpected vCPU exit: {exit}"),
        Err(_) => panic!("the latched MSI never reached the halted vCPU"),
    }
}
