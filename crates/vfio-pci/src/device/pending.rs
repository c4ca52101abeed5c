//! The pending bits a guest reads of a passthrough device: real ones.
//!
//! A vector masked in the guest is not unwired from VFIO (see `irqs.rs`): the device still
//! signals its eventfd, and the signal stays latched there until the vector is unmasked
//! and the VMM delivers it. So a masked vector is pending (PCI Local Bus 3.0 §6.8.1.8 for
//! MSI, §6.8.2.10 for the MSI-X PBA) exactly while its notifier is readable. A read of the
//! PBA or of the MSI Pending Bits register polls the notifiers of the masked vectors it
//! covers, with a zero timeout, and never reads them: the signal stays for delivery.
//! One `poll` call, no allocation, no lock of its own.

use std::os::fd::AsRawFd;

use pci_interrupts::{InterruptSourceGroup, MsiState, MsixState};

/// The most vectors one read covers: an 8-byte PBA read.
const MAX_BITS: usize = 64;

/// ORs into `data`, the guest's read at byte `offset` of the MSI-X PBA, the bits of the
/// masked vectors whose notifier has a signal latched.
pub(super) fn msix_pba(
    state: &MsixState,
    group: &dyn InterruptSourceGroup,
    offset: u64,
    data: &mut [u8],
) {
    let masked = |v: u32| state.function_masked() || state.vector_masked(v);
    latch(
        data,
        offset.saturating_mul(8),
        state.table_size(),
        masked,
        group,
    );
}

/// ORs into `data`, the guest's read at byte `rel` of the MSI capability, the bits of the
/// Pending Bits register it covers of the masked vectors whose notifier has a signal
/// latched. Nothing without per-vector masking (no such register).
pub(super) fn msi_pending(
    state: &MsiState,
    group: &dyn InterruptSourceGroup,
    rel: u64,
    data: &mut [u8],
) {
    let Some(reg) = state.pending_offset() else {
        return;
    };
    let end = rel.saturating_add(data.len() as u64);
    if end <= reg || rel >= reg + 4 {
        return;
    }
    let mut bits = [0u8; 4];
    let masked = |v: u32| state.vector_masked(v);
    latch(&mut bits, 0, state.num_enabled_vectors(), masked, group);
    for (i, b) in data.iter_mut().enumerate() {
        let at = rel + i as u64;
        if let Some(p) = at.checked_sub(reg).and_then(|k| bits.get(k as usize)) {
            *b |= *p;
        }
    }
}

/// Sets bit `i` of `bytes` (vector `first + i`, below `count`) for each masked vector whose
/// notifier is readable.
fn latch(
    bytes: &mut [u8],
    first: u64,
    count: u32,
    masked: impl Fn(u32) -> bool,
    group: &dyn InterruptSourceGroup,
) {
    let mut fds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; MAX_BITS];
    let mut bit_of = [0usize; MAX_BITS];
    let mut n = 0usize;
    for bit in 0..(bytes.len() * 8).min(MAX_BITS) {
        let Some(v) = first
            .checked_add(bit as u64)
            .and_then(|v| u32::try_from(v).ok())
        else {
            break;
        };
        if v >= count {
            break;
        }
        if !masked(v) {
            continue;
        }
        let Some(fd) = group.notifier(v) else {
            continue;
        };
        if let (Some(p), Some(b)) = (fds.get_mut(n), bit_of.get_mut(n)) {
            p.fd = fd.as_raw_fd();
            *b = bit;
            n += 1;
        }
    }
    if n == 0 {
        return;
    }
    // SAFETY: `fds` holds `n` (at most MAX_BITS) initialized pollfd entries, each naming a
    // notifier borrowed from `group`, which outlives this call; a zero timeout never
    // blocks, and poll only writes `revents`.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, 0) };
    if r <= 0 {
        return;
    }
    for (p, &bit) in fds.iter().zip(bit_of.iter()).take(n) {
        if p.revents & libc::POLLIN != 0 {
            if let Some(b) = bytes.get_mut(bit / 8) {
                *b |= 1 << (bit % 8);
            }
        }
    }
}
