//! The guest's PCI bus without KVM: configuration mechanism #1 through ports 0xCF8/0xCFC
//! reaching the host bridge and a passed-through (fake, in-process) function, and the BAR map
//! following the BAR moves and sizing that config writes report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use pci_interrupts::testing::TestInterruptManager;
use vfio_fake_device::{edu, FakeDevice};
use vfio_passthrough::pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use vfio_passthrough::vfio_backend::Vfio;
use vfio_passthrough::vfio_pci::{
    AddressSpace, BarIndex, DeviceOptions, DeviceResources, GuestDma, TrapAllMapper, VfioPciDevice,
};
use vfio_reference_vmm::pci::{
    decode_config_address, PciBus, CONFIG_ADDRESS, CONFIG_DATA, HOST_BRIDGE_CLASS,
    HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR,
};

fn fake(profile: &str) -> Arc<VfioPciDevice> {
    let vfio: Arc<dyn Vfio> = Arc::new(FakeDevice::profile(profile).unwrap());
    let windows = BarWindows::new(AddressWindow::new(0xc000_0000, 0x3ec0_0000))
        .with_mmio64(AddressWindow::new(64 << 30, 64 << 30))
        .with_io(AddressWindow::new(0xc000, 0x4000));
    let resources = DeviceResources {
        interrupts: Arc::new(TestInterruptManager::new()),
        mapper: Arc::new(TrapAllMapper),
        allocator: Arc::new(Mutex::new(BarAllocator::new(windows).unwrap())),
        dma: GuestDma::new(),
    };
    Arc::new(VfioPciDevice::new(vfio, resources, DeviceOptions::default()).unwrap())
}

fn address(device: u8, offset: u8) -> u32 {
    0x8000_0000 | (u32::from(device) << 11) | u32::from(offset & 0xfc)
}

/// A config read through the ports, as Linux's mechanism #1 does it.
fn cfg_read(bus: &mut PciBus, device: u8, offset: u8, len: usize) -> u32 {
    bus.pio_write(CONFIG_ADDRESS, &address(device, offset).to_le_bytes())
        .unwrap();
    let mut data = vec![0u8; len];
    bus.pio_read(CONFIG_DATA + u16::from(offset & 3), &mut data);
    data.resize(4, 0);
    u32::from_le_bytes(data.try_into().unwrap())
}

fn cfg_write(bus: &mut PciBus, device: u8, offset: u8, data: &[u8]) {
    bus.pio_write(CONFIG_ADDRESS, &address(device, offset).to_le_bytes())
        .unwrap();
    bus.pio_write(CONFIG_DATA + u16::from(offset & 3), data)
        .unwrap();
}

#[test]
fn config_address_reads_back_and_the_host_bridge_passes_linux_conf1_sanity_check() {
    let mut bus = PciBus::new();
    // pci_check_type1: write 0x80000000 to 0xCF8, read it back.
    bus.pio_write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes())
        .unwrap();
    let mut back = [0u8; 4];
    bus.pio_read(CONFIG_ADDRESS, &mut back);
    assert_eq!(u32::from_le_bytes(back), 0x8000_0000);
    // A byte write at 0xCFB is not CONFIG_ADDRESS.
    bus.pio_write(CONFIG_ADDRESS + 3, &[0x01]).unwrap();
    bus.pio_read(CONFIG_ADDRESS, &mut back);
    assert_eq!(u32::from_le_bytes(back), 0x8000_0000);
    // pci_sanity_check: a host bridge class on bus 0.
    let ids = cfg_read(&mut bus, 0, 0, 4);
    assert_eq!(
        ids,
        u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR)
    );
    assert_eq!(cfg_read(&mut bus, 0, 0x0a, 2), HOST_BRIDGE_CLASS >> 8);
    assert_eq!(
        cfg_read(&mut bus, 0, 0x0e, 1),
        0,
        "header type 0, single function"
    );
    // Writes to the host bridge change nothing.
    cfg_write(&mut bus, 0, 0, &[0, 0, 0, 0]);
    assert_eq!(
        cfg_read(&mut bus, 0, 0, 4) & 0xffff,
        u32::from(HOST_BRIDGE_VENDOR)
    );
}

#[test]
fn a_passed_through_function_answers_at_device_1_with_its_ids_in_bytes_words_and_dwords() {
    let mut bus = PciBus::new();
    assert_eq!(bus.add(fake("edu")), Some(1));
    let ids = cfg_read(&mut bus, 1, 0, 4);
    assert_eq!(
        ids,
        u32::from(edu::DEVICE_ID) << 16 | u32::from(edu::VENDOR_ID)
    );
    assert_eq!(cfg_read(&mut bus, 1, 2, 2), u32::from(edu::DEVICE_ID));
    assert_eq!(cfg_read(&mut bus, 1, 3, 1), u32::from(edu::DEVICE_ID >> 8));
    // Absent device numbers, functions and buses read all ones.
    assert_eq!(cfg_read(&mut bus, 2, 0, 4), 0xffff_ffff);
    bus.pio_write(CONFIG_ADDRESS, &(address(1, 0) | 1 << 8).to_le_bytes())
        .unwrap();
    let mut d = [0u8; 4];
    bus.pio_read(CONFIG_DATA, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_ffff, "function 1");
    bus.pio_write(CONFIG_ADDRESS, &(address(1, 0) | 1 << 16).to_le_bytes())
        .unwrap();
    bus.pio_read(CONFIG_DATA, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_ffff, "bus 1");
    // With the enable bit clear nothing is addressed.
    bus.pio_write(
        CONFIG_ADDRESS,
        &(address(1, 0) & !0x8000_0000).to_le_bytes(),
    )
    .unwrap();
    bus.pio_read(CONFIG_DATA, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
}

#[test]
fn config_address_decoding_follows_mechanism_1_and_refuses_extended_register_bits() {
    let t = decode_config_address(0x8001_0a48, CONFIG_DATA + 2).unwrap();
    assert_eq!((t.bus, t.device, t.function, t.offset), (1, 1, 2, 0x4a));
    assert_eq!(decode_config_address(0x0000_0a48, CONFIG_DATA), None);
    assert_eq!(decode_config_address(0x8100_0000, CONFIG_DATA), None);
}

#[test]
fn the_bus_map_routes_each_decoding_bar_to_its_device_and_offset() {
    let mut bus = PciBus::new();
    bus.add(fake("edu")).unwrap();
    let dev = bus.device(1).unwrap().clone();
    let base = dev.bars()[0].base.unwrap();
    let r = bus.lookup(AddressSpace::Memory, base + 0x20).unwrap();
    assert!(Arc::ptr_eq(&r.device, &dev));
    assert_eq!((r.slot, r.bar, r.offset), (1, BarIndex::Bar(0), 0x20));
    let (found, bar, off) = (r.device, r.bar, r.offset);
    assert!(bus.lookup(AddressSpace::Memory, base - 1).is_none());
    assert!(bus
        .lookup(AddressSpace::Memory, base + edu::BAR_SIZE)
        .is_none());
    // The id register reads through the routed BAR, once memory decoding is on.
    let cmd = cfg_read(&mut bus, 1, 4, 2) as u16;
    cfg_write(&mut bus, 1, 4, &(cmd | 0x2).to_le_bytes());
    let mut id = [0u8; 4];
    found.read_bar(bar, off - 0x20, &mut id);
    assert_eq!(u32::from_le_bytes(id), edu::ID_VALUE);
}

#[test]
fn a_bar_moved_by_config_writes_with_decode_off_and_back_is_routed_at_its_new_address_only() {
    let mut bus = PciBus::new();
    bus.add(fake("edu")).unwrap();
    let base = bus.device(1).unwrap().bars()[0].base.unwrap();
    let moved = base + 0x1000_0000;
    let cmd = cfg_read(&mut bus, 1, 4, 2) as u16;
    // Linux's way: memory decode off, new address, decode on.
    cfg_write(&mut bus, 1, 4, &(cmd & !0x2).to_le_bytes());
    cfg_write(&mut bus, 1, 0x10, &(moved as u32).to_le_bytes());
    assert!(
        bus.lookup(AddressSpace::Memory, base).is_none(),
        "old range dropped"
    );
    cfg_write(&mut bus, 1, 4, &(cmd | 0x2).to_le_bytes());
    let r = bus
        .lookup(AddressSpace::Memory, moved + 8)
        .expect("routed at the new address");
    assert_eq!((r.bar, r.offset), (BarIndex::Bar(0), 8));
    assert!(bus.lookup(AddressSpace::Memory, base).is_none());
    assert_eq!(bus.map().entries(AddressSpace::Memory).len(), 1);
    // And back again.
    cfg_write(&mut bus, 1, 4, &(cmd & !0x2).to_le_bytes());
    cfg_write(&mut bus, 1, 0x10, &(base as u32).to_le_bytes());
    cfg_write(&mut bus, 1, 4, &(cmd | 0x2).to_le_bytes());
    assert!(bus.lookup(AddressSpace::Memory, base).is_some());
    assert!(bus.lookup(AddressSpace::Memory, moved).is_none());
}

#[test]
fn sizing_a_bar_unroutes_it_until_its_address_is_written_back() {
    let mut bus = PciBus::new();
    bus.add(fake("edu")).unwrap();
    let base = bus.device(1).unwrap().bars()[0].base.unwrap();
    cfg_write(&mut bus, 1, 0x10, &u32::MAX.to_le_bytes());
    let size_mask = cfg_read(&mut bus, 1, 0x10, 4) & !0xf;
    assert_eq!(u64::from(!size_mask) + 1, edu::BAR_SIZE);
    assert!(bus.lookup(AddressSpace::Memory, base).is_none());
    cfg_write(&mut bus, 1, 0x10, &(base as u32).to_le_bytes());
    assert!(bus.lookup(AddressSpace::Memory, base).is_some());
}

#[test]
fn devices_get_consecutive_numbers_until_the_bus_is_full() {
    let mut bus = PciBus::new();
    let dev = fake("edu");
    for n in 1..=vfio_reference_vmm::pci::MAX_DEVICES {
        // The same device object, to keep the test small: only numbering is looked at.
        assert_eq!(bus.add(dev.clone()), Some(n as u8));
    }
    assert_eq!(bus.add(dev), None);
}
