//! `KvmInterruptManager` and `GsiRouting` against this machine's /dev/kvm.
//!
//! Behaviour pinned down is KVM's documented API (Documentation/virt/kvm/api.rst: KVM_IRQFD,
//! KVM_SET_GSI_ROUTING) and the `InterruptSourceGroup` contract of pci-interrupts. Every test
//! skips, with a message, where /dev/kvm cannot be opened.
#![cfg(feature = "kvm")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};
use kvm_ioctls::{Kvm, VmFd};
use pci_interrupts::{InterruptManager, InterruptSourceGroup, MsiRoute};
use vfio_passthrough::kvm::{
    GsiRoute, GsiRouting, IntxLine, KvmInterruptGroup, KvmInterruptManager,
};
use vfio_passthrough::Error;
use vmm_sys_util::eventfd::EventFd;

const MSI_GSIS: std::ops::Range<u32> = 24..64;
const INTX_GSI: u32 = 10;

/// A VM with an in-kernel irqchip, or `None` (after saying why) when /dev/kvm is unusable.
fn vm() -> Option<Arc<VmFd>> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("skipped: cannot open /dev/kvm: {e}");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    Some(Arc::new(vm))
}

fn manager(vm: &Arc<VmFd>) -> KvmInterruptManager {
    let routing = Arc::new(GsiRouting::new(vm.clone()));
    routing.add_x86_legacy_routes().unwrap();
    routing.commit().unwrap();
    KvmInterruptManager::new(routing, MSI_GSIS)
        .unwrap()
        .with_intx(IntxLine::ioapic(INTX_GSI, INTX_GSI))
}

fn route(vector: u32) -> MsiRoute {
    // Fixed delivery to APIC id 0, edge-triggered, vector 0x40 + n (Intel SDM vol. 3, 11.11).
    MsiRoute {
        address: 0xfee0_0000,
        data: 0x40 + vector,
    }
}

/// A second descriptor for the same eventfd as `vector`'s notifier.
fn notifier_dup(group: &KvmInterruptGroup, vector: u32) -> EventFd {
    let owned = group
        .notifier(vector)
        .unwrap()
        .try_clone_to_owned()
        .unwrap();
    // SAFETY: `owned` is an open eventfd descriptor whose ownership moves into the EventFd.
    unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) }
}

/// Whether KVM has an irqfd on `vector`'s eventfd: KVM_IRQFD refuses a second irqfd on the same
/// eventfd with EBUSY. When it was not registered, the probe registration is undone.
fn kvm_has_irqfd(vm: &VmFd, group: &KvmInterruptGroup, vector: u32) -> bool {
    let fd = notifier_dup(group, vector);
    let gsi = group.gsi(vector).unwrap();
    match vm.register_irqfd(&fd, gsi) {
        Ok(()) => {
            vm.unregister_irqfd(&fd, gsi).unwrap();
            false
        }
        Err(e) if e.errno() == libc::EBUSY => true,
        Err(e) => panic!("unexpected KVM_IRQFD error: {e}"),
    }
}

/// Whether an eventfd has a count pending (readable), without consuming it.
fn is_signalled(fd: std::os::fd::BorrowedFd<'_>) -> bool {
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
fn unmasked_vectors_of_an_enabled_msi_group_get_an_msi_route_and_a_registered_irqfd() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(4).unwrap();
    assert_eq!(group.len(), 4);
    let gsis: Vec<u32> = (0..4).map(|v| group.gsi(v).unwrap()).collect();
    for gsi in &gsis {
        assert!(MSI_GSIS.contains(gsi), "GSI {gsi} outside the VMM's range");
    }
    let mut unique = gsis.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 4, "each vector has a GSI of its own");

    // A new group is disabled and masked: nothing registered.
    for v in 0..4 {
        assert!(!kvm_has_irqfd(&vm, &group, v));
    }
    group.enable().unwrap();
    for v in 0..4 {
        group.update(v, route(v), false).unwrap();
    }
    for v in 0..4 {
        let gsi = group.gsi(v).unwrap();
        assert_eq!(
            mgr.routing().routes(gsi),
            vec![GsiRoute::Msi {
                address: 0xfee0_0000,
                data: 0x40 + v,
                devid: None,
            }]
        );
        assert!(!mgr.routing().is_dirty(), "the route was committed to KVM");
        assert!(group.is_registered(v));
        assert!(
            kvm_has_irqfd(&vm, &group, v),
            "KVM has the irqfd of vector {v}"
        );
    }
}

#[test]
fn msi_routes_carry_the_device_id_the_vmm_gave_the_manager() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm).with_device_id(0x0018);
    assert_eq!(mgr.device_id(), Some(0x0018));
    let group = mgr.new_msi_group(2).unwrap();
    group.enable().unwrap();
    group.update(1, route(1), false).unwrap();
    let gsi = group.gsi(1).unwrap();
    // KVM accepts KVM_MSI_VALID_DEVID in routing entries on every architecture (x86 ignores
    // the id); the table holds the id for the entry it commits.
    assert_eq!(
        mgr.routing().routes(gsi),
        vec![GsiRoute::Msi {
            address: 0xfee0_0000,
            data: 0x41,
            devid: Some(0x0018),
        }]
    );
    assert!(
        !mgr.routing().is_dirty(),
        "KVM took the entry with its device id"
    );
    assert!(kvm_has_irqfd(&vm, &group, 1));
    // A manager without a device id keeps x86's entries: no device id.
    let plain = manager(&vm);
    assert_eq!(plain.device_id(), None);
}

#[test]
fn masking_unregisters_the_irqfd_and_keeps_the_notifier() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(4).unwrap();
    group.enable().unwrap();
    group.update(2, route(2), false).unwrap();
    let fd_before = group.notifier(2).unwrap().as_raw_fd();
    assert!(kvm_has_irqfd(&vm, &group, 2));

    group.update(2, route(2), true).unwrap();
    assert!(
        !kvm_has_irqfd(&vm, &group, 2),
        "masked: KVM has no irqfd on it"
    );
    assert_eq!(group.notifier(2).unwrap().as_raw_fd(), fd_before);

    group.update(2, route(2), false).unwrap();
    assert!(
        kvm_has_irqfd(&vm, &group, 2),
        "unmasked again: registered again"
    );
    assert_eq!(group.notifier(2).unwrap().as_raw_fd(), fd_before);
}

#[test]
fn a_signal_while_masked_stays_latched_and_kvm_consumes_signals_while_unmasked() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(1).unwrap();
    group.enable().unwrap();
    group.update(0, route(0), false).unwrap();

    // Registered: KVM's irqfd reads the eventfd as soon as it is signalled (and injects).
    group.trigger(0).unwrap();
    assert!(!is_signalled(group.notifier(0).unwrap()));

    // Masked: nobody reads it, the signal waits in the eventfd.
    group.update(0, route(0), true).unwrap();
    group.trigger(0).unwrap();
    assert!(is_signalled(group.notifier(0).unwrap()));
}

#[test]
fn an_update_that_changes_nothing_makes_no_ioctl_and_one_vector_costs_one_ioctl_per_change() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(4).unwrap();
    group.enable().unwrap();
    for v in 0..4 {
        group.update(v, route(v), false).unwrap();
    }

    let count = mgr.ioctl_count();
    group.update(1, route(1), false).unwrap();
    group.update(1, route(1), false).unwrap();
    assert_eq!(mgr.ioctl_count(), count, "unchanged update: no ioctl");

    let moved = MsiRoute {
        address: 0xfee0_1000,
        data: 0x51,
    };
    group.update(1, moved, false).unwrap();
    assert_eq!(
        mgr.ioctl_count(),
        count + 1,
        "new route: one KVM_SET_GSI_ROUTING"
    );
    assert!(
        kvm_has_irqfd(&vm, &group, 1),
        "the irqfd stays across a route change"
    );

    let count = mgr.ioctl_count();
    group.update(1, moved, true).unwrap();
    assert_eq!(mgr.ioctl_count(), count + 1, "masking: one KVM_IRQFD");
    group.update(1, route(7), true).unwrap();
    assert_eq!(
        mgr.ioctl_count(),
        count + 1,
        "masked, route ignored: no ioctl"
    );
    group.update(1, moved, false).unwrap();
    assert_eq!(
        mgr.ioctl_count(),
        count + 2,
        "unmasking, same route: one KVM_IRQFD"
    );
    assert!(kvm_has_irqfd(&vm, &group, 1));
}

#[test]
fn disable_masks_every_vector_and_enable_leaves_them_masked_until_updated() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(4).unwrap();
    group.enable().unwrap();
    for v in 0..4 {
        group.update(v, route(v), false).unwrap();
    }
    group.disable().unwrap();
    for v in 0..4 {
        assert!(
            !kvm_has_irqfd(&vm, &group, v),
            "disabled: vector {v} not delivered"
        );
    }
    group.enable().unwrap();
    for v in 0..4 {
        assert!(
            !kvm_has_irqfd(&vm, &group, v),
            "enabled: vector {v} still masked"
        );
    }
    group.update(3, route(3), false).unwrap();
    assert!(kvm_has_irqfd(&vm, &group, 3));
    assert!(!kvm_has_irqfd(&vm, &group, 0));
}

#[test]
fn a_vector_unmasked_while_disabled_is_delivered_once_the_group_is_enabled() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(2).unwrap();
    group.update(0, route(0), false).unwrap();
    assert!(
        !kvm_has_irqfd(&vm, &group, 0),
        "group disabled: not delivered"
    );
    group.enable().unwrap();
    assert!(kvm_has_irqfd(&vm, &group, 0));
    assert!(!kvm_has_irqfd(&vm, &group, 1));
}

#[test]
fn out_of_range_vectors_are_refused() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_msi_group(2).unwrap();
    assert!(group.notifier(2).is_none());
    assert!(matches!(
        group.update(2, route(2), false),
        Err(pci_interrupts::Error::VectorOutOfRange {
            vector: 2,
            count: 2
        })
    ));
    assert!(matches!(
        group.trigger(5),
        Err(pci_interrupts::Error::VectorOutOfRange {
            vector: 5,
            count: 2
        })
    ));
}

#[test]
fn groups_take_gsis_from_the_vmm_range_and_give_them_back_when_dropped() {
    let Some(vm) = vm() else { return };
    let routing = Arc::new(GsiRouting::new(vm.clone()));
    let mgr = KvmInterruptManager::new(routing.clone(), 40..44).unwrap();
    let group = mgr.new_msi_group(3).unwrap();
    group.enable().unwrap();
    group.update(0, route(0), false).unwrap();
    let gsi = group.gsi(0).unwrap();
    assert_eq!(routing.routes(gsi).len(), 1);
    assert_eq!(mgr.free_gsis(), 1);
    let err = mgr.create_msi_group(2).err().expect("only one GSI left");
    assert!(matches!(
        err,
        pci_interrupts::Error::Group { op: "create", .. }
    ));

    drop(group);
    assert_eq!(mgr.free_gsis(), 4);
    assert!(
        routing.routes(gsi).is_empty(),
        "the dropped group's route is gone"
    );
    assert!(!routing.is_dirty(), "and KVM was told");
    assert_eq!(mgr.new_msi_group(4).unwrap().len(), 4);
}

#[test]
fn an_msi_route_replaces_the_irqchip_routes_of_its_gsi_so_kvm_accepts_the_table() {
    let Some(vm) = vm() else { return };
    let routing = GsiRouting::new(vm.clone());
    routing.add_x86_legacy_routes().unwrap();
    assert_eq!(routing.routes(5).len(), 2, "GSI 5: PIC and IOAPIC pin");
    assert_eq!(routing.routes(20).len(), 1, "GSI 20: IOAPIC pin only");
    routing.commit().unwrap();

    // KVM refuses a table where a GSI has an MSI route next to another route (EINVAL).
    assert!(routing
        .add(
            5,
            GsiRoute::Msi {
                address: 0xfee0_0000,
                data: 0x30,
                devid: None,
            }
        )
        .unwrap());
    assert_eq!(
        routing.routes(5),
        vec![GsiRoute::Msi {
            address: 0xfee0_0000,
            data: 0x30,
            devid: None,
        }]
    );
    routing.commit().unwrap();

    // Two irqchips may share a GSI; the same irqchip twice may not, so it is replaced.
    let pic = GsiRoute::Irqchip {
        chip: KVM_IRQCHIP_PIC_MASTER,
        pin: 5,
    };
    let ioapic = GsiRoute::Irqchip {
        chip: KVM_IRQCHIP_IOAPIC,
        pin: 5,
    };
    routing.add(5, pic).unwrap();
    routing.add(5, ioapic).unwrap();
    routing
        .add(
            5,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 6,
            },
        )
        .unwrap();
    assert_eq!(routing.routes(5).len(), 2);
    routing.commit().unwrap();
}

#[test]
fn committing_an_unchanged_table_makes_no_ioctl() {
    let Some(vm) = vm() else { return };
    let routing = GsiRouting::new(vm.clone());
    routing.add_x86_legacy_routes().unwrap();
    routing.commit().unwrap();
    let count = routing.ioctl_count();
    assert!(!routing
        .add(
            3,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 3
            }
        )
        .unwrap());
    routing.commit().unwrap();
    assert_eq!(routing.ioctl_count(), count);
    assert!(routing.remove(3));
    routing.commit().unwrap();
    assert_eq!(routing.ioctl_count(), count + 1);
}

#[test]
fn gsis_beyond_kvm_max_irq_routes_are_refused_before_kvm() {
    let Some(vm) = vm() else { return };
    let routing = Arc::new(GsiRouting::new(vm.clone()));
    let r = routing.add(
        4096,
        GsiRoute::Msi {
            address: 0xfee0_0000,
            data: 0,
            devid: None,
        },
    );
    assert!(matches!(
        r,
        Err(Error::Invalid {
            what: "GSI",
            value: 4096,
            ..
        })
    ));
    assert_eq!(r.unwrap_err().io_kind(), std::io::ErrorKind::InvalidInput);
    assert!(matches!(
        KvmInterruptManager::new(routing.clone(), 4000..4097),
        Err(Error::Invalid {
            what: "GSI range end",
            value: 4097,
            ..
        })
    ));
    assert!(matches!(
        KvmInterruptManager::new(routing, 30..30),
        Err(Error::Invalid {
            what: "GSI range end",
            value: 30,
            reason: "the GSI range is empty"
        })
    ));
}

#[test]
fn a_table_kvm_rejects_is_reported_and_the_group_route_is_rolled_back() {
    let Some(vm) = vm() else { return };
    // Without an in-kernel irqchip, x86 KVM refuses KVM_SET_GSI_ROUTING (EINVAL).
    let kvm = Kvm::new().unwrap();
    let bare = Arc::new(kvm.create_vm().unwrap());
    drop(vm);
    let routing = Arc::new(GsiRouting::new(bare));
    let mgr = KvmInterruptManager::new(routing.clone(), MSI_GSIS).unwrap();
    let group = mgr.new_msi_group(1).unwrap();
    let err = group.update(0, route(0), false).unwrap_err();
    assert!(matches!(
        err,
        pci_interrupts::Error::Group { op: "update", .. }
    ));
    assert!(routing.routes(group.gsi(0).unwrap()).is_empty());
    assert!(!routing.is_dirty());
}

#[test]
fn intx_group_registers_a_resampling_irqfd_on_its_ioapic_line() {
    let Some(vm) = vm() else { return };
    let mgr = manager(&vm);
    let group = mgr.new_intx_group().unwrap();
    assert!(group.is_intx());
    assert_eq!(group.len(), 1);
    assert_eq!(group.gsi(0), Some(INTX_GSI));
    assert!(group.resample_notifier(0).is_some());
    assert!(group.resample_notifier(1).is_none());
    assert!(mgr.routing().routes(INTX_GSI).contains(&GsiRoute::Irqchip {
        chip: KVM_IRQCHIP_IOAPIC,
        pin: INTX_GSI
    }));

    group.enable().unwrap();
    assert!(!kvm_has_irqfd(&vm, &group, 0), "masked until updated");
    group.update(0, MsiRoute::default(), false).unwrap();
    assert!(kvm_has_irqfd(&vm, &group, 0));
    // KVM's irqfd consumes the signal and raises the level on the IOAPIC pin.
    group.trigger(0).unwrap();
    assert!(!is_signalled(group.notifier(0).unwrap()));

    group.update(0, MsiRoute::default(), true).unwrap();
    assert!(
        !kvm_has_irqfd(&vm, &group, 0),
        "interrupt disable: no irqfd"
    );
    group.trigger(0).unwrap();
    assert!(
        is_signalled(group.notifier(0).unwrap()),
        "latched while masked"
    );
}

#[test]
fn intx_group_without_a_configured_line_is_refused() {
    let Some(vm) = vm() else { return };
    let routing = Arc::new(GsiRouting::new(vm.clone()));
    let mgr = KvmInterruptManager::new(routing, MSI_GSIS).unwrap();
    assert!(matches!(
        mgr.create_intx_group(),
        Err(pci_interrupts::Error::Group { op: "create", .. })
    ));
}
