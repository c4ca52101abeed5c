//! The vCPU exit dispatch without KVM: the ports that end the machine, the serial console,
//! the clock, PCI configuration and BAR accesses reaching a (fake, in-process) device, and
//! what nobody claims.
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pci_interrupts::testing::TestInterruptManager;
use vfio_fake_device::{edu, FakeDevice};
use vfio_passthrough::pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use vfio_passthrough::vfio_backend::Vfio;
use vfio_passthrough::vfio_pci::{
    DeviceOptions, DeviceResources, GuestDma, TrapAllMapper, VfioPciDevice,
};
use vfio_reference_vmm::pci::PciBus;
use vfio_reference_vmm::vmm::{Bus, Stop};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn bus_with(pci: PciBus) -> (Bus, Captured, EventFd) {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let out = Captured::default();
    let bus = Bus::new(pci, irq.try_clone().unwrap(), Box::new(out.clone()));
    (bus, out, irq)
}

fn edu_device() -> Arc<VfioPciDevice> {
    let vfio: Arc<dyn Vfio> = Arc::new(FakeDevice::profile("edu").unwrap());
    let windows = BarWindows::new(AddressWindow::new(0xc000_0000, 0x3ec0_0000));
    let resources = DeviceResources {
        interrupts: Arc::new(TestInterruptManager::new()),
        mapper: Arc::new(TrapAllMapper),
        allocator: Arc::new(Mutex::new(BarAllocator::new(windows).unwrap())),
        dma: GuestDma::new(),
    };
    Arc::new(VfioPciDevice::new(vfio, resources, DeviceOptions::default()).unwrap())
}

#[test]
fn a_byte_on_the_debug_exit_port_stops_the_machine_with_that_status() {
    let (bus, _, _) = bus_with(PciBus::new());
    assert!(matches!(bus.pio_write(0xf4, &[7]), Some(Stop::Exit(7))));
    assert!(matches!(bus.pio_write(0xf4, &[0]), Some(Stop::Exit(0))));
}

#[test]
fn i8042_reads_as_ready_for_a_command_and_its_reset_command_resets() {
    let (bus, _, _) = bus_with(PciBus::new());
    let mut status = [0u8];
    bus.pio_read(0x64, &mut status);
    assert_eq!(
        status[0] & 0x2,
        0,
        "input buffer empty: Linux's kb_wait returns at once"
    );
    assert!(
        bus.pio_write(0x64, &[0xaa]).is_none(),
        "other commands are ignored"
    );
    assert!(matches!(bus.pio_write(0x64, &[0xfe]), Some(Stop::Reset(_))));
}

#[test]
fn the_reset_control_register_resets_only_when_bit_2_is_written() {
    let (bus, _, _) = bus_with(PciBus::new());
    assert!(bus.pio_write(0xcf9, &[0x02]).is_none());
    assert!(matches!(
        bus.pio_write(0xcf9, &[0x06]),
        Some(Stop::Reset(_))
    ));
}

#[test]
fn serial_output_reaches_the_console_and_raises_irq_4_when_enabled() {
    let (bus, out, irq) = bus_with(PciBus::new());
    // IER: transmitter holding register empty interrupt on.
    assert!(bus.pio_write(0x3f9, &[0x02]).is_none());
    for b in b"ok\n" {
        assert!(bus.pio_write(0x3f8, &[*b]).is_none());
    }
    assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n");
    assert!(irq.read().unwrap() > 0, "the irqfd was written");
    let mut lsr = [0u8];
    bus.pio_read(0x3fd, &mut lsr);
    assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    assert_eq!(bus.stats.serial.load(Ordering::Relaxed), 5);
}

#[test]
fn the_cmos_clock_answers_through_its_index_and_data_ports() {
    let (bus, _, _) = bus_with(PciBus::new());
    assert!(bus.pio_write(0x70, &[0x0b]).is_none());
    let mut b = [0u8];
    bus.pio_read(0x71, &mut b);
    assert_eq!(b[0], 0x06, "status B: binary, 24-hour");
}

#[test]
fn unclaimed_ports_and_addresses_read_all_ones_and_ignore_writes() {
    let (bus, _, _) = bus_with(PciBus::new());
    let mut d = [0u8; 4];
    bus.pio_read(0x2f8, &mut d[..1]);
    assert_eq!(d[0], 0xff);
    bus.mmio_read(0xd000_0000, &mut d);
    assert_eq!(d, [0xff; 4]);
    assert!(bus.mmio_write(0xd000_0000, &d).is_none());
    assert!(bus.pio_write(0x80, &[0x55]).is_none());
}

#[test]
fn pci_configuration_and_bar_exits_reach_the_device() {
    let mut pci = PciBus::new();
    let dev = edu_device();
    pci.add(dev.clone()).unwrap();
    let (bus, _, _) = bus_with(pci);
    // Through the ports: the device's ids at 00:01.0, then memory decoding on.
    assert!(bus
        .pio_write(0xcf8, &0x8000_0800u32.to_le_bytes())
        .is_none());
    let mut ids = [0u8; 4];
    bus.pio_read(0xcfc, &mut ids);
    assert_eq!(
        u32::from_le_bytes(ids),
        u32::from(edu::DEVICE_ID) << 16 | u32::from(edu::VENDOR_ID)
    );
    assert!(bus
        .pio_write(0xcf8, &0x8000_0804u32.to_le_bytes())
        .is_none());
    assert!(bus.pio_write(0xcfc, &[0x06, 0x00]).is_none());
    // An MMIO exit in BAR0 reads the identification register.
    let base = dev.bars()[0].base.unwrap();
    let mut id = [0u8; 4];
    bus.mmio_read(base, &mut id);
    assert_eq!(u32::from_le_bytes(id), edu::ID_VALUE);
    assert_eq!(bus.stats.bar.load(Ordering::Relaxed), 1);
    assert_eq!(bus.stats.config.load(Ordering::Relaxed), 4);
}
