//! Places PCI BARs in a VMM's mmio32, mmio64 and I/O windows with natural alignment.
//!
//! A [`BarAllocator`] owns the address windows the VMM sets aside for device BARs and hands out
//! [`BarPlacement`]s for [`BarRequest`]s, following the PCI rules a guest's own enumeration
//! would follow:
//!
//! * **Natural alignment.** A BAR decodes `size` bytes starting at a multiple of `size` (the
//!   low bits of the BAR register are read-only zero), so every placement's base is a multiple
//!   of its size, for any size up to 2^63 bytes.
//! * **Page rounding.** A memory BAR that will be mmap-ed into the guest is enlarged to at least
//!   one host page (the host's own size, [`host_page_size`]: 4 KiB on x86, up to 64 KiB on arm64) so the mapping does not expose a
//!   neighbour. The VMM must then report the rounded [`BarPlacement::size`] to the guest when it
//!   sizes the BAR, so the guest's own alignment matches ours.
//! * **Which window.** I/O BARs go in the io window; 32-bit memory BARs in mmio32 only (they can
//!   only hold a 32-bit address). 64-bit *prefetchable* BARs go above 4 GiB in mmio64, falling
//!   back to mmio32 when mmio64 is absent or full. 64-bit *non-prefetchable* BARs go in mmio32
//!   first: PCI-to-PCI bridges forward non-prefetchable memory only through their 32-bit memory
//!   window (PCI-to-PCI Bridge spec, Memory Base/Limit), so this is where a guest re-enumerating
//!   the hierarchy would put them; as the device itself decodes 64-bit addresses and our devices
//!   sit on the root bus, they fall back to mmio64 when mmio32 is absent or full.
//!
//! The guest may reprogram a BAR ([`BarAllocator::relocate`]): the move is accepted only into a
//! free, naturally aligned range of a window that can hold that kind of BAR, and a refused move
//! changes nothing. [`BarAllocator::snapshot`] / [`BarAllocator::restore`] re-place every BAR
//! exactly.
//!
//! Free space is managed by `vm-allocator`'s [`AddressAllocator`] (one per window); this crate
//! keeps its own record of live placements to answer queries without allocating and to check
//! overlaps before asking `vm-allocator` for an exact range.

mod error;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use vm_allocator::{AddressAllocator, AllocPolicy};

pub use error::{Error, Result};

/// The host's page size, as `sysconf(_SC_PAGESIZE)` reports it: 4 KiB on
/// x86, 4, 16 or 64 KiB on arm64. Never assume 4 KiB: BAR ranges are mapped
/// into the guest in whole host pages.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a
    // configuration value.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v)
        .ok()
        .filter(|v| v.is_power_of_two())
        .unwrap_or(MIN_PAGE_SIZE)
}

/// The smallest page size of any host we run on (4 KiB), used only when
/// the host will not say its own.
pub const MIN_PAGE_SIZE: u64 = 4096;
/// The first address that does not fit in 32 bits.
pub const FOUR_GIB: u64 = 1 << 32;
/// Size of the x86 I/O port space.
pub const IO_SPACE_SIZE: u64 = 1 << 16;
/// Version of the snapshot payload written by [`BarAllocator::snapshot`].
pub const SNAPSHOT_VERSION: u32 = 1;

/// Smallest I/O BAR: bits 1:0 of an I/O BAR are not address bits (PCI Local Bus 3.0, 6.2.5.1).
pub const MIN_IO_BAR_SIZE: u64 = 4;
/// Smallest memory BAR: bits 3:0 of a memory BAR are not address bits (PCI Local Bus 3.0, 6.2.5.1).
pub const MIN_MEM_BAR_SIZE: u64 = 16;
/// Largest BAR a 32-bit BAR register (memory or I/O) can describe.
pub const MAX_32BIT_BAR_SIZE: u64 = 1 << 31;
/// Largest BAR a 64-bit BAR register pair can describe.
pub const MAX_64BIT_BAR_SIZE: u64 = 1 << 63;

/// One of the VMM's BAR windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Window {
    /// Memory window below 4 GiB.
    Mmio32,
    /// Memory window for 64-bit BARs (normally above 4 GiB).
    Mmio64,
    /// I/O port window.
    Io,
}

impl Window {
    /// The address space the window lives in (memory windows share one).
    pub fn space(self) -> AddressSpace {
        match self {
            Window::Mmio32 | Window::Mmio64 => AddressSpace::Memory,
            Window::Io => AddressSpace::Io,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Window::Mmio32 => "mmio32",
            Window::Mmio64 => "mmio64",
            Window::Io => "io",
        })
    }
}

/// PCI address space: memory and I/O are separate, so an io range never overlaps memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressSpace {
    /// Memory space (mmio32 and mmio64 windows).
    Memory,
    /// I/O space (io window).
    Io,
}

/// A window as `base` and `size` (bytes, or ports for io).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressWindow {
    /// First address of the window.
    pub base: u64,
    /// Number of bytes in the window.
    pub size: u64,
}

impl AddressWindow {
    /// A window of `size` bytes starting at `base`.
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// Last address of the window (inclusive), or `None` if it is empty or wraps.
    pub fn last(&self) -> Option<u64> {
        self.base.checked_add(self.size.checked_sub(1)?)
    }

    /// True if `[base, base + size)` is non-empty and lies entirely inside the window.
    pub fn contains_range(&self, base: u64, size: u64) -> bool {
        size != 0
            && base >= self.base
            && u128::from(base) + u128::from(size) <= u128::from(self.base) + u128::from(self.size)
    }
}

/// The windows the VMM gives the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BarWindows {
    /// Memory window that must end below 4 GiB; always present.
    pub mmio32: AddressWindow,
    /// Memory window for 64-bit BARs, if the VMM has one.
    pub mmio64: Option<AddressWindow>,
    /// I/O port window inside the 64 KiB I/O space, if the VMM has one.
    pub io: Option<AddressWindow>,
}

impl BarWindows {
    /// Windows with only the (mandatory) 32-bit memory window; add the others with
    /// [`with_mmio64`](Self::with_mmio64) and [`with_io`](Self::with_io).
    pub const fn new(mmio32: AddressWindow) -> Self {
        Self {
            mmio32,
            mmio64: None,
            io: None,
        }
    }

    /// Returns the windows with a 64-bit memory window.
    #[must_use]
    pub const fn with_mmio64(mut self, mmio64: AddressWindow) -> Self {
        self.mmio64 = Some(mmio64);
        self
    }

    /// Returns the windows with an I/O port window.
    #[must_use]
    pub const fn with_io(mut self, io: AddressWindow) -> Self {
        self.io = Some(io);
        self
    }

    /// Checks the windows: each non-empty and not wrapping, mmio32 ending below 4 GiB, io inside
    /// the 64 KiB I/O space, and mmio32 and mmio64 not overlapping.
    pub fn validate(&self) -> Result<()> {
        let mmio32_last = check_window(Window::Mmio32, &self.mmio32)?;
        if mmio32_last >= FOUR_GIB {
            return Err(Error::Mmio32Above4G {
                base: self.mmio32.base,
                last: mmio32_last,
            });
        }
        if let Some(w) = &self.mmio64 {
            let last = check_window(Window::Mmio64, w)?;
            if w.base <= mmio32_last && self.mmio32.base <= last {
                return Err(Error::WindowsOverlap {
                    a: Window::Mmio32,
                    b: Window::Mmio64,
                });
            }
        }
        if let Some(w) = &self.io {
            let last = check_window(Window::Io, w)?;
            if last >= IO_SPACE_SIZE {
                return Err(Error::IoWindowOutOfRange { base: w.base, last });
            }
        }
        Ok(())
    }

    /// The window named `window`, if configured.
    pub fn get(&self, window: Window) -> Option<&AddressWindow> {
        match window {
            Window::Mmio32 => Some(&self.mmio32),
            Window::Mmio64 => self.mmio64.as_ref(),
            Window::Io => self.io.as_ref(),
        }
    }
}

fn check_window(window: Window, w: &AddressWindow) -> Result<u64> {
    if w.size == 0 {
        return Err(Error::EmptyWindow { window });
    }
    w.last().ok_or(Error::WindowOverflow {
        window,
        base: w.base,
        size: w.size,
    })
}

/// The type of a BAR, as encoded in its low bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarKind {
    /// I/O space BAR.
    Io,
    /// Memory BAR with a 32-bit address (type 00b).
    Mem32,
    /// Memory BAR with a 64-bit address spanning two BAR registers (type 10b).
    Mem64,
}

impl BarKind {
    /// Every window this kind of BAR may be placed in (for allocation and guest relocation).
    pub fn eligible_windows(self) -> &'static [Window] {
        match self {
            BarKind::Io => &[Window::Io],
            BarKind::Mem32 => &[Window::Mmio32],
            BarKind::Mem64 => &[Window::Mmio64, Window::Mmio32],
        }
    }

    fn size_limits(self) -> (u64, u64) {
        match self {
            BarKind::Io => (MIN_IO_BAR_SIZE, MAX_32BIT_BAR_SIZE),
            BarKind::Mem32 => (MIN_MEM_BAR_SIZE, MAX_32BIT_BAR_SIZE),
            BarKind::Mem64 => (MIN_MEM_BAR_SIZE, MAX_64BIT_BAR_SIZE),
        }
    }
}

impl fmt::Display for BarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BarKind::Io => "I/O",
            BarKind::Mem32 => "32-bit memory",
            BarKind::Mem64 => "64-bit memory",
        })
    }
}

/// What a device's BAR needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BarRequest {
    /// BAR type.
    pub kind: BarKind,
    /// Prefetchable bit of a memory BAR (ignored for I/O BARs).
    pub prefetchable: bool,
    /// BAR size in bytes as the device reports it: a power of two.
    pub size: u64,
    /// The VMM will mmap the BAR into the guest, so it is rounded up to a whole host page
    /// (ignored for I/O BARs, which cannot be mapped).
    pub mmappable: bool,
}

impl BarRequest {
    /// A request for a BAR of `kind` and `size`, not prefetchable and not mmapped; set those
    /// with [`with_prefetchable`](Self::with_prefetchable) and
    /// [`with_mmappable`](Self::with_mmappable).
    pub const fn new(kind: BarKind, size: u64) -> Self {
        Self {
            kind,
            prefetchable: false,
            size,
            mmappable: false,
        }
    }

    /// Returns the request with the prefetchable bit set as given.
    #[must_use]
    pub const fn with_prefetchable(mut self, prefetchable: bool) -> Self {
        self.prefetchable = prefetchable;
        self
    }

    /// Returns the request with `mmappable` set as given.
    #[must_use]
    pub const fn with_mmappable(mut self, mmappable: bool) -> Self {
        self.mmappable = mmappable;
        self
    }

    /// Checks the size against the PCI rules for the kind: a power of two, at least 4 bytes for
    /// I/O and 16 bytes for memory, at most 2 GiB for 32-bit registers and 2^63 for 64-bit ones.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason| Error::InvalidBarSize {
            kind: self.kind,
            size: self.size,
            reason,
        };
        if !self.size.is_power_of_two() {
            return Err(bad("not a power of two"));
        }
        let (min, max) = self.kind.size_limits();
        if self.size < min {
            return Err(bad("below the minimum BAR size for this kind"));
        }
        if self.size > max {
            return Err(bad("larger than the BAR register can describe"));
        }
        Ok(())
    }

    /// Windows to try, in order: see the crate documentation for the rules.
    fn preferred_windows(&self) -> &'static [Window] {
        match (self.kind, self.prefetchable) {
            (BarKind::Io, _) => &[Window::Io],
            (BarKind::Mem32, _) => &[Window::Mmio32],
            (BarKind::Mem64, true) => &[Window::Mmio64, Window::Mmio32],
            (BarKind::Mem64, false) => &[Window::Mmio32, Window::Mmio64],
        }
    }
}

/// Where a BAR was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarPlacement {
    /// Guest address (or port) of the BAR; a multiple of `size`.
    pub base: u64,
    /// Bytes reserved for the BAR: the requested size, rounded up to a host page for mmap-able
    /// memory BARs. The VMM reports this size to the guest when it sizes the BAR.
    pub size: u64,
    /// Window holding the BAR.
    pub window: Window,
    /// BAR type.
    pub kind: BarKind,
    /// Prefetchable bit of the request.
    pub prefetchable: bool,
    /// Size the device asked for (`<= size`).
    pub requested_size: u64,
}

impl BarPlacement {
    /// Last address of the placement (inclusive), or `None` for an empty or wrapping placement.
    pub fn last(&self) -> Option<u64> {
        AddressWindow::new(self.base, self.size).last()
    }

    /// True if `[addr, addr + len)` is non-empty and lies entirely inside this placement.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        AddressWindow::new(self.base, self.size).contains_range(addr, len)
    }

    /// True if both placements are in the same address space and share at least one address.
    pub fn overlaps(&self, other: &BarPlacement) -> bool {
        self.window.space() == other.window.space()
            && ranges_overlap(self.base, self.size, other.base, other.size)
    }
}

fn ranges_overlap(a: u64, a_size: u64, b: u64, b_size: u64) -> bool {
    a_size != 0
        && b_size != 0
        && u128::from(a) < u128::from(b) + u128::from(b_size)
        && u128::from(b) < u128::from(a) + u128::from(a_size)
}

/// Serializable allocator state: the windows, page size and every live placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarAllocatorState {
    /// Windows the allocator was built with.
    pub windows: BarWindows,
    /// Host page size used for rounding.
    pub page_size: u64,
    /// Live placements, ordered by window then base.
    pub placements: Vec<BarPlacement>,
}

/// The snapshot envelope: pci-config's, the one of the workspace (format version, then
/// payload; [`SNAPSHOT_VERSION`] for [`BarAllocatorState`]).
pub use pci_config::Versioned;

/// Free space and live placements of one window.
#[derive(Debug)]
struct WindowState {
    range: AddressWindow,
    free: AddressAllocator,
    /// Live placements keyed by base; never overlapping.
    live: BTreeMap<u64, BarPlacement>,
}

impl WindowState {
    fn new(window: Window, range: AddressWindow) -> Result<Self> {
        let free =
            AddressAllocator::new(range.base, range.size).map_err(|source| Error::Allocator {
                window,
                base: range.base,
                size: range.size,
                source,
            })?;
        Ok(Self {
            range,
            free,
            live: BTreeMap::new(),
        })
    }

    /// The live placement that could overlap or contain `[addr, ...)`: the one with the highest
    /// base not above `last`. Because live placements never overlap, it is the only candidate.
    fn candidate(&self, last: u64) -> Option<&BarPlacement> {
        self.live.range(..=last).next_back().map(|(_, p)| p)
    }

    /// The live placement overlapping `[base, base + size)`, if any.
    fn overlapping(&self, base: u64, size: u64) -> Option<&BarPlacement> {
        let last = AddressWindow::new(base, size).last()?;
        self.candidate(last)
            .filter(|p| ranges_overlap(p.base, p.size, base, size))
    }
}

/// Places BARs in the VMM's windows; see the crate documentation for the rules.
#[derive(Debug)]
pub struct BarAllocator {
    windows: BarWindows,
    page_size: u64,
    mmio32: WindowState,
    mmio64: Option<WindowState>,
    io: Option<WindowState>,
}

impl BarAllocator {
    /// An allocator over `windows` for this host's page size
    /// ([`host_page_size`]).
    pub fn new(windows: BarWindows) -> Result<Self> {
        Self::with_page_size(windows, host_page_size())
    }

    /// An allocator over `windows` for a host whose page size is `page_size` (a power of two).
    pub fn with_page_size(windows: BarWindows, page_size: u64) -> Result<Self> {
        if !page_size.is_power_of_two() {
            return Err(Error::InvalidPageSize(page_size));
        }
        windows.validate()?;
        Ok(Self {
            windows,
            page_size,
            mmio32: WindowState::new(Window::Mmio32, windows.mmio32)?,
            mmio64: windows
                .mmio64
                .map(|w| WindowState::new(Window::Mmio64, w))
                .transpose()?,
            io: windows
                .io
                .map(|w| WindowState::new(Window::Io, w))
                .transpose()?,
        })
    }

    /// The windows the allocator manages.
    pub fn windows(&self) -> &BarWindows {
        &self.windows
    }

    /// The host page size used to round mmap-able BARs.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    fn state(&self, window: Window) -> Option<&WindowState> {
        match window {
            Window::Mmio32 => Some(&self.mmio32),
            Window::Mmio64 => self.mmio64.as_ref(),
            Window::Io => self.io.as_ref(),
        }
    }

    fn state_mut(&mut self, window: Window) -> Option<&mut WindowState> {
        match window {
            Window::Mmio32 => Some(&mut self.mmio32),
            Window::Mmio64 => self.mmio64.as_mut(),
            Window::Io => self.io.as_mut(),
        }
    }

    /// The number of bytes reserved for `request`: its size, raised to one host page for an
    /// mmap-able memory BAR. Both are powers of two, so the result is one too.
    pub fn placement_size(&self, request: &BarRequest) -> u64 {
        if request.kind != BarKind::Io && request.mmappable {
            request.size.max(self.page_size)
        } else {
            request.size
        }
    }

    /// Places a BAR: the base is a multiple of the (page-rounded) size, inside the first window
    /// of the BAR's preference order with room for it.
    pub fn allocate(&mut self, request: BarRequest) -> Result<BarPlacement> {
        request.validate()?;
        let size = self.placement_size(&request);
        let mut tried: [Option<Window>; 2] = [None, None];
        for (i, &window) in request.preferred_windows().iter().enumerate() {
            let Some(state) = self.state_mut(window) else {
                continue;
            };
            match state.free.allocate(size, size, AllocPolicy::FirstMatch) {
                Ok(range) => {
                    let placement = BarPlacement {
                        base: range.start(),
                        size,
                        window,
                        kind: request.kind,
                        prefetchable: request.prefetchable,
                        requested_size: request.size,
                    };
                    state.live.insert(placement.base, placement);
                    log::debug!(
                        "placed {} BAR of {size:#x} at {:#x} in {window}",
                        request.kind,
                        placement.base
                    );
                    return Ok(placement);
                }
                Err(e) => {
                    if e != vm_allocator::Error::ResourceNotAvailable {
                        log::warn!("vm-allocator: {window} window, size {size:#x}: {e}");
                    }
                    if let Some(slot) = tried.get_mut(i) {
                        *slot = Some(window);
                    }
                }
            }
        }
        let mut tried = tried.into_iter().flatten();
        match tried.next() {
            None => Err(Error::NoWindow { kind: request.kind }),
            Some(window) => Err(Error::WindowFull {
                window,
                size,
                also_tried: tried.next(),
            }),
        }
    }

    /// Frees a live placement so its range can be reused.
    pub fn release(&mut self, placement: &BarPlacement) -> Result<()> {
        let not_allocated = Error::NotAllocated {
            window: placement.window,
            base: placement.base,
            size: placement.size,
        };
        let state = self
            .state_mut(placement.window)
            .ok_or_else(|| not_allocated.clone())?;
        if state.live.get(&placement.base) != Some(placement) {
            return Err(not_allocated);
        }
        free_range(state, placement.window, placement.base, placement.size)?;
        state.live.remove(&placement.base);
        log::debug!(
            "released BAR {:#x}+{:#x} in {}",
            placement.base,
            placement.size,
            placement.window
        );
        Ok(())
    }

    /// Moves a live placement to `new_base`, as when the guest reprograms the BAR. Accepted
    /// only if the new range `[new_base, new_base + old.size)` is naturally aligned, inside a
    /// window that can hold this kind of BAR (mmio32 or mmio64 for a 64-bit BAR, mmio32 for a
    /// 32-bit one, io for an I/O BAR) and free. On refusal nothing changes and `old` stays live.
    pub fn relocate(&mut self, old: &BarPlacement, new_base: u64) -> Result<BarPlacement> {
        let live = self
            .state(old.window)
            .and_then(|s| s.live.get(&old.base))
            .is_some_and(|p| p == old);
        if !live {
            return Err(Error::NotAllocated {
                window: old.window,
                base: old.base,
                size: old.size,
            });
        }
        let window = self.check_target(old.kind, new_base, old.size)?;
        if window == old.window && new_base == old.base {
            return Ok(*old);
        }
        // Naturally aligned ranges of the same size are equal or disjoint, so `old` itself can
        // never be reported as the overlap here.
        self.take_exact(old.kind, window, new_base, old.size)?;
        let new = BarPlacement {
            base: new_base,
            window,
            ..*old
        };
        if let Err(e) = self.release(old) {
            // Undo the reservation so a refusal leaves no trace.
            if let Some(state) = self.state_mut(window) {
                if let Err(undo) = free_range(state, window, new_base, old.size) {
                    log::error!("could not undo reservation of {new_base:#x} in {window}: {undo}");
                }
            }
            return Err(e);
        }
        if let Some(state) = self.state_mut(window) {
            state.live.insert(new_base, new);
        }
        log::debug!(
            "moved BAR {:#x}+{:#x} from {} to {new_base:#x} in {window}",
            old.base,
            old.size,
            old.window
        );
        Ok(new)
    }

    /// Re-places a BAR exactly where `placement` says (e.g. from a snapshot). Fails if the size
    /// is not a power of two at least `requested_size`, the base is not naturally aligned, the
    /// window cannot hold that kind of BAR or is not configured, or the range is taken.
    pub fn reserve_exact(&mut self, placement: &BarPlacement) -> Result<()> {
        BarRequest {
            kind: placement.kind,
            prefetchable: placement.prefetchable,
            size: placement.requested_size,
            mmappable: false,
        }
        .validate()?;
        if !placement.size.is_power_of_two() || placement.size < placement.requested_size {
            return Err(Error::InvalidBarSize {
                kind: placement.kind,
                size: placement.size,
                reason: "placement size is not a power of two covering the requested size",
            });
        }
        let window = self.check_target(placement.kind, placement.base, placement.size)?;
        if window != placement.window {
            return Err(Error::OutsideWindow {
                base: placement.base,
                size: placement.size,
                kind: placement.kind,
            });
        }
        self.take_exact(placement.kind, window, placement.base, placement.size)?;
        if let Some(state) = self.state_mut(window) {
            state.live.insert(placement.base, *placement);
        }
        Ok(())
    }

    /// Checks alignment and finds the window eligible for `kind` holding the range.
    fn check_target(&self, kind: BarKind, base: u64, size: u64) -> Result<Window> {
        if size == 0 || base % size != 0 {
            return Err(Error::Misaligned { base, size });
        }
        kind.eligible_windows()
            .iter()
            .copied()
            .find(|&w| {
                self.state(w)
                    .is_some_and(|s| s.range.contains_range(base, size))
            })
            .ok_or(Error::OutsideWindow { base, size, kind })
    }

    /// Reserves `[base, base + size)` in `window` in `vm-allocator` after checking our own record
    /// for overlaps. Does not add a live placement.
    fn take_exact(&mut self, kind: BarKind, window: Window, base: u64, size: u64) -> Result<()> {
        let state = self
            .state_mut(window)
            .ok_or(Error::OutsideWindow { base, size, kind })?;
        if let Some(other) = state.overlapping(base, size) {
            return Err(Error::Overlap {
                window,
                base,
                size,
                other_base: other.base,
                other_size: other.size,
            });
        }
        state
            .free
            .allocate(size, size, AllocPolicy::ExactMatch(base))
            .map_err(|source| Error::Allocator {
                window,
                base,
                size,
                source,
            })?;
        Ok(())
    }

    /// The live placement in `space` that contains all of `[addr, addr + len)`, if any.
    /// Does not allocate; suitable for the VMM's access paths.
    pub fn find(&self, space: AddressSpace, addr: u64, len: u64) -> Option<&BarPlacement> {
        let last = AddressWindow::new(addr, len).last()?;
        let windows: &[Window] = match space {
            AddressSpace::Memory => &[Window::Mmio32, Window::Mmio64],
            AddressSpace::Io => &[Window::Io],
        };
        windows
            .iter()
            .filter_map(|&w| self.state(w))
            .filter_map(|s| s.candidate(last))
            .find(|p| p.contains(addr, len))
    }

    /// True if `[addr, addr + len)` lies entirely inside one allocated BAR in `space`.
    pub fn contains(&self, space: AddressSpace, addr: u64, len: u64) -> bool {
        self.find(space, addr, len).is_some()
    }

    /// The live placement in `window` starting at `base`, if any.
    pub fn placement_at(&self, window: Window, base: u64) -> Option<&BarPlacement> {
        self.state(window).and_then(|s| s.live.get(&base))
    }

    /// True if `[base, base + size)` lies inside `window` and overlaps no live placement.
    pub fn is_free(&self, window: Window, base: u64, size: u64) -> bool {
        self.state(window).is_some_and(|s| {
            s.range.contains_range(base, size) && s.overlapping(base, size).is_none()
        })
    }

    /// Every live placement, ordered by window (mmio32, mmio64, io) then base.
    pub fn placements(&self) -> impl Iterator<Item = &BarPlacement> + '_ {
        [Window::Mmio32, Window::Mmio64, Window::Io]
            .into_iter()
            .filter_map(|w| self.state(w))
            .flat_map(|s| s.live.values())
    }

    /// The allocator's state in a versioned envelope.
    pub fn snapshot(&self) -> Versioned<BarAllocatorState> {
        Versioned::new(
            SNAPSHOT_VERSION,
            BarAllocatorState {
                windows: self.windows,
                page_size: self.page_size,
                placements: self.placements().copied().collect(),
            },
        )
    }

    /// Rebuilds an allocator from a snapshot, re-placing every BAR at its recorded base.
    /// The snapshot is checked like fresh input (windows, sizes, alignment, overlaps).
    pub fn restore(snapshot: &Versioned<BarAllocatorState>) -> Result<Self> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(Error::UnsupportedSnapshotVersion {
                found: snapshot.version,
                expected: SNAPSHOT_VERSION,
            });
        }
        let state = &snapshot.payload;
        let mut alloc = Self::with_page_size(state.windows, state.page_size)?;
        for p in &state.placements {
            alloc.reserve_exact(p)?;
        }
        Ok(alloc)
    }
}

/// Returns `[base, base + size)` to `vm-allocator`'s free space.
fn free_range(state: &mut WindowState, window: Window, base: u64, size: u64) -> Result<()> {
    let err = |source| Error::Allocator {
        window,
        base,
        size,
        source,
    };
    let last = AddressWindow::new(base, size)
        .last()
        .ok_or(err(vm_allocator::Error::Overflow))?;
    let range = vm_allocator::RangeInclusive::new(base, last).map_err(err)?;
    state.free.free(&range).map_err(err)
}
