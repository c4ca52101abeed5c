//! What the VMM provides to put device memory straight into the guest.

/// Identifies one guest mapping made by a [`GuestMapper`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingId(pub u64);

/// Maps host memory (mmapped device BARs) at guest physical addresses, so
/// the guest reaches them with no VM exit. With KVM this is a user memory
/// slot; other hypervisors have their equivalent.
pub trait GuestMapper: Send + Sync {
    /// Makes `size` bytes at `host` visible to the guest at `gpa`.
    ///
    /// An error of kind [`std::io::ErrorKind::Unsupported`] tells the
    /// device to trap that range instead; any other error fails the request.
    ///
    /// # Safety
    ///
    /// `host .. host + size` is memory mapped in this process (readable,
    /// and writable unless `read_only`) that stays mapped, at its size,
    /// until [`GuestMapper::unmap`] with the returned id has returned: the
    /// device owns the host mapping and unmaps it only after. The guest
    /// reads and writes it at any time, so nothing in this process holds a
    /// Rust reference into it. An implementation may rely on this (KVM
    /// hands the range to the guest as a memory slot).
    unsafe fn map(
        &self,
        gpa: u64,
        size: u64,
        host: *mut u8,
        read_only: bool,
    ) -> std::io::Result<MappingId>;

    /// Removes a mapping made by [`GuestMapper::map`].
    fn unmap(&self, id: MappingId) -> std::io::Result<()>;
}

/// A [`GuestMapper`] that maps nothing: every BAR access then traps to
/// `read_bar` / `write_bar`. For VMMs without memory slots, and for tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapAllMapper;

impl GuestMapper for TrapAllMapper {
    unsafe fn map(&self, _: u64, _: u64, _: *mut u8, _: bool) -> std::io::Result<MappingId> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this VMM traps every BAR access",
        ))
    }

    fn unmap(&self, _: MappingId) -> std::io::Result<()> {
        Ok(())
    }
}
