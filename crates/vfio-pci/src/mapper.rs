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
    /// `host` stays valid until [`GuestMapper::unmap`] is called with the
    /// returned id: the device owns the host mapping and unmaps it only
    /// after. An error of kind [`std::io::ErrorKind::Unsupported`] tells the
    /// device to trap that range instead; any other error fails the request.
    fn map(
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
    fn map(&self, _: u64, _: u64, _: *mut u8, _: bool) -> std::io::Result<MappingId> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this VMM traps every BAR access",
        ))
    }

    fn unmap(&self, _: MappingId) -> std::io::Result<()> {
        Ok(())
    }
}
