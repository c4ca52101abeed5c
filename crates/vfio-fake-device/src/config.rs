//! Writes to the configuration space region, as a function behind
//! `vfio-pci` answers them: writable and write-1-to-clear masks, and BAR
//! registers that keep only their address bits (so an all-ones write reads
//! back the size mask with the flag bits, the sizing protocol).

use crate::template::DeviceTemplate;

fn bar_value(t: &DeviceTemplate, dword: usize, written: u32) -> u32 {
    if dword == 0x30 {
        return match t.rom() {
            Some(rom) => {
                let size = rom.len() as u64;
                let mask = ((!(size.wrapping_sub(1))) as u32 & 0xffff_f800) | 1;
                written & mask
            }
            None => 0,
        };
    }
    let i = (dword - 0x10) / 4;
    if let Some(spec) = t.bar(i as u8) {
        return (written & spec.low_address_mask()) | spec.flag_bits();
    }
    if let Some(lower) = i.checked_sub(1).and_then(|l| t.bar(l as u8)) {
        if lower.kind.is_64bit() {
            return written & lower.high_address_mask();
        }
    }
    0
}

/// Applies a write of `data` at `offset` (already bounds-checked against
/// `cfg.len()`).
pub(crate) fn write(cfg: &mut [u8], t: &DeviceTemplate, offset: usize, data: &[u8]) {
    let masks = t.masks();
    let end = offset.saturating_add(data.len());
    let mut d = offset & !3;
    while d < end {
        let Some(old) = cfg.get(d..d + 4) else {
            return;
        };
        let mut merged = [0u8; 4];
        merged.copy_from_slice(old);
        let mut be = [false; 4];
        for (k, (m, e)) in merged.iter_mut().zip(be.iter_mut()).enumerate() {
            let a = d + k;
            if a >= offset && a < end {
                if let Some(v) = data.get(a - offset) {
                    *m = *v;
                    *e = true;
                }
            }
        }
        if (0x10..0x28).contains(&d) || d == 0x30 {
            let v = bar_value(t, d, u32::from_le_bytes(merged)).to_le_bytes();
            if let Some(dst) = cfg.get_mut(d..d + 4) {
                dst.copy_from_slice(&v);
            }
        } else {
            for k in 0..4 {
                let a = d + k;
                let (Some(true), Some(&v), Some(&wm), Some(&c), Some(cur)) = (
                    be.get(k).copied(),
                    merged.get(k),
                    masks.wmask.get(a),
                    masks.w1c.get(a),
                    cfg.get(a).copied(),
                ) else {
                    continue;
                };
                let new = ((cur & !wm) | (v & wm)) & !(v & c);
                if let Some(slot) = cfg.get_mut(a) {
                    *slot = new;
                }
            }
        }
        d += 4;
    }
}
