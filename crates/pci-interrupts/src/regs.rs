//! Byte-image register helpers shared by the MSI and MSI-X capabilities, and the per-vector
//! reconciliation with an [`InterruptSourceGroup`].

use std::sync::Arc;

use crate::{Delivery, Error, InterruptSourceGroup, MsiRoute, Result};

/// Start of `offset..offset + len` as an index, if that range is non-empty and inside `0..size`.
pub(crate) fn checked_range(offset: u64, len: usize, size: usize) -> Option<usize> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (len > 0 && end <= size).then_some(start)
}

/// Copies `image[offset..]` into `data`. Returns false (and fills `data` with ones) when the
/// access does not fit.
pub(crate) fn read_image(image: &[u8], offset: u64, data: &mut [u8]) -> bool {
    let src = checked_range(offset, data.len(), image.len())
        .and_then(|start| image.get(start..start.checked_add(data.len())?));
    match src {
        Some(src) => {
            data.copy_from_slice(src);
            true
        }
        None => {
            data.fill(0xff);
            false
        }
    }
}

/// Merges `data` into `image[offset..]` through the writable-bit mask `wmask` (same length as
/// `image`). Returns false, changing nothing, when the access does not fit.
pub(crate) fn write_image(image: &mut [u8], wmask: &[u8], offset: u64, data: &[u8]) -> bool {
    let Some(start) = checked_range(offset, data.len(), image.len()) else {
        return false;
    };
    let regs = image.iter_mut().skip(start).zip(wmask.iter().skip(start));
    for ((reg, mask), byte) in regs.zip(data) {
        *reg = (*reg & !mask) | (byte & mask);
    }
    true
}

/// Little-endian u16 at `offset` of `image` (0 when out of range).
pub(crate) fn le16(image: &[u8], offset: usize) -> u16 {
    image
        .get(offset..offset.saturating_add(2))
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map_or(0, u16::from_le_bytes)
}

/// Little-endian u32 at `offset` of `image` (0 when out of range).
pub(crate) fn le32(image: &[u8], offset: usize) -> u32 {
    image
        .get(offset..offset.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

/// Stores `value` little-endian at `offset` of `image` (ignored when out of range).
pub(crate) fn put_le(image: &mut [u8], offset: usize, value: &[u8]) {
    if let Some(dst) = image.get_mut(offset..offset.saturating_add(value.len())) {
        dst.copy_from_slice(value);
    }
}

/// Keeps the first error of a sequence of group calls that must all be attempted.
pub(crate) fn keep_first(first: &mut Option<Error>, result: Result<()>) {
    if let Err(e) = result {
        log::warn!("interrupt group call failed: {e}");
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// What the group was last told about each vector: `Some(route)` = unmasked with that route,
/// `None` = masked (the state after creation and after `disable`).
pub(crate) type Pushed = Option<MsiRoute>;

/// Brings one vector of `group` to `desired` (see [`Pushed`]), calling `update` only when it
/// differs from what the group has. Returns whether the vector is unmasked at the group.
pub(crate) fn push_vector(
    group: &dyn InterruptSourceGroup,
    vector: u32,
    pushed: &mut Pushed,
    desired: Pushed,
    route: MsiRoute,
) -> Result<bool> {
    if *pushed != desired {
        match desired {
            Some(r) => group.update(vector, r, false)?,
            None => group.update(vector, route, true)?,
        }
        *pushed = desired;
    }
    Ok(pushed.is_some())
}

/// Delivers an unmasked `vector` that fired: triggered through the group when
/// the group is enabled and the vector's route was pushed, else dropped (and
/// logged; `what` names the capability).
pub(crate) fn trigger_unmasked(
    group: Option<&Arc<dyn InterruptSourceGroup>>,
    group_enabled: bool,
    pushed: &[Pushed],
    vector: u32,
    what: &str,
) -> Result<Delivery> {
    let routed = pushed.get(vector as usize).copied().flatten().is_some();
    match group {
        Some(group) if group_enabled && routed => {
            group.trigger(vector)?;
            Ok(Delivery::Delivered)
        }
        _ => {
            log::debug!("{what}: vector {vector} fired without a bound, enabled group");
            Ok(Delivery::Dropped)
        }
    }
}
