//! Tests pinned to the PCI rules for BAR placement (PCI Local Bus 3.0 6.2.5.1: a BAR decodes a
//! naturally aligned power-of-two range; 32-bit BARs hold 32-bit addresses; PCI-to-PCI Bridge
//! 1.2: non-prefetchable memory behind bridges is below 4 GiB, prefetchable may be 64-bit).

use super::*;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn windows() -> BarWindows {
    BarWindows {
        mmio32: AddressWindow::new(0xC000_0000, 512 * MIB),
        mmio64: Some(AddressWindow::new(FOUR_GIB, 512 * GIB)),
        io: Some(AddressWindow::new(0xC000, 0x1000)),
    }
}

fn mem64(size: u64, prefetchable: bool) -> BarRequest {
    BarRequest {
        kind: BarKind::Mem64,
        prefetchable,
        size,
        mmappable: true,
    }
}

fn mem32(size: u64, mmappable: bool) -> BarRequest {
    BarRequest {
        kind: BarKind::Mem32,
        prefetchable: false,
        size,
        mmappable,
    }
}

fn io(size: u64) -> BarRequest {
    BarRequest {
        kind: BarKind::Io,
        prefetchable: false,
        size,
        mmappable: false,
    }
}

fn live(a: &BarAllocator) -> Vec<BarPlacement> {
    a.placements().copied().collect()
}

#[test]
fn prefetchable_64bit_bar_of_64_gib_is_naturally_aligned_above_4_gib() {
    let mut a = BarAllocator::new(windows()).unwrap();
    // A small BAR first, so the first free address is not already 64 GiB aligned.
    a.allocate(mem64(16 * KIB, true)).unwrap();
    for size in [64 * GIB, 128 * GIB] {
        let p = a.allocate(mem64(size, true)).unwrap();
        assert_eq!(p.window, Window::Mmio64);
        assert_eq!(p.size, size);
        assert_eq!(
            p.base % size,
            0,
            "base {:#x} not aligned to {size:#x}",
            p.base
        );
        assert!(p.base >= FOUR_GIB);
        assert!(windows().mmio64.unwrap().contains_range(p.base, p.size));
    }
}

#[test]
fn bars_32bit_are_placed_below_4_gib_even_when_mmio64_has_room() {
    let mut a = BarAllocator::new(windows()).unwrap();
    for (size, prefetchable) in [(4 * KIB, true), (MIB, false), (64 * MIB, true)] {
        let p = a
            .allocate(BarRequest {
                kind: BarKind::Mem32,
                prefetchable,
                size,
                mmappable: true,
            })
            .unwrap();
        assert_eq!(p.window, Window::Mmio32);
        assert!(p.last().unwrap() < FOUR_GIB);
        assert_eq!(p.base % size, 0);
    }
}

#[test]
fn thirty_two_bit_bar_is_not_placed_in_mmio64_when_mmio32_is_full() {
    let mut w = windows();
    w.mmio32 = AddressWindow::new(0xE000_0000, MIB);
    let mut a = BarAllocator::new(w).unwrap();
    a.allocate(mem32(MIB, true)).unwrap();
    let err = a.allocate(mem32(4 * KIB, true)).unwrap_err();
    assert_eq!(
        err,
        Error::WindowFull {
            window: Window::Mmio32,
            size: 4 * KIB,
            also_tried: None
        }
    );
}

#[test]
fn prefetchable_64bit_bar_falls_back_to_mmio32_without_mmio64() {
    let mut w = windows();
    w.mmio64 = None;
    let mut a = BarAllocator::new(w).unwrap();
    let p = a.allocate(mem64(16 * MIB, true)).unwrap();
    assert_eq!(p.window, Window::Mmio32);
    assert_eq!(p.base % (16 * MIB), 0);
    assert!(p.last().unwrap() < FOUR_GIB);
}

#[test]
fn prefetchable_64bit_bar_falls_back_to_mmio32_when_mmio64_is_full() {
    let mut w = windows();
    w.mmio64 = Some(AddressWindow::new(FOUR_GIB, 16 * MIB));
    let mut a = BarAllocator::new(w).unwrap();
    let first = a.allocate(mem64(16 * MIB, true)).unwrap();
    assert_eq!(first.window, Window::Mmio64);
    let second = a.allocate(mem64(16 * MIB, true)).unwrap();
    assert_eq!(second.window, Window::Mmio32);
    // A BAR larger than mmio32 cannot fall back: both windows are reported.
    let err = a.allocate(mem64(GIB, true)).unwrap_err();
    assert_eq!(
        err,
        Error::WindowFull {
            window: Window::Mmio64,
            size: GIB,
            also_tried: Some(Window::Mmio32)
        }
    );
}

#[test]
fn non_prefetchable_64bit_bar_goes_below_4_gib_first_then_mmio64() {
    let mut w = windows();
    w.mmio32 = AddressWindow::new(0xE000_0000, MIB);
    let mut a = BarAllocator::new(w).unwrap();
    let p = a.allocate(mem64(MIB, false)).unwrap();
    assert_eq!(p.window, Window::Mmio32);
    let q = a.allocate(mem64(MIB, false)).unwrap();
    assert_eq!(q.window, Window::Mmio64);
    assert_eq!(q.base % MIB, 0);
}

#[test]
fn sub_page_mmappable_bar_gets_a_whole_page_aligned_page() {
    let mut a = BarAllocator::new(windows()).unwrap();
    // Take the window's first page-aligned slot with an unmappable BAR so that the next
    // 256-byte-aligned address is not page aligned.
    let small = a.allocate(mem32(256, false)).unwrap();
    assert_eq!(small.size, 256);
    let p = a.allocate(mem32(256, true)).unwrap();
    assert_eq!(p.size, host_page_size());
    assert_eq!(p.requested_size, 256);
    assert_eq!(p.base % host_page_size(), 0);
    assert!(!p.overlaps(&small));
}

#[test]
fn mmappable_bar_is_rounded_to_64_kib_on_a_64_kib_page_host() {
    let mut a = BarAllocator::with_page_size(windows(), 64 * KIB).unwrap();
    let p = a.allocate(mem32(4 * KIB, true)).unwrap();
    assert_eq!(p.size, 64 * KIB);
    assert_eq!(p.base % (64 * KIB), 0);
    let q = a.allocate(mem64(16, true)).unwrap();
    assert_eq!(q.size, 64 * KIB);
    assert_eq!(q.base % (64 * KIB), 0);
    // A BAR already larger than a page keeps its size.
    let r = a.allocate(mem64(MIB, true)).unwrap();
    assert_eq!(r.size, MIB);
}

#[test]
fn io_bar_is_naturally_aligned_in_the_io_window_and_never_page_rounded() {
    let mut w = windows();
    w.io = Some(AddressWindow::new(0xC004, 0x1000));
    let mut a = BarAllocator::new(w).unwrap();
    let first = a.allocate(io(4)).unwrap();
    assert_eq!(first.base, 0xC004);
    let mut req = io(0x20);
    req.mmappable = true;
    let p = a.allocate(req).unwrap();
    assert_eq!(p.window, Window::Io);
    assert_eq!(p.size, 0x20);
    assert_eq!(p.base % 0x20, 0);
    assert!(w.io.unwrap().contains_range(p.base, p.size));
}

#[test]
fn io_bar_without_io_window_is_refused() {
    let mut w = windows();
    w.io = None;
    let mut a = BarAllocator::new(w).unwrap();
    assert_eq!(
        a.allocate(io(16)).unwrap_err(),
        Error::NoWindow { kind: BarKind::Io }
    );
}

#[test]
fn full_window_error_names_the_window_and_the_size() {
    let mut w = windows();
    w.io = Some(AddressWindow::new(0x1000, 0x100));
    let mut a = BarAllocator::new(w).unwrap();
    a.allocate(io(0x80)).unwrap();
    a.allocate(io(0x80)).unwrap();
    let err = a.allocate(io(0x40)).unwrap_err();
    assert_eq!(
        err,
        Error::WindowFull {
            window: Window::Io,
            size: 0x40,
            also_tried: None
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("io window") && msg.contains("0x40"), "{msg}");
}

#[test]
fn request_sizes_follow_the_bar_register_rules() {
    let mut a = BarAllocator::new(windows()).unwrap();
    for req in [
        mem32(3 * 4096, true), // not a power of two
        mem32(0, true),        // zero
        mem32(8, false),       // below the 16-byte memory minimum
        io(2),                 // below the 4-byte I/O minimum
        mem32(4 * GIB, false), // a 32-bit register cannot describe 4 GiB
        mem64(u64::MAX, true), // not a power of two
    ] {
        assert!(
            matches!(a.allocate(req), Err(Error::InvalidBarSize { .. })),
            "{req:?}"
        );
    }
    assert!(live(&a).is_empty());
}

#[test]
fn windows_are_validated_at_construction() {
    let base = windows();
    let mut w = base;
    w.mmio32 = AddressWindow::new(0xC000_0000, 0);
    assert_eq!(
        BarAllocator::new(w).unwrap_err(),
        Error::EmptyWindow {
            window: Window::Mmio32
        }
    );
    let mut w = base;
    w.mmio32 = AddressWindow::new(0xF000_0000, 512 * MIB);
    assert!(matches!(
        BarAllocator::new(w).unwrap_err(),
        Error::Mmio32Above4G { .. }
    ));
    let mut w = base;
    w.io = Some(AddressWindow::new(0xF000, 0x2000));
    assert!(matches!(
        BarAllocator::new(w).unwrap_err(),
        Error::IoWindowOutOfRange { .. }
    ));
    let mut w = base;
    w.mmio64 = Some(AddressWindow::new(0xD000_0000, 8 * GIB));
    assert_eq!(
        BarAllocator::new(w).unwrap_err(),
        Error::WindowsOverlap {
            a: Window::Mmio32,
            b: Window::Mmio64
        }
    );
    let mut w = base;
    w.mmio64 = Some(AddressWindow::new(u64::MAX - 10, 100));
    assert!(matches!(
        BarAllocator::new(w).unwrap_err(),
        Error::WindowOverflow { .. }
    ));
    assert_eq!(
        BarAllocator::with_page_size(base, 3000).unwrap_err(),
        Error::InvalidPageSize(3000)
    );
}

#[test]
fn guest_relocation_to_a_free_aligned_range_is_accepted() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let target = 0xC000_0000 + 16 * MIB;
    let q = a.relocate(&p, target).unwrap();
    assert_eq!(q.base, target);
    assert_eq!((q.size, q.window, q.kind), (p.size, p.window, p.kind));
    assert_eq!(live(&a), vec![q]);
    assert!(a.contains(AddressSpace::Memory, target, MIB));
    assert!(!a.contains(AddressSpace::Memory, p.base, 4));
    // The old range is free again.
    assert!(a.is_free(Window::Mmio32, p.base, MIB));
}

#[test]
fn sixty_four_bit_bar_may_be_moved_by_the_guest_below_4_gib() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem64(MIB, true)).unwrap();
    assert_eq!(p.window, Window::Mmio64);
    let q = a.relocate(&p, 0xD000_0000).unwrap();
    assert_eq!(q.window, Window::Mmio32);
    assert!(a.is_free(Window::Mmio64, p.base, p.size));
}

#[test]
fn guest_relocation_onto_another_bar_is_refused_and_keeps_the_old_placement() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let big = a.allocate(mem32(64 * MIB, true)).unwrap();
    let before = live(&a);
    // Inside `big`, aligned for p.
    let err = a.relocate(&p, big.base + 3 * MIB).unwrap_err();
    assert!(
        matches!(err, Error::Overlap { other_base, .. } if other_base == big.base),
        "{err:?}"
    );
    assert_eq!(live(&a), before);
    // The old placement is still usable: it can be moved and released.
    a.release(&p).unwrap();
}

#[test]
fn guest_relocation_to_a_misaligned_base_is_refused_and_keeps_the_old_placement() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let before = live(&a);
    assert_eq!(
        a.relocate(&p, 0xC000_0000 + 16 * MIB + 4096).unwrap_err(),
        Error::Misaligned {
            base: 0xC000_0000 + 16 * MIB + 4096,
            size: MIB
        }
    );
    assert_eq!(live(&a), before);
}

#[test]
fn guest_relocation_outside_the_windows_is_refused_and_keeps_the_old_placement() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p32 = a.allocate(mem32(MIB, true)).unwrap();
    let p64 = a.allocate(mem64(MIB, true)).unwrap();
    let pio = a.allocate(io(0x10)).unwrap();
    let before = live(&a);
    // Guest RAM below the window.
    assert!(matches!(
        a.relocate(&p32, 0x1000_0000),
        Err(Error::OutsideWindow { .. })
    ));
    // A 32-bit BAR cannot live in mmio64.
    assert!(matches!(
        a.relocate(&p32, FOUR_GIB + 64 * MIB),
        Err(Error::OutsideWindow { .. })
    ));
    // Straddling the end of mmio64.
    let end64 = FOUR_GIB + 512 * GIB;
    assert!(matches!(
        a.relocate(&p64, end64),
        Err(Error::OutsideWindow { .. })
    ));
    // An I/O BAR stays in the io window.
    assert!(matches!(
        a.relocate(&pio, 0x10),
        Err(Error::OutsideWindow { .. })
    ));
    assert_eq!(live(&a), before);
}

#[test]
fn relocating_or_releasing_an_unknown_placement_is_refused() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let mut forged = p;
    forged.size = 2 * MIB;
    assert!(matches!(
        a.relocate(&forged, 0xC000_0000 + 32 * MIB),
        Err(Error::NotAllocated { .. })
    ));
    assert!(matches!(
        a.release(&forged),
        Err(Error::NotAllocated { .. })
    ));
    a.release(&p).unwrap();
    assert!(matches!(a.release(&p), Err(Error::NotAllocated { .. })));
}

#[test]
fn released_range_is_reused_by_the_next_allocation() {
    let mut w = windows();
    w.mmio32 = AddressWindow::new(0xE000_0000, 2 * MIB);
    let mut a = BarAllocator::new(w).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let q = a.allocate(mem32(MIB, true)).unwrap();
    assert_eq!(
        a.allocate(mem32(MIB, true)),
        Err(Error::WindowFull {
            window: Window::Mmio32,
            size: MIB,
            also_tried: None
        })
    );
    a.release(&p).unwrap();
    let r = a.allocate(mem32(MIB, true)).unwrap();
    assert_eq!(r.base, p.base);
    // Releasing both lets a BAR covering the whole window in.
    a.release(&q).unwrap();
    a.release(&r).unwrap();
    let whole = a.allocate(mem32(2 * MIB, true)).unwrap();
    assert_eq!(whole.base, 0xE000_0000);
}

#[test]
fn query_helpers_answer_only_for_ranges_inside_one_bar() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let i = a.allocate(io(0x20)).unwrap();
    assert_eq!(a.find(AddressSpace::Memory, p.base + 0x10, 4), Some(&p));
    assert!(a.contains(AddressSpace::Memory, p.last().unwrap(), 1));
    assert!(!a.contains(AddressSpace::Memory, p.last().unwrap(), 2));
    assert!(!a.contains(AddressSpace::Memory, p.base, 0));
    assert!(!a.contains(AddressSpace::Io, p.base, 4));
    assert_eq!(a.find(AddressSpace::Io, i.base + 2, 2), Some(&i));
    assert_eq!(a.placement_at(Window::Io, i.base), Some(&i));
    assert!(!a.contains(AddressSpace::Memory, u64::MAX, 2));
}

#[test]
fn snapshot_restore_replaces_every_bar_at_the_same_base() {
    let mut a = BarAllocator::with_page_size(windows(), 64 * KIB).unwrap();
    let p = a.allocate(mem64(64 * GIB, true)).unwrap();
    a.allocate(mem32(256, true)).unwrap();
    a.allocate(mem64(MIB, false)).unwrap();
    a.allocate(io(0x40)).unwrap();
    // A guest move, so bases are not what a fresh allocator would pick.
    a.relocate(&p, 256 * GIB).unwrap();
    let snap = a.snapshot();
    assert_eq!(snap.version, SNAPSHOT_VERSION);
    let json = serde_json::to_string(&snap).unwrap();
    let back: Versioned<BarAllocatorState> = serde_json::from_str(&json).unwrap();
    let b = BarAllocator::restore(&back).unwrap();
    assert_eq!(live(&b), live(&a));
    assert_eq!(b.page_size(), 64 * KIB);
    // The restored allocator knows the ranges are taken.
    let mut b = b;
    for q in live(&a) {
        assert!(matches!(b.reserve_exact(&q), Err(Error::Overlap { .. })));
    }
}

#[test]
fn reserve_exact_refuses_taken_misaligned_and_outside_ranges() {
    let mut a = BarAllocator::new(windows()).unwrap();
    let p = a.allocate(mem32(MIB, true)).unwrap();
    let mut q = p;
    q.base = p.base + 2 * MIB;
    a.reserve_exact(&q).unwrap();
    assert_eq!(a.placement_at(Window::Mmio32, q.base), Some(&q));
    let mut taken = q;
    taken.size = 4 * MIB;
    taken.base = p.base;
    assert!(matches!(
        a.reserve_exact(&taken),
        Err(Error::Overlap { .. })
    ));
    let mut misaligned = q;
    misaligned.base += 4096;
    assert!(matches!(
        a.reserve_exact(&misaligned),
        Err(Error::Misaligned { .. })
    ));
    let mut outside = q;
    outside.base = 0x8000_0000;
    assert!(matches!(
        a.reserve_exact(&outside),
        Err(Error::OutsideWindow { .. })
    ));
    let mut wrong_window = q;
    wrong_window.window = Window::Mmio64;
    assert!(matches!(
        a.reserve_exact(&wrong_window),
        Err(Error::OutsideWindow { .. })
    ));
}

#[test]
fn snapshot_with_an_unknown_version_is_refused() {
    let a = BarAllocator::new(windows()).unwrap();
    let mut snap = a.snapshot();
    snap.version = SNAPSHOT_VERSION + 1;
    assert!(matches!(
        BarAllocator::restore(&snap),
        Err(Error::UnsupportedSnapshotVersion { .. })
    ));
}

#[test]
fn snapshot_with_overlapping_placements_is_refused() {
    let mut a = BarAllocator::new(windows()).unwrap();
    a.allocate(mem32(MIB, true)).unwrap();
    let mut snap = a.snapshot();
    let mut dup = snap.payload.placements[0];
    dup.size = 2 * MIB;
    snap.payload.placements.push(dup);
    assert!(matches!(
        BarAllocator::restore(&snap),
        Err(Error::Overlap { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Property test.

/// Small windows so that collisions, full windows and fallbacks all happen.
fn prop_windows() -> BarWindows {
    BarWindows {
        mmio32: AddressWindow::new(0xE000_0000, 16 * MIB),
        mmio64: Some(AddressWindow::new(1 << 36, 64 * MIB)),
        io: Some(AddressWindow::new(0x1000, 0x1000)),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        kind: u8,
        prefetchable: bool,
        shift: u32,
        mmappable: bool,
    },
    Release(usize),
    Relocate {
        which: usize,
        window: u8,
        offset: u64,
        misalign: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, any::<bool>(), 2u32..26, any::<bool>()).prop_map(
            |(kind, prefetchable, shift, mmappable)| Op::Alloc {
                kind,
                prefetchable,
                shift,
                mmappable
            }
        ),
        1 => any::<usize>().prop_map(Op::Release),
        2 => (any::<usize>(), 0u8..4, any::<u64>(), prop_oneof![3 => Just(0u64), 1 => 1u64..4096])
            .prop_map(|(which, window, offset, misalign)| Op::Relocate {
                which,
                window,
                offset,
                misalign
            }),
    ]
}

fn check_invariants(a: &BarAllocator, model: &[BarPlacement]) {
    let mut got = live(a);
    let mut want = model.to_vec();
    got.sort_by_key(|p| (p.window, p.base));
    want.sort_by_key(|p| (p.window, p.base));
    assert_eq!(got, want);
    let w = a.windows();
    for (i, p) in got.iter().enumerate() {
        assert!(p.size.is_power_of_two());
        assert_eq!(p.base % p.size, 0, "{p:?} not naturally aligned");
        assert!(w.get(p.window).unwrap().contains_range(p.base, p.size));
        assert!(p.kind.eligible_windows().contains(&p.window));
        if p.kind == BarKind::Mem32 {
            assert!(p.last().unwrap() < FOUR_GIB);
        }
        for q in got.iter().skip(i + 1) {
            assert!(!p.overlaps(q), "{p:?} overlaps {q:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_op_sequence_keeps_placements_disjoint_aligned_and_inside_their_windows(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let mut a = BarAllocator::new(prop_windows()).unwrap();
        let mut model: Vec<BarPlacement> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc { kind, prefetchable, shift, mmappable } => {
                    let kind = [BarKind::Io, BarKind::Mem32, BarKind::Mem64][usize::from(kind)];
                    let shift = if kind == BarKind::Io { shift.min(12) } else { shift.max(4) };
                    let req = BarRequest { kind, prefetchable, size: 1 << shift, mmappable };
                    match a.allocate(req) {
                        Ok(p) => {
                            prop_assert!(p.size >= req.size);
                            prop_assert_eq!(p.requested_size, req.size);
                            model.push(p);
                        }
                        Err(e) => prop_assert!(
                            matches!(e, Error::WindowFull { .. }),
                            "unexpected {:?}", e
                        ),
                    }
                }
                Op::Release(i) => {
                    if model.is_empty() { continue; }
                    let p = model.remove(i % model.len());
                    a.release(&p).unwrap();
                }
                Op::Relocate { which, window, offset, misalign } => {
                    if model.is_empty() { continue; }
                    let idx = which % model.len();
                    let old = model[idx];
                    let win = [Window::Mmio32, Window::Mmio64, Window::Io, old.window][usize::from(window)];
                    let range = *prop_windows().get(win).unwrap();
                    // Any aligned base in (or just past the end of) the target window.
                    let span = range.size + old.size;
                    let base = (range.base + offset % span) / old.size * old.size + misalign;
                    let aligned = base % old.size == 0;
                    let eligible = old.kind.eligible_windows().iter().copied().find(|&w| {
                        prop_windows().get(w).unwrap().contains_range(base, old.size)
                    });
                    let candidate = BarPlacement { base, window: eligible.unwrap_or(old.window), ..old };
                    let free = model.iter().enumerate().all(|(j, q)| j == idx || !q.overlaps(&candidate));
                    let expect_ok = aligned && eligible.is_some() && free;
                    match a.relocate(&old, base) {
                        Ok(new) => {
                            prop_assert!(expect_ok, "accepted {:?} -> {:#x}", old, base);
                            prop_assert_eq!(new, candidate);
                            model[idx] = new;
                        }
                        Err(e) => prop_assert!(!expect_ok, "refused {:?} -> {:#x}: {}", old, base, e),
                    }
                }
            }
            check_invariants(&a, &model);
        }
        let restored = BarAllocator::restore(&a.snapshot()).unwrap();
        prop_assert_eq!(live(&restored), live(&a));
    }
}
