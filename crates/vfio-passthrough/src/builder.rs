//! [`DeviceBuilder`]: one way to make a [`VfioPciDevice`] from a host device
//! bound to `vfio-pci` (sysfs path), a vfio-user socket, or any
//! [`Vfio`] backend, with the VMM's resources and options, and guest RAM
//! registered for DMA (mapped once per IOMMU domain, see [`GuestDma`]).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pci_bar_alloc::BarAllocator;
use pci_interrupts::InterruptManager;
use vfio_backend::kernel::{KernelContainer, KernelDevice};
#[cfg(feature = "vfio-user")]
use vfio_backend::user::{UserDevice, UserOptions};
use vfio_backend::Vfio;
use vfio_pci::{
    DeviceOptions, DeviceResources, DmaMode, GuestDma, GuestMapper, MsixRelocation, TrapAllMapper,
    VfioPciDevice,
};
use vm_memory::GuestMemoryBackend;

use crate::error::{Error, Result};
use crate::host_iommu::HostIommu;

/// How the kernel backend reaches a host device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelMode {
    /// iommufd + the device's vfio cdev when this build has the `iommufd`
    /// feature and the host offers both (`/dev/iommu` and
    /// `<sysfs>/vfio-dev/vfioN`), else the legacy group and container.
    #[default]
    Auto,
    /// The legacy VFIO group in a type1v2 container.
    Legacy,
    /// iommufd + vfio cdev (needs the `iommufd` feature).
    Iommufd,
    /// No-IOMMU mode (`VFIO_NOIOMMU_IOMMU`). The device can then DMA
    /// anywhere in host memory: the guest gets no isolation and DMA mapping
    /// is refused. Only for hosts without an IOMMU, and only on request.
    NoIommu,
}

/// Where the device comes from.
enum Source {
    Sysfs {
        path: PathBuf,
        container: Option<Arc<KernelContainer>>,
        mode: KernelMode,
    },
    #[cfg(feature = "vfio-user")]
    VfioUser {
        path: PathBuf,
        options: UserOptions,
    },
    Vfio(Arc<dyn Vfio>),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Sysfs { path, .. } => format!("host device {}", path.display()),
            #[cfg(feature = "vfio-user")]
            Source::VfioUser { path, .. } => format!("vfio-user device at {}", path.display()),
            Source::Vfio(_) => "VFIO device".to_owned(),
        }
    }
}

type AddMemory = Box<dyn FnOnce(&GuestDma) -> vfio_pci::Result<usize>>;

/// Builds a [`PassthroughDevice`]: picks the backend, lends the VMM's
/// resources, sets the options, and registers guest RAM for DMA.
///
/// ```no_run
/// # fn demo(
/// #     interrupts: std::sync::Arc<dyn vfio_passthrough::pci_interrupts::InterruptManager>,
/// #     allocator: std::sync::Arc<std::sync::Mutex<vfio_passthrough::pci_bar_alloc::BarAllocator>>,
/// #     guest_ram: &vm_memory::GuestMemoryMmap,
/// # ) -> vfio_passthrough::Result<()> {
/// use vfio_passthrough::DeviceBuilder;
///
/// let nic = DeviceBuilder::sysfs("/sys/bus/pci/devices/0000:01:00.0")
///     .interrupts(interrupts)
///     .allocator(allocator)
///     .hide_capability(0x01) // no power management for the guest
///     .guest_memory(guest_ram)
///     .build()?;
/// let _vendor = nic.read_config_register(0) & 0xffff;
/// # Ok(()) }
/// ```
///
/// The interrupt manager and the BAR allocator are required. Without a
/// [`mapper`](Self::mapper), every BAR access traps ([`TrapAllMapper`]).
///
/// Host devices of one VMM belong in one IOMMU domain: make one
/// [`HostIommu`] and build each of them with [`host`](Self::host) (or
/// [`host_iommu`](Self::host_iommu)). Without it, [`sysfs`](Self::sysfs)
/// gives each device a container (or IOAS) of its own, where guest RAM is
/// pinned and mapped once more.
///
/// DMA: guest RAM lives in a [`GuestDma`], the VMM's one record of its RAM
/// and of the IOMMU domains of its devices. Devices that share an IOMMU
/// domain must share the `GuestDma` too: a [`HostIommu`] carries it and
/// the builder uses it (and refuses another given with
/// [`guest_dma`](Self::guest_dma)); for [`sysfs_in`](Self::sysfs_in) and
/// [`vfio`](Self::vfio) the caller passes it. Guest RAM is then mapped
/// into the domain once, when its first device is built, and stays mapped
/// until its last device is dropped, whichever device goes first. Without
/// one, the device gets a `GuestDma` of its own.
#[must_use = "a builder does nothing until build() is called"]
pub struct DeviceBuilder {
    source: Source,
    interrupts: Option<Arc<dyn InterruptManager>>,
    mapper: Option<Arc<dyn GuestMapper>>,
    allocator: Option<Arc<Mutex<BarAllocator>>>,
    dma: Option<Arc<GuestDma>>,
    host: Option<Arc<HostIommu>>,
    options: DeviceOptions,
    memory: Option<AddMemory>,
}

impl std::fmt::Debug for DeviceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuilder")
            .field("source", &self.source.describe())
            .field("interrupts", &self.interrupts.is_some())
            .field("mapper", &self.mapper.is_some())
            .field("allocator", &self.allocator.is_some())
            .field("guest_dma", &self.dma)
            .field("host_iommu", &self.host.as_ref().map(|h| h.mode()))
            .field("options", &self.options)
            .field("guest_memory", &self.memory.is_some())
            .finish()
    }
}

impl DeviceBuilder {
    fn with_source(source: Source) -> Self {
        DeviceBuilder {
            source,
            interrupts: None,
            mapper: None,
            allocator: None,
            dma: None,
            host: None,
            options: DeviceOptions::default(),
            memory: None,
        }
    }

    /// A host PCI function bound to `vfio-pci`, by its sysfs path (e.g.
    /// `/sys/bus/pci/devices/0000:01:00.0`), in a type1v2 container of
    /// its own (kernel backend). A mediated device is named the same way
    /// (`/sys/bus/mdev/devices/<uuid>`) or by its bare UUID.
    pub fn sysfs(path: impl Into<PathBuf>) -> Self {
        Self::with_source(Source::Sysfs {
            path: path.into(),
            container: None,
            mode: KernelMode::Auto,
        })
    }

    /// A mediated device (mdev), by its UUID or its sysfs path
    /// (`/sys/bus/mdev/devices/<uuid>`): the kernel backend opens it like
    /// a PCI function, through its own IOMMU group or its vfio cdev. Same as
    /// [`sysfs`](Self::sysfs), which also takes a bare UUID.
    pub fn mdev(uuid_or_path: impl Into<PathBuf>) -> Self {
        Self::sysfs(uuid_or_path)
    }

    /// Like [`sysfs`](Self::sysfs), choosing how the kernel backend reaches
    /// the device. [`KernelMode::NoIommu`] is the explicit opt-in that
    /// no-IOMMU mode needs.
    pub fn sysfs_with_mode(path: impl Into<PathBuf>, mode: KernelMode) -> Self {
        Self::with_source(Source::Sysfs {
            path: path.into(),
            container: None,
            mode,
        })
    }

    /// Like [`sysfs`](Self::sysfs), in a container shared with other
    /// devices: they then share one IOMMU address space. Give all of them
    /// the same [`guest_dma`](Self::guest_dma), so that guest RAM is
    /// DMA-mapped once for all of them and stays mapped while any of them
    /// is attached.
    ///
    /// Prefer [`host`](Self::host) with a [`HostIommu`] (made with
    /// [`HostIommu::from_container`] to keep a container of your own): it
    /// carries the `GuestDma`, so a device cannot be given another one, and
    /// it serves iommufd too.
    pub fn sysfs_in(container: Arc<KernelContainer>, path: impl Into<PathBuf>) -> Self {
        Self::with_source(Source::Sysfs {
            path: path.into(),
            container: Some(container),
            mode: KernelMode::Legacy,
        })
    }

    /// A host PCI function bound to `vfio-pci`, by its sysfs path (or a
    /// mediated device by its sysfs path or UUID), in the VMM's host IOMMU
    /// context (its one container or IOAS, shared with its
    /// other host devices; guest RAM mapped there once): short for
    /// `DeviceBuilder::sysfs(path).host_iommu(host)`.
    pub fn host(host: &Arc<HostIommu>, path: impl Into<PathBuf>) -> Self {
        Self::sysfs(path).host_iommu(host)
    }

    /// Opens the host device in `host`, the VMM's host IOMMU context, and
    /// uses its [`GuestDma`]. Only for devices named by a sysfs path
    /// ([`sysfs`](Self::sysfs) or [`sysfs_with_mode`](Self::sysfs_with_mode));
    /// [`build`](Self::build) refuses it, before opening anything, with
    /// [`Error::HostIommuConflict`] for another source, a container given
    /// with [`sysfs_in`](Self::sysfs_in), a mode other than the context's,
    /// or another `GuestDma`.
    pub fn host_iommu(mut self, host: &Arc<HostIommu>) -> Self {
        self.host = Some(host.clone());
        self
    }

    /// A device served by a vfio-user server listening at `path`.
    #[cfg(feature = "vfio-user")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vfio-user")))]
    pub fn vfio_user(path: impl Into<PathBuf>) -> Self {
        Self::vfio_user_with_options(path, UserOptions::default())
    }

    /// Like [`vfio_user`](Self::vfio_user), with connection options
    /// (request timeouts, transfer sizes).
    #[cfg(feature = "vfio-user")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vfio-user")))]
    pub fn vfio_user_with_options(path: impl Into<PathBuf>, options: UserOptions) -> Self {
        Self::with_source(Source::VfioUser {
            path: path.into(),
            options,
        })
    }

    /// Any [`Vfio`] backend the caller opened itself.
    pub fn vfio(vfio: Arc<dyn Vfio>) -> Self {
        Self::with_source(Source::Vfio(vfio))
    }

    /// The interrupt manager (required).
    pub fn interrupts(mut self, interrupts: Arc<dyn InterruptManager>) -> Self {
        self.interrupts = Some(interrupts);
        self
    }

    /// The VMM's guest mapper for mmap-able BAR ranges (default: trap
    /// everything).
    pub fn mapper(mut self, mapper: Arc<dyn GuestMapper>) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// The VMM's BAR allocator, shared with its other devices (required).
    pub fn allocator(mut self, allocator: Arc<Mutex<BarAllocator>>) -> Self {
        self.allocator = Some(allocator);
        self
    }

    /// The VMM's guest RAM and IOMMU domains, shared with its other
    /// devices (default: one of the device's own). Devices of one IOMMU
    /// domain must share it.
    pub fn guest_dma(mut self, dma: Arc<GuestDma>) -> Self {
        self.dma = Some(dma);
        self
    }

    /// All four resources at once.
    pub fn resources(self, resources: DeviceResources) -> Self {
        self.interrupts(resources.interrupts)
            .mapper(resources.mapper)
            .allocator(resources.allocator)
            .guest_dma(resources.dma)
    }

    /// Replaces every option at once.
    pub fn options(mut self, options: DeviceOptions) -> Self {
        self.options = options;
        self
    }

    /// Hides a standard capability (by id) from the guest.
    pub fn hide_capability(mut self, id: u8) -> Self {
        self.options.hide_capabilities.push(id);
        self
    }

    /// Hides an extended (PCIe) capability (by id) from the guest.
    pub fn hide_extended_capability(mut self, id: u16) -> Self {
        self.options.hide_extended_capabilities.push(id);
        self
    }

    /// How guest memory reaches the device's DMA (default: guest physical
    /// addresses; [`DmaMode::External`] for a VMM with a virtual IOMMU).
    pub fn dma_mode(mut self, mode: DmaMode) -> Self {
        self.options.dma_mode = mode;
        self
    }

    /// The host page size (default: asked from the OS).
    pub fn page_size(mut self, page_size: u64) -> Self {
        self.options.page_size = Some(page_size);
        self
    }

    /// When the MSI-X table is moved out of the way of mapped memory.
    pub fn msix_relocation(mut self, relocation: MsixRelocation) -> Self {
        self.options.msix_relocation = relocation;
        self
    }

    /// Guest RAM for DMA (every region at its guest physical address),
    /// registered with the [`GuestDma`] before the device attaches
    /// ([`GuestDma::add_memory`]: regions it holds already are skipped, so
    /// every device of a VMM may be given the VMM's RAM). The first device
    /// of an IOMMU domain maps it there. For a vfio-user device the regions
    /// must be file-backed (e.g. a memfd) so the server can map them.
    pub fn guest_memory<M>(mut self, memory: &M) -> Self
    where
        M: GuestMemoryBackend + Clone + Send + Sync + 'static,
    {
        let memory = memory.clone();
        self.memory = Some(Box::new(move |dma: &GuestDma| dma.add_memory(&memory)));
        self
    }

    /// Registers guest RAM if given, opens the backend and attaches the
    /// device (config space, BAR placement and mapping, interrupt groups,
    /// its IOMMU domain, where guest RAM is mapped if it is the domain's
    /// first device). On failure the device leaves nothing behind (RAM
    /// registered with a shared [`GuestDma`] stays registered).
    pub fn build(self) -> Result<PassthroughDevice> {
        let what = self.source.describe();
        // Check what we were given before touching the host.
        let interrupts = self.interrupts.ok_or(Error::MissingResource {
            what: "an interrupt manager",
            call: "interrupts",
        })?;
        let allocator = self.allocator.ok_or(Error::MissingResource {
            what: "a BAR allocator",
            call: "allocator",
        })?;
        let mapper: Arc<dyn GuestMapper> = self.mapper.unwrap_or_else(|| Arc::new(TrapAllMapper));
        if self.memory.is_some() && self.options.dma_mode == DmaMode::External {
            return Err(Error::GuestMemoryInExternalMode { what });
        }
        let dma = match &self.host {
            Some(host) => check_host_iommu(host, &self.source, self.dma.as_ref(), &what)?,
            None => self.dma.unwrap_or_default(),
        };
        if let Some(add) = self.memory {
            let regions = add(&dma).map_err(|source| Error::MapGuestMemory {
                what: what.clone(),
                source,
            })?;
            log::debug!("{what}: {regions} new guest RAM regions registered for DMA");
        }
        let (vfio, backend) = match &self.host {
            Some(host) => open_in_host(host, self.source)?,
            None => open(self.source)?,
        };
        let device = VfioPciDevice::new(
            vfio,
            DeviceResources {
                interrupts,
                mapper,
                allocator,
                dma,
            },
            self.options,
        )
        .map_err(|source| Error::AttachDevice {
            what: what.clone(),
            source,
        })?;
        Ok(PassthroughDevice {
            device,
            backend,
            what,
        })
    }
}

/// Checks a builder given a [`HostIommu`] before anything is opened: a
/// kernel device by sysfs path, in no container of its own, in a mode the
/// context accepts, with the context's [`GuestDma`] or none. Returns that
/// `GuestDma`.
fn check_host_iommu(
    host: &Arc<HostIommu>,
    source: &Source,
    dma: Option<&Arc<GuestDma>>,
    what: &str,
) -> Result<Arc<GuestDma>> {
    let conflict = |reason: &str| Error::HostIommuConflict {
        what: what.to_owned(),
        reason: reason.to_owned(),
    };
    match source {
        Source::Sysfs {
            container: Some(_), ..
        } => {
            return Err(conflict(
                "it was given both a container (sysfs_in) and a host IOMMU context; give the \
                 container to HostIommu::from_container instead",
            ))
        }
        Source::Sysfs { mode, .. } => host.check_mode(*mode, what)?,
        _ => {
            return Err(conflict(
                "a host IOMMU context holds host devices named by their sysfs path; this \
                 device's IOMMU domain is its own backend's",
            ))
        }
    }
    match dma {
        Some(d) if !Arc::ptr_eq(d, host.guest_dma()) => Err(conflict(
            "it was given a GuestDma other than its host IOMMU context's: devices of one \
             IOMMU domain must share one, or guest RAM is mapped there twice and unmapped \
             when either device goes",
        )),
        _ => Ok(host.guest_dma().clone()),
    }
}

/// Opens a kernel device (checked by [`check_host_iommu`]) in `host`.
fn open_in_host(host: &HostIommu, source: Source) -> Result<(Arc<dyn Vfio>, DeviceBackend)> {
    match source {
        Source::Sysfs {
            path,
            container: None,
            mode,
        } => {
            // A bare mdev UUID names /sys/bus/mdev/devices/<uuid>.
            let path = vfio_backend::kernel::device_sysfs_path(&path);
            let dev = Arc::new(host.open_device(&path, mode)?);
            Ok((dev.clone(), DeviceBackend::Kernel(dev)))
        }
        other => Err(Error::HostIommuConflict {
            what: other.describe(),
            reason: "not a host device by sysfs path".to_owned(),
        }),
    }
}

pub(crate) fn sysfs_hint(path: &Path) -> String {
    format!(
        "check that {} exists, that the device is bound to vfio-pci (driver_override), that its \
         IOMMU group is viable (every device of the group bound to vfio-pci or unbound), and that \
         /dev/vfio/vfio and /dev/vfio/<group> are accessible to this user",
        path.display()
    )
}

/// What [`KernelMode::Auto`] means on this host for the device at `path`.
pub(crate) fn resolve_mode(mode: KernelMode, path: &Path) -> KernelMode {
    match mode {
        KernelMode::Auto if cfg!(feature = "iommufd") && iommufd_offered(path) => {
            KernelMode::Iommufd
        }
        KernelMode::Auto => KernelMode::Legacy,
        other => other,
    }
}

/// The host offers iommufd (`/dev/iommu`) and the device has a vfio cdev.
fn iommufd_offered(path: &Path) -> bool {
    Path::new("/dev/iommu").exists()
        && std::fs::read_dir(path.join("vfio-dev"))
            .map(|mut d| {
                d.any(|e| {
                    e.ok()
                        .and_then(|e| e.file_name().into_string().ok())
                        .is_some_and(|n| n.starts_with("vfio"))
                })
            })
            .unwrap_or(false)
}

#[cfg(feature = "iommufd")]
fn open_iommufd(path: &Path) -> vfio_backend::Result<KernelDevice> {
    vfio_backend::kernel::IommufdIoas::new().and_then(|ioas| ioas.open_device(path))
}

#[cfg(not(feature = "iommufd"))]
fn open_iommufd(_path: &Path) -> vfio_backend::Result<KernelDevice> {
    Err(vfio_backend::Error::Unsupported(
        "iommufd + vfio cdev needs vfio-passthrough's `iommufd` feature".into(),
    ))
}

fn open(source: Source) -> Result<(Arc<dyn Vfio>, DeviceBackend)> {
    match source {
        Source::Sysfs {
            path,
            container,
            mode,
        } => {
            // A bare mdev UUID names /sys/bus/mdev/devices/<uuid>.
            let path = vfio_backend::kernel::device_sysfs_path(&path);
            let opened = match (&container, resolve_mode(mode, &path)) {
                (Some(c), _) => c.open_device(&path),
                (None, KernelMode::NoIommu) => {
                    KernelContainer::new_noiommu().and_then(|c| c.open_device(&path))
                }
                (None, KernelMode::Iommufd) => open_iommufd(&path),
                (None, _) => KernelDevice::open(&path),
            };
            let dev = Arc::new(opened.map_err(|source| Error::OpenDevice {
                what: format!("host device {} (kernel VFIO backend)", path.display()),
                hint: sysfs_hint(&path),
                source,
            })?);
            Ok((dev.clone(), DeviceBackend::Kernel(dev)))
        }
        #[cfg(feature = "vfio-user")]
        Source::VfioUser { path, options } => {
            let dev = Arc::new(UserDevice::connect_with_options(&path, options).map_err(
                |source| Error::OpenDevice {
                    what: format!("vfio-user socket {}", path.display()),
                    hint: format!(
                        "check that a vfio-user server listens on {} and that this user may \
                         connect to it",
                        path.display()
                    ),
                    source,
                },
            )?);
            Ok((dev.clone(), DeviceBackend::User(dev)))
        }
        Source::Vfio(vfio) => Ok((vfio, DeviceBackend::Other)),
    }
}

/// The backend a [`PassthroughDevice`] was built on, for what only that
/// backend offers (the kernel device's IOMMU group for the KVM-VFIO device
/// or a hot reset; the vfio-user connection's negotiated capabilities).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DeviceBackend {
    /// A host device through the kernel's VFIO.
    Kernel(Arc<KernelDevice>),
    /// A vfio-user connection.
    #[cfg(feature = "vfio-user")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vfio-user")))]
    User(Arc<UserDevice>),
    /// A backend given with [`DeviceBuilder::vfio`].
    Other,
}

/// A device made by [`DeviceBuilder`]: the [`VfioPciDevice`] (also
/// reachable through `Deref`) and the backend it runs on. Dropping it
/// unplugs the device: interrupts off, mappings and BAR placements given
/// back, and the device detached from its IOMMU domain (the domain's last
/// device unmaps guest RAM there).
#[derive(Debug)]
pub struct PassthroughDevice {
    // Declared first so that it drops first, before the backend handle.
    device: VfioPciDevice,
    backend: DeviceBackend,
    what: String,
}

impl PassthroughDevice {
    /// The PCI device the VMM puts on its bus.
    pub fn device(&self) -> &VfioPciDevice {
        &self.device
    }

    /// The backend the device runs on.
    pub fn backend(&self) -> &DeviceBackend {
        &self.backend
    }

    /// The kernel device, when built from a sysfs path (its
    /// [`KernelDevice::group`] is what the KVM-VFIO device needs).
    pub fn kernel_device(&self) -> Option<&Arc<KernelDevice>> {
        match &self.backend {
            DeviceBackend::Kernel(k) => Some(k),
            _ => None,
        }
    }

    /// The vfio-user connection, when built from a socket path.
    #[cfg(feature = "vfio-user")]
    #[cfg_attr(docsrs, doc(cfg(feature = "vfio-user")))]
    pub fn user_device(&self) -> Option<&Arc<UserDevice>> {
        match &self.backend {
            DeviceBackend::User(u) => Some(u),
            _ => None,
        }
    }

    /// What the device was built from, for logs (e.g. `host device
    /// /sys/bus/pci/devices/0000:01:00.0`).
    pub fn description(&self) -> &str {
        &self.what
    }

    /// The PCI device alone; the backend lives on inside it.
    pub fn into_device(self) -> VfioPciDevice {
        self.device
    }
}

impl Deref for PassthroughDevice {
    type Target = VfioPciDevice;

    fn deref(&self) -> &VfioPciDevice {
        &self.device
    }
}
