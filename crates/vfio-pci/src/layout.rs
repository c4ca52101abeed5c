//! How one BAR is laid out for the guest: which parts are device memory
//! mapped straight into the guest, which are the emulated MSI-X table and
//! PBA, and which trap to be forwarded to the device.
//!
//! Pure computation from the region info, the MSI-X capability and the host
//! page size, so that every case (sparse areas, sub-page BARs, 64 KiB pages,
//! MSI-X relocation) is tested without a device.

use vfio_backend::SparseArea;

/// Where the MSI-X table or PBA sits inside one BAR, in the device's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixPiece {
    /// Offset from the start of the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// When the MSI-X table and PBA are moved out of the way of mapped memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MsixRelocation {
    /// Relocate when, with the host's page size, trapping the table and PBA
    /// pages would also trap other registers that could be mapped (hosts
    /// with pages over 4 KiB).
    #[default]
    Auto,
    /// Never relocate: the pages holding the table and PBA are trapped.
    Never,
    /// Always relocate a BAR that holds the table or PBA (for testing).
    Always,
}

/// One range of the guest's BAR that is device memory mapped into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedArea {
    /// Offset in the guest's BAR, and in the device region (they are equal:
    /// relocation only appends to the BAR).
    pub offset: u64,
    /// Length in bytes (a multiple of the host page size).
    pub len: u64,
}

/// The guest's view of one BAR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarLayout {
    /// Size of the device's region.
    pub region_size: u64,
    /// Size the guest sees when it sizes the BAR (a power of two, at least
    /// the region size; larger for sub-page BARs and relocated MSI-X).
    pub guest_size: u64,
    /// Where the guest sees the MSI-X table in this BAR, if it is here.
    pub msix_table: Option<MsixPiece>,
    /// Where the guest sees the PBA in this BAR, if it is here.
    pub msix_pba: Option<MsixPiece>,
    /// The MSI-X table and PBA were moved to the upper half of an enlarged BAR.
    pub relocated: bool,
    /// Ranges mapped into the guest, in ascending order. Everything else
    /// traps: the MSI-X table and PBA are emulated, the rest below
    /// `region_size` is forwarded to the device, and the rest is padding
    /// (reads as zero, writes ignored).
    pub mapped: Vec<MappedArea>,
}

impl BarLayout {
    /// Computes the layout of a BAR.
    ///
    /// `mmap_areas` are the device's mmap-able areas of the region (empty if
    /// it cannot be mmapped); `table` and `pba` are the MSI-X structures that
    /// live in this BAR; `page_size` is the host's page size (a power of two).
    pub fn compute(
        region_size: u64,
        mmap_areas: &[SparseArea],
        table: Option<MsixPiece>,
        pba: Option<MsixPiece>,
        page_size: u64,
        relocation: MsixRelocation,
    ) -> BarLayout {
        let page = page_size.max(1);
        let mappable = !mmap_areas.is_empty();
        // A sub-page BAR that can be mapped is shown as one full page, so
        // that the guest places it page aligned and the page can be mapped.
        let base_size = if mappable && region_size < page {
            page
        } else {
            region_size
                .max(1)
                .checked_next_power_of_two()
                .unwrap_or(region_size)
        };

        // Page-aligned mmap-able areas, clipped to the region. The kernel
        // lets a sub-page BAR that it reports as mmap-able be mapped as the
        // whole page (the rest of the page is reserved for the device).
        let areas: Vec<(u64, u64)> = if mappable && region_size < page {
            vec![(0, page)]
        } else {
            mmap_areas
                .iter()
                .filter_map(|a| {
                    let start = align_up(a.offset, page)?;
                    let end = align_down(a.offset.checked_add(a.size)?.min(base_size), page);
                    (end > start).then_some((start, end))
                })
                .collect()
        };

        let msix_pages: Vec<(u64, u64)> = [table, pba]
            .iter()
            .flatten()
            .filter_map(|p| {
                let start = align_down(p.offset, page);
                let end = align_up(p.offset.checked_add(p.len)?, page)?;
                Some((start, end))
            })
            .collect();
        let has_msix = table.is_some() || pba.is_some();

        // Relocate when trapping the MSI-X pages would also trap other bytes
        // that are mappable: on a 4 KiB host the PCI spec's advice (table and
        // PBA in pages of their own) makes that rare; on 64 KiB hosts common.
        let loses_mappable = has_msix
            && msix_pages.iter().any(|&(ps, pe)| {
                let trapped_mappable = overlap_len(&areas, ps, pe);
                let msix_bytes: u64 = [table, pba]
                    .iter()
                    .flatten()
                    .map(|p| overlap_len(&[(ps, pe)], p.offset, p.offset.saturating_add(p.len)))
                    .sum();
                trapped_mappable > msix_bytes
            });
        let want_relocate = match relocation {
            MsixRelocation::Never => false,
            MsixRelocation::Always => has_msix,
            MsixRelocation::Auto => has_msix && mappable && page > 4096 && loses_mappable,
        };

        if want_relocate {
            if let Some(layout) = relocate(region_size, base_size, &areas, table, pba, page) {
                return layout;
            }
        }

        let mapped = subtract(&areas, &msix_pages)
            .into_iter()
            .map(|(s, e)| MappedArea {
                offset: s,
                len: e - s,
            })
            .collect();
        BarLayout {
            region_size,
            guest_size: base_size,
            msix_table: table,
            msix_pba: pba,
            relocated: false,
            mapped,
        }
    }

    /// Bytes of the guest's BAR that are mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped.iter().map(|a| a.len).sum()
    }

    /// The mapped area that holds `offset`, if any.
    pub fn mapped_at(&self, offset: u64) -> Option<&MappedArea> {
        self.mapped
            .iter()
            .find(|a| offset >= a.offset && offset - a.offset < a.len)
    }
}

/// Doubles the BAR and puts the table, then the PBA (qword aligned), at the
/// start of the upper half, so every mappable page of the device stays mapped.
fn relocate(
    region_size: u64,
    base_size: u64,
    areas: &[(u64, u64)],
    table: Option<MsixPiece>,
    pba: Option<MsixPiece>,
    page: u64,
) -> Option<BarLayout> {
    let guest_size = base_size.max(page).checked_mul(2)?;
    let upper = guest_size / 2;
    let mut next = upper;
    let mut place = |p: Option<MsixPiece>| -> Option<Option<MsixPiece>> {
        match p {
            None => Some(None),
            Some(p) => {
                let offset = next;
                next = align_up(offset.checked_add(p.len)?, 8)?;
                Some(Some(MsixPiece { offset, len: p.len }))
            }
        }
    };
    let new_table = place(table)?;
    let new_pba = place(pba)?;
    if next > guest_size {
        return None;
    }
    Some(BarLayout {
        region_size,
        guest_size,
        msix_table: new_table,
        msix_pba: new_pba,
        relocated: true,
        mapped: areas
            .iter()
            .map(|&(s, e)| MappedArea {
                offset: s,
                len: e - s,
            })
            .collect(),
    })
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    let m = a.checked_sub(1)?;
    Some(v.checked_add(m)? & !m)
}

fn align_down(v: u64, a: u64) -> u64 {
    v & !(a.wrapping_sub(1))
}

/// Bytes of `[s, e)` covered by the (disjoint) ranges.
fn overlap_len(ranges: &[(u64, u64)], s: u64, e: u64) -> u64 {
    ranges
        .iter()
        .map(|&(rs, re)| re.min(e).saturating_sub(rs.max(s)))
        .sum()
}

/// `ranges` minus `holes`, as sorted disjoint ranges.
fn subtract(ranges: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = ranges.to_vec();
    for &(hs, he) in holes {
        let mut next = Vec::with_capacity(out.len() + 1);
        for (s, e) in out {
            if he <= s || hs >= e {
                next.push((s, e));
                continue;
            }
            if s < hs {
                next.push((s, hs));
            }
            if he < e {
                next.push((he, e));
            }
        }
        out = next;
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 4096;
    const K64: u64 = 65536;

    fn whole(size: u64) -> Vec<SparseArea> {
        vec![SparseArea { offset: 0, size }]
    }

    #[test]
    fn bar_without_msix_is_mapped_whole() {
        let l = BarLayout::compute(
            0x10000,
            &whole(0x10000),
            None,
            None,
            K4,
            MsixRelocation::Auto,
        );
        assert_eq!(l.guest_size, 0x10000);
        assert_eq!(
            l.mapped,
            vec![MappedArea {
                offset: 0,
                len: 0x10000
            }]
        );
        assert!(!l.relocated);
    }

    #[test]
    fn non_mmappable_bar_traps_everything() {
        let l = BarLayout::compute(0x1000, &[], None, None, K4, MsixRelocation::Auto);
        assert_eq!(l.guest_size, 0x1000);
        assert!(l.mapped.is_empty());
    }

    #[test]
    fn msix_table_page_is_trapped_and_the_rest_mapped_on_4k_pages() {
        // Table at 0x3100 (not page aligned), PBA in the same page.
        let t = MsixPiece {
            offset: 0x3100,
            len: 16 * 16,
        };
        let p = MsixPiece {
            offset: 0x3800,
            len: 8,
        };
        let l = BarLayout::compute(
            0x4000,
            &whole(0x4000),
            Some(t),
            Some(p),
            K4,
            MsixRelocation::Auto,
        );
        assert!(!l.relocated, "4 KiB pages: trapping the one page is enough");
        assert_eq!(l.guest_size, 0x4000);
        assert_eq!(
            l.mapped,
            vec![MappedArea {
                offset: 0,
                len: 0x3000
            }]
        );
        assert_eq!(l.msix_table, Some(t));
        assert_eq!(l.msix_pba, Some(p));
    }

    #[test]
    fn msix_table_is_relocated_on_64k_pages_so_the_rest_stays_mapped() {
        let t = MsixPiece {
            offset: 0x3100,
            len: 16 * 16,
        };
        let p = MsixPiece {
            offset: 0x3800,
            len: 8,
        };
        let l = BarLayout::compute(
            0x4000,
            &whole(0x4000),
            Some(t),
            Some(p),
            K64,
            MsixRelocation::Auto,
        );
        assert!(l.relocated);
        // Sub-page BAR shown as one 64 KiB page, then doubled.
        assert_eq!(l.guest_size, 2 * K64);
        assert_eq!(
            l.mapped,
            vec![MappedArea {
                offset: 0,
                len: K64
            }]
        );
        let nt = l.msix_table.unwrap();
        let np = l.msix_pba.unwrap();
        assert_eq!(nt.offset, K64);
        assert_eq!(nt.offset % K64, 0);
        assert!(np.offset >= nt.offset + nt.len);
        assert!(np.offset + np.len <= l.guest_size);
    }

    #[test]
    fn relocation_never_traps_the_whole_64k_page() {
        let t = MsixPiece {
            offset: 0x3100,
            len: 256,
        };
        let l = BarLayout::compute(
            0x20000,
            &whole(0x20000),
            Some(t),
            None,
            K64,
            MsixRelocation::Never,
        );
        assert!(!l.relocated);
        assert_eq!(
            l.mapped,
            vec![MappedArea {
                offset: K64,
                len: K64
            }]
        );
    }

    #[test]
    fn page_aligned_table_in_its_own_page_is_not_relocated_on_64k_pages() {
        let t = MsixPiece {
            offset: 0x10000,
            len: 0x1000,
        };
        let l = BarLayout::compute(
            0x20000,
            &whole(0x20000),
            Some(t),
            None,
            K64,
            MsixRelocation::Auto,
        );
        // The 64 KiB page at 0x10000 holds the table and nothing else the
        // guest could map... except the rest of that page: that is mappable
        // device memory, so relocation is chosen.
        assert!(l.relocated);
        let l = BarLayout::compute(
            0x20000,
            &whole(0x20000),
            Some(t),
            None,
            K4,
            MsixRelocation::Auto,
        );
        assert!(!l.relocated);
        assert_eq!(l.mapped_bytes(), 0x20000 - 0x1000);
    }

    #[test]
    fn sparse_areas_from_the_device_are_respected() {
        let areas = vec![
            SparseArea {
                offset: 0,
                size: 0x2000,
            },
            SparseArea {
                offset: 0x3000,
                size: 0x1000,
            },
        ];
        let l = BarLayout::compute(0x4000, &areas, None, None, K4, MsixRelocation::Auto);
        assert_eq!(
            l.mapped,
            vec![
                MappedArea {
                    offset: 0,
                    len: 0x2000
                },
                MappedArea {
                    offset: 0x3000,
                    len: 0x1000
                }
            ]
        );
        assert_eq!(l.mapped_at(0x3004).map(|a| a.offset), Some(0x3000));
        assert!(l.mapped_at(0x2004).is_none());
    }

    #[test]
    fn unaligned_sparse_area_is_shrunk_to_whole_pages() {
        let areas = vec![SparseArea {
            offset: 0x800,
            size: 0x2000,
        }];
        let l = BarLayout::compute(0x4000, &areas, None, None, K4, MsixRelocation::Auto);
        assert_eq!(
            l.mapped,
            vec![MappedArea {
                offset: 0x1000,
                len: 0x1000
            }]
        );
    }

    #[test]
    fn sub_page_mmappable_bar_is_rounded_up_to_a_page() {
        let l = BarLayout::compute(0x100, &whole(0x100), None, None, K4, MsixRelocation::Auto);
        assert_eq!(l.guest_size, K4);
        assert_eq!(l.mapped, vec![MappedArea { offset: 0, len: K4 }]);
        // Not mmap-able: keeps its size and traps.
        let l = BarLayout::compute(0x100, &[], None, None, K4, MsixRelocation::Auto);
        assert_eq!(l.guest_size, 0x100);
        assert!(l.mapped.is_empty());
    }

    #[test]
    fn relocation_always_moves_table_out_of_a_mapped_bar() {
        let t = MsixPiece {
            offset: 0,
            len: 0x800,
        };
        let p = MsixPiece {
            offset: 0x800,
            len: 8,
        };
        let l = BarLayout::compute(
            0x1000,
            &whole(0x1000),
            Some(t),
            Some(p),
            K4,
            MsixRelocation::Always,
        );
        assert!(l.relocated);
        assert_eq!(l.guest_size, 0x2000);
        assert_eq!(l.msix_table.unwrap().offset, 0x1000);
        assert_eq!(
            l.mapped,
            vec![MappedArea {
                offset: 0,
                len: 0x1000
            }]
        );
    }
}
