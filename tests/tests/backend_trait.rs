//! The Vfio trait seen from outside the crate.

use vfio_backend::{region, RegionInfo, Vfio};

#[test]
fn pci_region_indices_follow_the_kernel_uapi() {
    // linux/vfio.h: BAR0..BAR5 = 0..5, ROM = 6, CONFIG = 7, VGA = 8.
    assert_eq!(region::BAR0, 0);
    assert_eq!(region::ROM, 6);
    assert_eq!(region::CONFIG, 7);
    assert_eq!(region::VGA, 8);
    let info = RegionInfo::default();
    assert!(info.mmap_areas().is_empty());
    let _: Option<&dyn Vfio> = None;
}
