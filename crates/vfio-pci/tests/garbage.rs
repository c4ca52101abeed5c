//! A guest writing garbage everywhere: no panic, read-only header fields
//! keep their values, and the device works after a reset.

mod common;

use common::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn guest_garbage_in_config_and_bars_never_panics_and_reset_recovers(
        ops in proptest::collection::vec(
            (any::<bool>(), 0u64..4200, 0usize..9, any::<u64>(), 0usize..8),
            1..200,
        )
    ) {
        let vm = Vm::new();
        let f = fake("nvme-like");
        let dev = attach(&vm, &f);
        let ids = cfg_read32(&dev, 0);
        let class = cfg_read32(&dev, 8);
        for (is_cfg, off, len, val, bar) in ops {
            let bytes = val.to_le_bytes();
            let data = &bytes[..len.min(8)];
            if is_cfg {
                let _ = dev.write_config(off, data);
                let mut b = vec![0u8; len.min(8)];
                dev.read_config(off, &mut b);
            } else {
                let _ = dev.write_bar(bar, off % 0x8000, data);
                let mut b = vec![0u8; len.min(8)];
                dev.read_bar(bar, off % 0x8000, &mut b);
            }
        }
        prop_assert_eq!(cfg_read32(&dev, 0), ids);
        prop_assert_eq!(cfg_read32(&dev, 8) >> 8, class >> 8);
        dev.reset().unwrap();
        enable_device(&dev);
        // CAP.MQES of the nvme-like controller reads back after the storm.
        prop_assert_eq!(bar_read32(&dev, 0, 0), vfio_fake_device::nvme_like::CAP_VALUE as u32);
        // Every placement still lies inside the windows and no mapping leaked.
        for b in dev.bars() {
            let base = b.base.unwrap();
            prop_assert_eq!(base % b.guest_size, 0);
        }
        let live = vm.mapper.live().len();
        drop(dev);
        prop_assert!(live > 0);
        prop_assert!(vm.mapper.live().is_empty());
    }
}
