//! PCI type-0 configuration space: header, BARs and sizing, ROM BAR, capability chains, masks.
