//! The instrumented test implementation of the interrupt traits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;

use pci_interrupts::testing::{GroupCall, TestInterruptGroup, TestInterruptManager};
use pci_interrupts::{InterruptManager, InterruptSourceGroup, MsiRoute};

#[test]
fn every_vector_has_its_own_eventfd_and_out_of_range_has_none() {
    let group = TestInterruptGroup::new(3).unwrap();
    let fds: Vec<_> = (0..3)
        .map(|v| group.notifier(v).unwrap().as_raw_fd())
        .collect();
    assert!(fds[0] != fds[1] && fds[1] != fds[2] && fds[0] != fds[2]);
    assert!(group.notifier(3).is_none());
    assert!(group.resample_notifier(0).is_none());
}

#[test]
fn signals_are_counted_and_consumed_without_blocking() {
    let group = TestInterruptGroup::new(2).unwrap();
    assert_eq!(group.take_signals(0), 0);
    group.signal(1).unwrap();
    group.signal(1).unwrap();
    assert_eq!(group.take_signals(0), 0);
    assert_eq!(group.take_signals(1), 2);
    assert!(!group.was_signalled(1));
    assert!(matches!(
        group.signal(2),
        Err(pci_interrupts::Error::VectorOutOfRange {
            vector: 2,
            count: 2
        })
    ));
}

#[test]
fn calls_are_logged_and_model_delivery_state() {
    let group = TestInterruptGroup::new(2).unwrap();
    let route = MsiRoute {
        address: 0xfee0_0000,
        data: 7,
    };
    group.update(1, route, false).unwrap();
    assert!(!group.is_deliverable(1));
    group.enable().unwrap();
    assert!(group.is_deliverable(1) && !group.is_deliverable(0));
    assert_eq!(group.route(1), Some(route));
    group.trigger(1).unwrap();
    assert!(group.was_signalled(1));
    group.disable().unwrap();
    assert!(group.is_masked(1));
    assert_eq!(
        group.take_calls(),
        vec![
            GroupCall::Update {
                vector: 1,
                route,
                masked: false
            },
            GroupCall::Enable,
            GroupCall::Trigger { vector: 1 },
            GroupCall::Disable,
        ]
    );
    assert!(group.calls().is_empty());
    assert_eq!(group.violations(), 0);
}

#[test]
fn trigger_of_a_masked_vector_counts_as_a_violation() {
    let group = TestInterruptGroup::new(1).unwrap();
    group.enable().unwrap();
    group.trigger(0).unwrap();
    assert_eq!(group.violations(), 1);
    assert!(matches!(
        group.update(1, MsiRoute::default(), true),
        Err(pci_interrupts::Error::VectorOutOfRange {
            vector: 1,
            count: 1
        })
    ));
}

#[test]
fn failing_group_returns_errors_with_errno() {
    let group = TestInterruptGroup::new(1).unwrap();
    group.fail_calls(true);
    let err = group.enable().unwrap_err();
    assert!(
        matches!(err, pci_interrupts::Error::Group { op: "enable", ref source } if source.raw_os_error() == Some(libc::EIO))
    );
    assert!(!group.is_enabled());
}

#[test]
fn manager_keeps_the_groups_it_makes() {
    let manager = TestInterruptManager::new();
    let msi = manager.create_msi_group(4).unwrap();
    let intx = manager.create_intx_group().unwrap();
    assert_eq!(msi.len(), 4);
    assert_eq!(intx.len(), 1);
    assert!(intx.resample_notifier(0).is_some());
    let groups = manager.groups();
    assert_eq!(groups.len(), 2);
    msi.enable().unwrap();
    assert!(groups[0].is_enabled());
    assert_eq!(manager.last_group().unwrap().len(), 1);
}
