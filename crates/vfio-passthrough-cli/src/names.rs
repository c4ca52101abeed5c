//! Names for PCI class codes and capability ids (PCI Code and ID Assignment
//! Specification), for people reading `inspect` output.

/// The name of a standard capability id.
pub fn capability(id: u16) -> &'static str {
    match id {
        0x01 => "Power Management",
        0x02 => "AGP",
        0x03 => "VPD",
        0x04 => "Slot Identification",
        0x05 => "MSI",
        0x06 => "CompactPCI Hot Swap",
        0x07 => "PCI-X",
        0x08 => "HyperTransport",
        0x09 => "Vendor Specific",
        0x0a => "Debug port",
        0x0b => "CompactPCI central resource control",
        0x0c => "PCI Hot-Plug",
        0x0d => "Bridge subsystem vendor id",
        0x0e => "AGP 8x",
        0x0f => "Secure Device",
        0x10 => "PCI Express",
        0x11 => "MSI-X",
        0x12 => "SATA",
        0x13 => "Advanced Features",
        0x14 => "Enhanced Allocation",
        0x15 => "Flattening Portal Bridge",
        _ => "unknown",
    }
}

/// The name of an extended (PCIe) capability id.
pub fn ext_capability(id: u16) -> &'static str {
    match id {
        0x0001 => "Advanced Error Reporting",
        0x0002 => "Virtual Channel",
        0x0003 => "Device Serial Number",
        0x0004 => "Power Budgeting",
        0x0005 => "Root Complex Link Declaration",
        0x0006 => "Root Complex Internal Link Control",
        0x0007 => "Root Complex Event Collector Endpoint Association",
        0x0008 => "Multi-Function Virtual Channel",
        0x0009 => "Virtual Channel (MFVC present)",
        0x000a => "RCRB Header",
        0x000b => "Vendor Specific Extended",
        0x000c => "Configuration Access Correlation",
        0x000d => "Access Control Services",
        0x000e => "Alternative Routing-ID Interpretation (ARI)",
        0x000f => "Address Translation Services",
        0x0010 => "Single Root I/O Virtualization (SR-IOV)",
        0x0011 => "Multi-Root I/O Virtualization (MR-IOV)",
        0x0012 => "Multicast",
        0x0013 => "Page Request Interface",
        0x0015 => "Resizable BAR",
        0x0016 => "Dynamic Power Allocation",
        0x0017 => "TPH Requester",
        0x0018 => "Latency Tolerance Reporting",
        0x0019 => "Secondary PCI Express",
        0x001a => "Protocol Multiplexing",
        0x001b => "Process Address Space ID",
        0x001c => "LN Requester",
        0x001d => "Downstream Port Containment",
        0x001e => "L1 PM Substates",
        0x001f => "Precision Time Measurement",
        0x0020 => "PCI Express over M-PHY",
        0x0021 => "FRS Queueing",
        0x0022 => "Readiness Time Reporting",
        0x0023 => "Designated Vendor-Specific",
        0x0024 => "VF Resizable BAR",
        0x0025 => "Data Link Feature",
        0x0026 => "Physical Layer 16.0 GT/s",
        0x0027 => "Lane Margining at the Receiver",
        0x0028 => "Hierarchy ID",
        0x0029 => "Native PCIe Enclosure Management",
        0x002a => "Physical Layer 32.0 GT/s",
        0x002b => "Alternate Protocol",
        0x002c => "System Firmware Intermediary",
        _ => "unknown",
    }
}

/// A description of a class code (base class, subclass, programming interface).
pub fn class(base: u8, sub: u8, prog_if: u8) -> String {
    let sub_name = match (base, sub, prog_if) {
        (0x01, 0x08, 0x02) => Some("NVM Express controller"),
        (0x01, 0x08, _) => Some("Non-Volatile memory controller"),
        (0x01, 0x06, _) => Some("SATA controller"),
        (0x01, 0x07, _) => Some("Serial Attached SCSI controller"),
        (0x01, 0x00, _) => Some("SCSI storage controller"),
        (0x01, 0x80, _) => Some("Mass storage controller"),
        (0x02, 0x00, _) => Some("Ethernet controller"),
        (0x02, 0x07, _) => Some("InfiniBand controller"),
        (0x03, 0x00, _) => Some("VGA compatible controller"),
        (0x03, 0x02, _) => Some("3D controller"),
        (0x04, 0x03, _) => Some("Audio device"),
        (0x06, 0x00, _) => Some("Host bridge"),
        (0x06, 0x04, _) => Some("PCI bridge"),
        (0x0c, 0x03, 0x30) => Some("USB controller (xHCI)"),
        (0x0c, 0x03, _) => Some("USB controller"),
        (0x12, 0x00, _) => Some("Processing accelerator"),
        (0x00, 0xff, _) => Some("Unclassified device"),
        _ => None,
    };
    if let Some(n) = sub_name {
        return n.to_string();
    }
    let base_name = match base {
        0x00 => "Unclassified device",
        0x01 => "Mass storage controller",
        0x02 => "Network controller",
        0x03 => "Display controller",
        0x04 => "Multimedia controller",
        0x05 => "Memory controller",
        0x06 => "Bridge",
        0x07 => "Communication controller",
        0x08 => "Generic system peripheral",
        0x09 => "Input device controller",
        0x0a => "Docking station",
        0x0b => "Processor",
        0x0c => "Serial bus controller",
        0x0d => "Wireless controller",
        0x0e => "Intelligent controller",
        0x0f => "Satellite communications controller",
        0x10 => "Encryption controller",
        0x11 => "Signal processing controller",
        0x12 => "Processing accelerator",
        0x13 => "Non-Essential Instrumentation",
        0xff => "Unassigned class",
        _ => "Unknown class",
    };
    base_name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvme_class_code_is_named_as_the_class_code_spec_assigns_it() {
        // PCI Code and ID Assignment: 01h/08h/02h is NVM Express.
        assert_eq!(class(0x01, 0x08, 0x02), "NVM Express controller");
        assert_eq!(class(0x02, 0x00, 0x00), "Ethernet controller");
        assert_eq!(class(0x0b, 0x40, 0x00), "Processor");
    }

    #[test]
    fn sriov_and_msix_ids_have_their_spec_names() {
        assert_eq!(capability(0x11), "MSI-X");
        assert_eq!(
            ext_capability(0x0010),
            "Single Root I/O Virtualization (SR-IOV)"
        );
        assert_eq!(ext_capability(0x0015), "Resizable BAR");
        assert_eq!(capability(0xee), "unknown");
    }
}
