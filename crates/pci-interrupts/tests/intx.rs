//! INTx behaviour from PCI Local Bus 3.0 §6.2 (command bit 10, status bit 3, interrupt pin).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use pci_interrupts::testing::{GroupCall, TestInterruptGroup};
use pci_interrupts::{
    Delivery, IntxPin, IntxState, MsiRoute, COMMAND_INTX_DISABLE, STATUS_INTERRUPT,
};

fn bound(pin: IntxPin) -> (IntxState, Arc<TestInterruptGroup>) {
    let mut intx = IntxState::new(pin);
    let group = Arc::new(TestInterruptGroup::new_intx().unwrap());
    intx.set_group(Some(group.clone())).unwrap();
    (intx, group)
}

#[test]
fn interrupt_pin_register_accepts_0_to_4_only() {
    for (value, pin) in [(0, IntxPin::None), (1, IntxPin::IntA), (4, IntxPin::IntD)] {
        let intx = IntxState::from_pin_register(value).unwrap();
        assert_eq!(intx.pin(), pin);
        assert_eq!(pin.register(), value);
    }
    assert!(matches!(
        IntxState::from_pin_register(5),
        Err(pci_interrupts::Error::InvalidCapability {
            capability: "INTx",
            ..
        })
    ));
    assert!(IntxPin::from_register(0xff).is_none());
}

#[test]
fn assertion_is_delivered_and_reflected_in_interrupt_status() {
    let (mut intx, group) = bound(IntxPin::IntA);
    assert!(group.is_enabled() && group.is_deliverable(0));
    assert_eq!(intx.status_bits(), 0);
    assert_eq!(intx.assert_line().unwrap(), Delivery::Delivered);
    assert_eq!(intx.status_bits(), STATUS_INTERRUPT);
    assert!(group.was_signalled(0));
    // Level held: no second edge.
    assert_eq!(intx.assert_line().unwrap(), Delivery::Dropped);
    intx.deassert_line();
    assert_eq!(intx.status_bits(), 0);
    assert_eq!(group.triggers_of(0), 1);
}

#[test]
fn interrupt_disable_masks_delivery_but_status_still_reflects_assertion() {
    let (mut intx, group) = bound(IntxPin::IntB);
    intx.set_command(COMMAND_INTX_DISABLE | 0x6).unwrap();
    assert!(intx.masked() && group.is_masked(0));
    assert_eq!(intx.assert_line().unwrap(), Delivery::Pending);
    assert_eq!(intx.status_bits(), STATUS_INTERRUPT);
    assert_eq!(group.triggers_of(0), 0);
    // Clearing Interrupt Disable with the line still asserted delivers it.
    intx.set_command(0x6).unwrap();
    assert_eq!(group.triggers_of(0), 1);
    assert_eq!(group.violations(), 0);
}

#[test]
fn command_writes_without_a_disable_change_make_no_group_calls() {
    let (mut intx, group) = bound(IntxPin::IntA);
    group.clear_calls();
    intx.set_command(0x7).unwrap();
    intx.set_command(0x2).unwrap();
    assert!(group.calls().is_empty());
    intx.set_command(COMMAND_INTX_DISABLE).unwrap();
    assert_eq!(
        group.calls(),
        vec![GroupCall::Update {
            vector: 0,
            route: MsiRoute::default(),
            masked: true
        }]
    );
}

#[test]
fn function_without_a_pin_never_asserts() {
    let (mut intx, group) = bound(IntxPin::None);
    assert_eq!(intx.assert_line().unwrap(), Delivery::Dropped);
    assert!(!intx.asserted());
    assert_eq!(group.triggers_of(0), 0);
}

#[test]
fn intx_group_exposes_trigger_and_resample_eventfds() {
    use pci_interrupts::InterruptSourceGroup;
    let group = TestInterruptGroup::new_intx().unwrap();
    let trigger = group.notifier(0).unwrap();
    let resample = group.resample_notifier(0).unwrap();
    assert_ne!(
        std::os::fd::AsRawFd::as_raw_fd(&trigger),
        std::os::fd::AsRawFd::as_raw_fd(&resample)
    );
    assert!(group.resample_notifier(1).is_none());
    group.resample().unwrap();
    assert_eq!(group.take_resamples(), 1);
    assert_eq!(group.take_resamples(), 0);
}

#[test]
fn snapshot_round_trip_restores_line_assertion_and_disable() {
    let (mut intx, _) = bound(IntxPin::IntC);
    intx.set_line(11);
    intx.set_command(COMMAND_INTX_DISABLE).unwrap();
    intx.assert_line().unwrap();
    let snap = intx.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let back = serde_json::from_str(&json).unwrap();
    let (mut dest, group) = bound(IntxPin::IntC);
    dest.restore(&back).unwrap();
    assert_eq!(dest.snapshot(), snap);
    assert_eq!(dest.line(), 11);
    assert!(group.is_masked(0));
    assert!(matches!(
        IntxState::new(IntxPin::IntA).restore(&snap),
        Err(pci_interrupts::Error::SnapshotMismatch {
            capability: "INTx",
            reason: "interrupt pin differs"
        })
    ));
}
