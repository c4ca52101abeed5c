//! The kernel backend: a host PCI function bound to `vfio-pci`.
