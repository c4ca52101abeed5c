//! Places PCI BARs in a VMM's mmio32, mmio64 and I/O windows with natural alignment.
