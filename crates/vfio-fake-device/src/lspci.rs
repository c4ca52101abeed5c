//! Parsing of `lspci -x` / `-xxx` / `-xxxx` hex dumps, optionally with the
//! `-v`/`-vv` text around them.
//!
//! Hex lines look like `00: 86 80 d3 10 07 04 10 00 00 00 00 02 10 00 00 00`
//! (offsets of three digits from 0x100 on with `-xxxx`). Other lines are
//! ignored, except `Region N: ... [size=128K]` and
//! `Expansion ROM at ... [size=64K]`, which give BAR and ROM sizes.

use crate::error::{FakeError, FakeResult};
use pci_config::{
    CONFIG_SPACE_SIZE as PCIE_CONFIG_SIZE, LEGACY_CONFIG_SPACE_SIZE as PCI_CONFIG_SIZE,
};

/// What a dump holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LspciDump {
    /// Configuration space: 256 bytes, or 4096 when the dump has lines at
    /// 0x100 and above. Bytes the dump does not show are zero.
    pub config: Vec<u8>,
    /// BAR sizes from `Region N:` lines.
    pub bar_sizes: [Option<u64>; 6],
    /// ROM size from an `Expansion ROM` line.
    pub rom_size: Option<u64>,
}

fn err(line: usize, reason: impl Into<String>) -> FakeError {
    FakeError::HexDump {
        line,
        reason: reason.into(),
    }
}

/// Parses a size as lspci prints it: a decimal number with an optional
/// `K`, `M`, `G` or `T` suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K')) => (s.get(..i)?, 10),
        Some((i, 'M')) => (s.get(..i)?, 20),
        Some((i, 'G')) => (s.get(..i)?, 30),
        Some((i, 'T')) => (s.get(..i)?, 40),
        _ => (s, 0),
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// The size in a `[size=...]` tag of a line, if any.
fn size_tag(line: &str, no: usize) -> FakeResult<Option<u64>> {
    let Some(start) = line.find("[size=") else {
        return Ok(None);
    };
    let rest = line.get(start + 6..).unwrap_or("");
    let end = rest
        .find(']')
        .ok_or_else(|| err(no, "unterminated [size=...]"))?;
    let text = rest.get(..end).unwrap_or("");
    parse_size(text)
        .map(Some)
        .ok_or_else(|| err(no, format!("bad size {text:?}")))
}

/// Parses one hex line: `Some((offset, bytes))`, `None` if the line is not
/// a hex line at all.
fn hex_line(line: &str, no: usize) -> FakeResult<Option<(usize, [u8; 16])>> {
    let Some((prefix, rest)) = line.split_once(':') else {
        return Ok(None);
    };
    if !(2..=3).contains(&prefix.len()) || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let toks: Vec<&str> = rest.split_whitespace().collect();
    let is_byte = |t: &&str| t.len() == 2 && t.bytes().all(|b| b.is_ascii_hexdigit());
    if toks.is_empty() || !toks.iter().all(is_byte) {
        // E.g. the header line "00:19.0 Ethernet controller: ...".
        return Ok(None);
    }
    if toks.len() != 16 {
        return Err(err(
            no,
            format!("{} bytes on a hex line (expected 16)", toks.len()),
        ));
    }
    let offset = usize::from_str_radix(prefix, 16).map_err(|_| err(no, "bad offset"))?;
    if offset % 16 != 0 || offset >= PCIE_CONFIG_SIZE {
        return Err(err(
            no,
            format!("offset {offset:#x} is not a hex line offset"),
        ));
    }
    let mut bytes = [0u8; 16];
    for (b, t) in bytes.iter_mut().zip(&toks) {
        *b = u8::from_str_radix(t, 16).map_err(|_| err(no, format!("bad byte {t:?}")))?;
    }
    Ok(Some((offset, bytes)))
}

/// Parses the dump of one function.
pub fn parse(text: &str) -> FakeResult<LspciDump> {
    let mut config = vec![0u8; PCIE_CONFIG_SIZE];
    let mut seen = [false; PCIE_CONFIG_SIZE / 16];
    let mut extended = false;
    let mut bar_sizes = [None; 6];
    let mut rom_size = None;
    // `lspci -vv` prints the function's own Region and Expansion ROM lines
    // before its capabilities; Region lines inside a capability (the VF
    // BARs of SR-IOV) describe other functions and are not ours.
    let mut in_capabilities = false;
    for (i, raw) in text.lines().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        if let Some((offset, bytes)) = hex_line(line, no)? {
            let slot = seen
                .get_mut(offset / 16)
                .ok_or_else(|| err(no, "offset out of range"))?;
            if *slot {
                return Err(err(
                    no,
                    format!("offset {offset:#x} appears twice (more than one function?)"),
                ));
            }
            *slot = true;
            if let Some(dst) = config.get_mut(offset..offset + 16) {
                dst.copy_from_slice(&bytes);
            }
            if offset >= PCI_CONFIG_SIZE {
                extended = true;
            }
        } else if line.starts_with("Capabilities:") {
            in_capabilities = true;
        } else if in_capabilities {
            continue;
        } else if let Some(rest) = line.strip_prefix("Region ") {
            let Some((idx, _)) = rest.split_once(':') else {
                continue;
            };
            let Ok(idx) = idx.trim().parse::<usize>() else {
                continue;
            };
            if let (Some(slot), Some(size)) = (bar_sizes.get_mut(idx), size_tag(line, no)?) {
                *slot = Some(size);
            }
        } else if line.starts_with("Expansion ROM at") {
            rom_size = size_tag(line, no)?;
        }
    }
    if !seen.iter().take(4).all(|s| *s) {
        return Err(err(
            0,
            "the dump lacks the 64-byte header (lines 00: to 30:)",
        ));
    }
    config.truncate(if extended {
        PCIE_CONFIG_SIZE
    } else {
        PCI_CONFIG_SIZE
    });
    Ok(LspciDump {
        config,
        bar_sizes,
        rom_size,
    })
}
