//! Legacy INTx state (PCI Local Bus 3.0 §6.2.2-6.2.4): the Interrupt Pin and Line registers,
//! the command register's Interrupt Disable bit and the status register's Interrupt Status bit.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::regs::keep_first;
use crate::{Delivery, Error, InterruptSourceGroup, MsiRoute, Result};

/// Command register bit 10: Interrupt Disable (the function may not assert INTx).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register bit 3: Interrupt Status (the function's INTx is asserted, whatever the
/// Interrupt Disable bit says).
pub const STATUS_INTERRUPT: u16 = 1 << 3;

/// The Interrupt Pin register: which INTx pin the function uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IntxPin {
    /// 0: the function uses no INTx pin.
    #[default]
    None,
    /// 1: INTA#.
    IntA,
    /// 2: INTB#.
    IntB,
    /// 3: INTC#.
    IntC,
    /// 4: INTD#.
    IntD,
}

impl IntxPin {
    /// The pin a register value names; values above 4 are reserved and give `None`.
    pub fn from_register(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::None,
            1 => Self::IntA,
            2 => Self::IntB,
            3 => Self::IntC,
            4 => Self::IntD,
            _ => return None,
        })
    }

    /// The register value (0 for none, 1..=4 for INTA#..INTD#).
    pub fn register(self) -> u8 {
        match self {
            Self::None => 0,
            Self::IntA => 1,
            Self::IntB => 2,
            Self::IntC => 3,
            Self::IntD => 4,
        }
    }
}

/// INTx state of one function, and the binding to the one-vector group that delivers it.
///
/// The device model asserts and deasserts the line; the guest's command register writes go to
/// [`set_command`](Self::set_command). The group's vector 0 is masked while Interrupt Disable is
/// set; an assertion that happens meanwhile is delivered when the guest clears it.
#[derive(Clone)]
pub struct IntxState {
    pin: IntxPin,
    line: u8,
    asserted: bool,
    disabled: bool,
    group: Option<Arc<dyn InterruptSourceGroup>>,
}

/// Snapshot of [`IntxState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntxSnapshot {
    /// Interrupt Pin.
    pub pin: IntxPin,
    /// Interrupt Line.
    pub line: u8,
    /// Whether the line is asserted.
    pub asserted: bool,
    /// Whether the command register's Interrupt Disable bit is set.
    pub disabled: bool,
}

impl IntxState {
    /// INTx state for a function using `pin`, deasserted, Interrupt Disable clear (its reset
    /// value), Interrupt Line 0.
    pub fn new(pin: IntxPin) -> Self {
        Self {
            pin,
            line: 0,
            asserted: false,
            disabled: false,
            group: None,
        }
    }

    /// INTx state from an Interrupt Pin register value (0..=4).
    pub fn from_pin_register(value: u8) -> Result<Self> {
        IntxPin::from_register(value)
            .map(Self::new)
            .ok_or(Error::InvalidCapability {
                capability: "INTx",
                reason: "interrupt pin above 4 is reserved",
            })
    }

    /// The Interrupt Pin.
    pub fn pin(&self) -> IntxPin {
        self.pin
    }

    /// The Interrupt Line (written by the guest, meaningless to the device).
    pub fn line(&self) -> u8 {
        self.line
    }

    /// Records a guest write of the Interrupt Line register.
    pub fn set_line(&mut self, line: u8) {
        self.line = line;
    }

    /// Whether the device model holds the line asserted.
    pub fn asserted(&self) -> bool {
        self.asserted
    }

    /// Whether the command register's Interrupt Disable bit is set.
    pub fn masked(&self) -> bool {
        self.disabled
    }

    /// The status register bits this state owns ([`STATUS_INTERRUPT`] when asserted): merge
    /// them with `(status & !STATUS_INTERRUPT) | bits`.
    pub fn status_bits(&self) -> u16 {
        if self.asserted {
            STATUS_INTERRUPT
        } else {
            0
        }
    }

    /// The bound group, if any.
    pub fn group(&self) -> Option<&Arc<dyn InterruptSourceGroup>> {
        self.group.as_ref()
    }

    /// Binds a fresh INTx group (disabled, masked): enables it, unmasks vector 0 unless
    /// Interrupt Disable is set, and delivers an assertion already held. The previous group,
    /// if any, is left as it is. `None` unbinds.
    pub fn set_group(&mut self, group: Option<Arc<dyn InterruptSourceGroup>>) -> Result<()> {
        self.group = group;
        let Some(group) = &self.group else {
            return Ok(());
        };
        group.enable()?;
        if !self.disabled {
            group.update(0, MsiRoute::default(), false)?;
            if self.asserted && self.pin != IntxPin::None {
                group.trigger(0)?;
            }
        }
        Ok(())
    }

    /// Records the guest's command register value: its Interrupt Disable bit masks vector 0.
    /// Clearing it while the line is asserted delivers the interrupt.
    pub fn set_command(&mut self, command: u16) -> Result<()> {
        let disabled = command & COMMAND_INTX_DISABLE != 0;
        if disabled == self.disabled {
            return Ok(());
        }
        self.disabled = disabled;
        let Some(group) = &self.group else {
            return Ok(());
        };
        group.update(0, MsiRoute::default(), disabled)?;
        if !disabled && self.asserted && self.pin != IntxPin::None {
            group.trigger(0)?;
        }
        Ok(())
    }

    /// The device model asserts its INTx line. Delivered on a rising edge when not disabled;
    /// pending (held asserted, reflected in Interrupt Status) when disabled; dropped when the
    /// function has no pin, no group is bound, or the line was already asserted.
    pub fn assert_line(&mut self) -> Result<Delivery> {
        if self.pin == IntxPin::None {
            return Ok(Delivery::Dropped);
        }
        let rising = !self.asserted;
        self.asserted = true;
        if self.disabled {
            return Ok(Delivery::Pending);
        }
        match &self.group {
            Some(group) if rising => {
                group.trigger(0)?;
                Ok(Delivery::Delivered)
            }
            _ => Ok(Delivery::Dropped),
        }
    }

    /// The device model deasserts its INTx line.
    pub fn deassert_line(&mut self) {
        self.asserted = false;
    }

    /// Returns to the reset state (deasserted, Interrupt Disable clear, line 0), unmasking the
    /// bound group's vector if Interrupt Disable was set.
    pub fn reset(&mut self) -> Result<()> {
        self.asserted = false;
        self.line = 0;
        self.set_command(0)
    }

    /// Snapshot of the state.
    pub fn snapshot(&self) -> IntxSnapshot {
        IntxSnapshot {
            pin: self.pin,
            line: self.line,
            asserted: self.asserted,
            disabled: self.disabled,
        }
    }

    /// Restores a snapshot of a function with the same pin and pushes the mask to the bound
    /// group (an assertion held while unmasked is delivered again).
    pub fn restore(&mut self, snap: &IntxSnapshot) -> Result<()> {
        if snap.pin != self.pin {
            return Err(Error::SnapshotMismatch {
                capability: "INTx",
                reason: "interrupt pin differs",
            });
        }
        self.line = snap.line;
        self.asserted = snap.asserted && snap.pin != IntxPin::None;
        self.disabled = snap.disabled;
        let Some(group) = self.group.clone() else {
            return Ok(());
        };
        let mut first = None;
        keep_first(
            &mut first,
            group.update(0, MsiRoute::default(), self.disabled),
        );
        if !self.disabled && self.asserted {
            keep_first(&mut first, group.trigger(0));
        }
        first.map_or(Ok(()), Err)
    }
}

impl fmt::Debug for IntxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntxState")
            .field("snapshot", &self.snapshot())
            .field("group_bound", &self.group.is_some())
            .finish()
    }
}
