//! [`HostIommu`]: the one host IOMMU context of a VMM (or of one guest
//! address space), shared by all its kernel devices: one legacy container
//! or one iommufd IOAS, with the [`GuestDma`] that maps guest RAM into it.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[cfg(feature = "iommufd")]
use vfio_backend::kernel::IommufdIoas;
use vfio_backend::kernel::{KernelContainer, KernelDevice};
use vfio_backend::{DomainId, IommuDomain};
use vfio_pci::GuestDma;

use crate::builder::{resolve_mode, sysfs_hint, KernelMode};
use crate::error::{Error, Result};

impl std::fmt::Display for KernelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelMode::Auto => "auto",
            KernelMode::Legacy => "legacy (type1v2 container)",
            KernelMode::Iommufd => "iommufd (IOAS + vfio cdev)",
            KernelMode::NoIommu => "no-IOMMU (container)",
        })
    }
}

/// The kernel object behind a [`HostIommu`] once it exists.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum HostDomain {
    /// A legacy VFIO container (type1v2, or no-IOMMU: see
    /// [`KernelContainer::mode`]).
    Container(Arc<KernelContainer>),
    /// An iommufd I/O address space.
    #[cfg(feature = "iommufd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "iommufd")))]
    Ioas(Arc<IommufdIoas>),
}

impl HostDomain {
    fn mode(&self) -> KernelMode {
        match self {
            HostDomain::Container(c) => match c.mode() {
                vfio_backend::kernel::IommuMode::Type1v2 => KernelMode::Legacy,
                vfio_backend::kernel::IommuMode::NoIommu => KernelMode::NoIommu,
            },
            #[cfg(feature = "iommufd")]
            HostDomain::Ioas(_) => KernelMode::Iommufd,
        }
    }

    fn id(&self) -> DomainId {
        match self {
            HostDomain::Container(c) => c.id(),
            #[cfg(feature = "iommufd")]
            HostDomain::Ioas(i) => i.id(),
        }
    }

    fn open_device(&self, path: &Path) -> vfio_backend::Result<KernelDevice> {
        match self {
            HostDomain::Container(c) => c.open_device(path),
            #[cfg(feature = "iommufd")]
            HostDomain::Ioas(i) => i.open_device(path),
        }
    }
}

#[derive(Debug)]
struct State {
    domain: Option<HostDomain>,
    /// The device whose build fixed the mode (for the conflict message).
    fixed_by: Option<String>,
}

/// A VMM's host IOMMU context: one IOMMU address space for all the host
/// devices of a guest address space, as QEMU keeps one container per
/// address space and Cloud Hypervisor one container or iommufd per VM.
///
/// Make it once, and give it to the builder of every kernel device
/// ([`DeviceBuilder::host`](crate::DeviceBuilder::host) or
/// [`DeviceBuilder::host_iommu`](crate::DeviceBuilder::host_iommu)):
///
/// - the first kernel device built in it creates the domain, a legacy
///   [`KernelContainer`] or an iommufd `IommufdIoas`
///   (feature `iommufd`), and fixes its [`KernelMode`]: [`KernelMode::Auto`]
///   is resolved once, for that device (iommufd when this build has the
///   feature, `/dev/iommu` exists and the device has a vfio cdev, else
///   legacy); every later device goes into the same domain, and one whose
///   builder asks for another mode is refused
///   ([`Error::HostIommuConflict`]);
/// - devices of one IOMMU group share the group (legacy: the group is
///   attached to the container once);
/// - the context carries the [`GuestDma`] its devices use (the builder
///   takes it from here, and refuses another one): guest RAM is pinned and
///   mapped into the domain once, when its first device attaches, and stays
///   mapped until its last device goes, whichever goes first.
///
/// Nothing is opened before the first kernel device: a VMM may make the
/// context unconditionally, even when it has only vfio-user devices.
///
/// ```no_run
/// # fn demo(
/// #     interrupts: std::sync::Arc<dyn vfio_passthrough::pci_interrupts::InterruptManager>,
/// #     allocator: std::sync::Arc<std::sync::Mutex<vfio_passthrough::pci_bar_alloc::BarAllocator>>,
/// #     guest_ram: &vm_memory::GuestMemoryMmap,
/// # ) -> vfio_passthrough::Result<()> {
/// use vfio_passthrough::{DeviceBuilder, HostIommu, KernelMode};
///
/// let host = HostIommu::new(KernelMode::Auto);
/// let mut devices = Vec::new();
/// for path in ["/sys/bus/pci/devices/0000:01:00.0", "/sys/bus/pci/devices/0000:02:00.0"] {
///     devices.push(
///         DeviceBuilder::host(&host, path)
///             .interrupts(interrupts.clone())
///             .allocator(allocator.clone())
///             .guest_memory(guest_ram) // registered once, in host.guest_dma()
///             .build()?,
///     );
/// }
/// // One container (or IOAS) for both: guest RAM was mapped once.
/// assert_eq!(host.guest_dma().domains().len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct HostIommu {
    requested: KernelMode,
    dma: Arc<GuestDma>,
    state: Mutex<State>,
}

impl HostIommu {
    /// A context in `mode` with a [`GuestDma`] of its own (register guest
    /// RAM there: [`guest_dma`](Self::guest_dma)). Opens nothing yet.
    pub fn new(mode: KernelMode) -> Arc<HostIommu> {
        Self::with_guest_dma(mode, GuestDma::new())
    }

    /// A context in `mode` over the VMM's [`GuestDma`] (shared, e.g., with
    /// its vfio-user devices, whose domains are their connections). Opens
    /// nothing yet.
    pub fn with_guest_dma(mode: KernelMode, dma: Arc<GuestDma>) -> Arc<HostIommu> {
        Arc::new(HostIommu {
            requested: mode,
            dma,
            state: Mutex::new(State {
                domain: None,
                fixed_by: None,
            }),
        })
    }

    /// A context over a container the caller opened (e.g. one already
    /// holding devices opened with [`KernelContainer::open_device`]): its
    /// mode is the container's.
    pub fn from_container(container: Arc<KernelContainer>, dma: Arc<GuestDma>) -> Arc<HostIommu> {
        Self::from_domain(HostDomain::Container(container), dma)
    }

    /// A context over an IOAS the caller allocated (e.g. one with dirty
    /// tracking): iommufd mode.
    #[cfg(feature = "iommufd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "iommufd")))]
    pub fn from_ioas(ioas: Arc<IommufdIoas>, dma: Arc<GuestDma>) -> Arc<HostIommu> {
        Self::from_domain(HostDomain::Ioas(ioas), dma)
    }

    fn from_domain(domain: HostDomain, dma: Arc<GuestDma>) -> Arc<HostIommu> {
        Arc::new(HostIommu {
            requested: domain.mode(),
            dma,
            state: Mutex::new(State {
                domain: Some(domain),
                fixed_by: Some("the caller".to_owned()),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each update sets both fields at once, after the domain exists: a
        // panic elsewhere leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The mode the context was made with (possibly [`KernelMode::Auto`]).
    pub fn requested_mode(&self) -> KernelMode {
        self.requested
    }

    /// The mode in force: `None` until the first kernel device is built,
    /// then never [`KernelMode::Auto`].
    pub fn mode(&self) -> Option<KernelMode> {
        self.lock().domain.as_ref().map(HostDomain::mode)
    }

    /// The container or IOAS, once the first kernel device created it.
    pub fn domain(&self) -> Option<HostDomain> {
        self.lock().domain.clone()
    }

    /// The id of the domain (what [`GuestDma`] counts devices by), once it
    /// exists.
    pub fn domain_id(&self) -> Option<DomainId> {
        self.lock().domain.as_ref().map(HostDomain::id)
    }

    /// The VMM's record of guest RAM and domains that every device of this
    /// context uses.
    pub fn guest_dma(&self) -> &Arc<GuestDma> {
        &self.dma
    }

    /// How many built devices are attached to the domain now (0 before the
    /// first, and after the last is dropped).
    pub fn device_count(&self) -> usize {
        self.domain_id().map_or(0, |id| self.dma.device_count(id))
    }

    /// Refuses a device whose builder asks for `device` mode when the
    /// context is (or was made) in another one. Does no I/O.
    pub(crate) fn check_mode(&self, device: KernelMode, what: &str) -> Result<()> {
        let st = self.lock();
        let (mode, why) = match (&st.domain, &st.fixed_by) {
            (Some(d), by) => (
                d.mode(),
                format!("fixed by {}", by.as_deref().unwrap_or("its first device")),
            ),
            (None, _) => (self.requested, "as made".to_owned()),
        };
        combine(mode, device)
            .map(|_| ())
            .ok_or_else(|| Error::HostIommuConflict {
                what: what.to_owned(),
                reason: format!(
                    "its builder asks for {device} mode, the host IOMMU context is in {mode} mode \
                 ({why}); one context holds one kind of IOMMU domain"
                ),
            })
    }

    /// Opens the host device at `path` in this context: the first device
    /// creates the domain (resolving [`KernelMode::Auto`] for its path);
    /// the others join it.
    pub(crate) fn open_device(&self, path: &Path, device: KernelMode) -> Result<KernelDevice> {
        let what = format!("host device {}", path.display());
        self.check_mode(device, &what)?;
        let domain = {
            let mut st = self.lock();
            match &st.domain {
                Some(d) => d.clone(),
                None => {
                    // check_mode passed, so the two combine.
                    let wanted = combine(self.requested, device).unwrap_or(self.requested);
                    let mode = resolve_mode(wanted, path);
                    let d = create_domain(mode).map_err(|source| Error::OpenDevice {
                        what: format!("the host IOMMU context ({mode}) for {what}"),
                        hint: domain_hint(mode),
                        source,
                    })?;
                    log::debug!("host IOMMU context: {mode}, {}, made for {what}", d.id());
                    st.domain = Some(d.clone());
                    st.fixed_by = Some(what.clone());
                    d
                }
            }
        };
        // The domain's own lock (the container's group table) serializes
        // the joins; ours is not held across the device's ioctls.
        domain
            .open_device(path)
            .map_err(|source| Error::OpenDevice {
                what: format!(
                    "{what} (kernel VFIO backend, {} of the host IOMMU context)",
                    domain.id()
                ),
                hint: sysfs_hint(path),
                source,
            })
    }
}

/// The mode of a context in `context` mode for a device asking for
/// `device`: `Auto` gives way to the other; two explicit modes must agree.
pub(crate) fn combine(context: KernelMode, device: KernelMode) -> Option<KernelMode> {
    match (context, device) {
        (KernelMode::Auto, d) => Some(d),
        (c, KernelMode::Auto) => Some(c),
        (c, d) if c == d => Some(c),
        _ => None,
    }
}

fn create_domain(mode: KernelMode) -> vfio_backend::Result<HostDomain> {
    match mode {
        KernelMode::NoIommu => KernelContainer::new_noiommu().map(HostDomain::Container),
        #[cfg(feature = "iommufd")]
        KernelMode::Iommufd => IommufdIoas::new().map(HostDomain::Ioas),
        #[cfg(not(feature = "iommufd"))]
        KernelMode::Iommufd => Err(vfio_backend::Error::Unsupported(
            "iommufd + vfio cdev needs vfio-passthrough's `iommufd` feature".into(),
        )),
        KernelMode::Auto | KernelMode::Legacy => KernelContainer::new().map(HostDomain::Container),
    }
}

fn domain_hint(mode: KernelMode) -> String {
    match mode {
        KernelMode::Iommufd => {
            "check that /dev/iommu exists (iommufd loaded) and is accessible to this user".into()
        }
        _ => "check that /dev/vfio/vfio exists (vfio loaded, an IOMMU enabled, or vfio's \
              enable_unsafe_noiommu_mode=1 for no-IOMMU mode) and is accessible to this user"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gives_way_and_two_explicit_modes_must_agree() {
        use KernelMode::*;
        let all = [Auto, Legacy, Iommufd, NoIommu];
        for m in all {
            assert_eq!(combine(Auto, m), Some(m));
            assert_eq!(combine(m, Auto), Some(m));
            assert_eq!(combine(m, m), Some(m));
        }
        for a in [Legacy, Iommufd, NoIommu] {
            for b in [Legacy, Iommufd, NoIommu] {
                assert_eq!(combine(a, b).is_some(), a == b, "{a:?} {b:?}");
            }
        }
    }
}
