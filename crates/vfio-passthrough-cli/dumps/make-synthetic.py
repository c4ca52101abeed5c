#!/usr/bin/env python3
"""Builds the synthetic config-space dumps of this directory.

Each device is laid out by hand from the PCI Local Bus 3.0 and PCI Express
Base specifications (header, capability and extended capability formats).
The ids (vendor 0x1234) are placeholders, not those of a real product.

The hex part is written in `lspci -xxxx` format; for the dumps that carry
`lspci -vv` text too, that text is what `lspci -F <hex> -vv` decodes, with
the `[size=...]` that a live `lspci -vv` prints added to the `Region` and
`Expansion ROM` lines (a dump alone carries no sizes). Run from this
directory: `python3 make-synthetic.py` (needs pciutils' lspci).
"""

import re
import subprocess
import tempfile


class Cfg:
    def __init__(self):
        self.b = bytearray(4096)

    def w8(self, off, v):
        self.b[off] = v & 0xFF

    def w16(self, off, v):
        self.b[off:off + 2] = (v & 0xFFFF).to_bytes(2, "little")

    def w32(self, off, v):
        self.b[off:off + 4] = (v & 0xFFFFFFFF).to_bytes(4, "little")

    def header(self, vendor, device, cls, rev, multifunction, subsys, pin):
        self.w16(0x00, vendor)
        self.w16(0x02, device)
        self.w16(0x04, 0x0406)  # memory, bus master, interrupt disable
        self.w16(0x06, 0x0010)  # capability list
        self.w8(0x08, rev)
        self.w8(0x09, cls & 0xFF)
        self.w8(0x0A, (cls >> 8) & 0xFF)
        self.w8(0x0B, (cls >> 16) & 0xFF)
        self.w8(0x0E, 0x80 if multifunction else 0x00)
        self.w16(0x2C, subsys[0])
        self.w16(0x2E, subsys[1])
        self.w8(0x3C, 0x0B)
        self.w8(0x3D, pin)

    def bar32(self, i, addr, prefetch=False):
        self.w32(0x10 + 4 * i, addr | (0x8 if prefetch else 0))

    def bar64(self, i, addr, prefetch=False):
        self.w32(0x10 + 4 * i, (addr & 0xFFFFFFFF) | 0x4 | (0x8 if prefetch else 0))
        self.w32(0x14 + 4 * i, addr >> 32)

    def bar_io(self, i, port):
        self.w32(0x10 + 4 * i, port | 1)

    # Standard capabilities: (offset, next) are given by the caller.
    def cap(self, off, cid, nxt):
        self.w8(off, cid)
        self.w8(off + 1, nxt)

    def pm(self, off, nxt):
        self.cap(off, 0x01, nxt)
        self.w16(off + 2, 0x0603)  # version 3, D1 and D2 supported
        self.w16(off + 4, 0x0008)  # D0, No_Soft_Reset

    def msi(self, off, nxt, mmc, addr64=True, pvm=False):
        self.cap(off, 0x05, nxt)
        self.w16(off + 2, (mmc << 1) | (0x80 if addr64 else 0) | (0x100 if pvm else 0))

    def msix(self, off, nxt, vectors, tbir, toff, pbir, poff):
        self.cap(off, 0x11, nxt)
        self.w16(off + 2, vectors - 1)
        self.w32(off + 4, toff | tbir)
        self.w32(off + 8, poff | pbir)

    def pcie(self, off, nxt, speed, width, flr):
        self.cap(off, 0x10, nxt)
        self.w16(off + 0x02, 0x0002)  # version 2, PCI Express endpoint
        devcap = 0x1 | (0x7 << 6) | (0x7 << 9) | (1 << 15) | ((1 << 28) if flr else 0)
        self.w32(off + 0x04, devcap)  # MPS 256, L0s/L1 latencies, role-based errors
        self.w16(off + 0x08, 0x2810)  # relaxed ordering, MPS 128, MRRS 512
        self.w32(off + 0x0C, speed | (width << 4) | (0x3 << 10) | (0x7 << 12) | (0x6 << 15))
        self.w16(off + 0x10, 0x0040)  # common clock
        self.w16(off + 0x12, speed | (width << 4) | 0x1000)
        self.w32(off + 0x24, 0x00000010)  # completion timeout disable supported
        self.w32(off + 0x2C, ((1 << speed) - 1) << 1)  # supported link speeds vector
        self.w16(off + 0x30, speed)

    def vendor(self, off, nxt, length):
        self.cap(off, 0x09, nxt)
        self.w8(off + 2, length)

    # Extended capabilities.
    def ext(self, off, cid, ver, nxt):
        self.w32(off, cid | (ver << 16) | (nxt << 20))

    def aer(self, off, nxt):
        self.ext(off, 0x0001, 2, nxt)
        self.w32(off + 0x0C, 0x00462030)  # default uncorrectable severity
        self.w32(off + 0x14, 0x00002000)  # advisory non-fatal masked
        self.w32(off + 0x18, 0x000000A0)  # ECRC generation/check capable

    def vc(self, off, nxt):
        self.ext(off, 0x0002, 1, nxt)
        self.w32(off + 0x10, 0x00000001)  # VC0: resource capability
        self.w32(off + 0x14, 0x800000FF)  # VC0 enabled, TC0-7
        self.w16(off + 0x1A, 0x0000)

    def dsn(self, off, nxt, serial):
        self.ext(off, 0x0003, 1, nxt)
        self.w32(off + 4, serial & 0xFFFFFFFF)
        self.w32(off + 8, serial >> 32)

    def power_budget(self, off, nxt):
        self.ext(off, 0x0004, 1, nxt)
        self.w32(off + 0x0C, 0x1)  # system allocated

    def acs(self, off, nxt):
        self.ext(off, 0x000D, 1, nxt)
        self.w16(off + 4, 0x001F)

    def ari(self, off, nxt, next_fn):
        self.ext(off, 0x000E, 1, nxt)
        self.w16(off + 4, next_fn << 8)

    def sriov(self, off, nxt, total, vf_offset, stride, vf_device, vf_bars):
        self.ext(off, 0x0010, 1, nxt)
        self.w32(off + 0x04, 0x00000000)
        self.w16(off + 0x0C, total)  # InitialVFs
        self.w16(off + 0x0E, total)  # TotalVFs
        self.w16(off + 0x14, vf_offset)
        self.w16(off + 0x16, stride)
        self.w16(off + 0x1A, vf_device)
        self.w32(off + 0x1C, 0x00000553)  # supported page sizes
        self.w32(off + 0x20, 0x00000001)  # system page size 4K
        for i, v in enumerate(vf_bars):
            self.w32(off + 0x24 + 4 * i, v)

    def ltr(self, off, nxt):
        self.ext(off, 0x0018, 1, nxt)
        self.w16(off + 4, 0x1003)
        self.w16(off + 6, 0x1003)

    def secondary_pcie(self, off, nxt, lanes):
        self.ext(off, 0x0019, 1, nxt)
        for lane in range(lanes):
            self.w16(off + 0x0C + 2 * lane, 0x7F7F)
        return 0x0C + 2 * lanes

    def l1ss(self, off, nxt):
        self.ext(off, 0x001E, 1, nxt)
        self.w32(off + 4, 0x0028281F)

    def rebar(self, off, nxt, bar, sizes_mask, current):
        self.ext(off, 0x0015, 1, nxt)
        self.w32(off + 4, sizes_mask << 4)
        self.w32(off + 8, bar | (1 << 5) | (current << 8))

    def vsec(self, off, nxt, length):
        self.ext(off, 0x000B, 1, nxt)
        self.w32(off + 4, 0x0001 | (1 << 16) | (length << 20))

    def dlf(self, off, nxt):
        self.ext(off, 0x0025, 1, nxt)
        self.w32(off + 4, 0x80000001)
        self.w32(off + 8, 0x80000001)

    def hex(self):
        lines = []
        for row in range(0, 4096, 16):
            lines.append(f"{row:02x}: " + " ".join(f"{x:02x}" for x in self.b[row:row + 16]))
        return lines


def gpu():
    c = Cfg()
    c.header(0x1234, 0x0A01, 0x030000, 0xA1, True, (0x1234, 0x1001), 1)
    c.w16(0x04, 0x0407)  # also I/O space
    c.bar32(0, 0xFA000000)
    c.bar64(1, 0x6000000000, prefetch=True)
    c.bar64(3, 0x6010000000, prefetch=True)
    c.bar_io(5, 0xE000)
    c.w32(0x30, 0xFB000000)  # ROM, disabled
    c.w8(0x34, 0x60)
    c.pm(0x60, 0x68)
    c.msi(0x68, 0x78, 0)
    c.pcie(0x78, 0xB4, 4, 16, False)
    c.vendor(0xB4, 0xC8, 0x14)
    c.msix(0xC8, 0x00, 9, 0, 0xB90000, 0, 0xBA0000)
    c.vc(0x100, 0x128)
    c.power_budget(0x128, 0x250)
    c.ltr(0x250, 0x258)
    c.l1ss(0x258, 0x420)
    c.aer(0x420, 0x600)
    c.vsec(0x600, 0x900, 0x18)
    c.secondary_pcie(0x900, 0xBB0, 16)
    # Resizable BAR for BAR1: 256M to 8G supported (bits 8..13), 256M now.
    c.rebar(0xBB0, 0xE00, 1, 0x3F << 8, 8)
    c.dlf(0xE00, 0x000)
    sizes = {0: 16 << 20, 1: 256 << 20, 3: 32 << 20, 5: 128}
    return "01:00.0", c, sizes, 512 << 10


def nic():
    c = Cfg()
    c.header(0x1234, 0x0A02, 0x020000, 0x01, True, (0x1234, 0x2001), 1)
    c.w16(0x04, 0x0407)
    c.bar64(0, 0xF8000000, prefetch=True)
    c.bar_io(2, 0xE020)
    c.bar64(3, 0xF8080000, prefetch=True)
    c.w32(0x30, 0xFB080000)
    c.w8(0x34, 0x40)
    c.pm(0x40, 0x50)
    c.msi(0x50, 0x70, 0, pvm=True)
    c.msix(0x70, 0xA0, 64, 3, 0x0000, 3, 0x2000)
    c.pcie(0xA0, 0x00, 3, 8, True)
    c.aer(0x100, 0x140)
    c.dsn(0x140, 0x150, 0x0123456789ABCDEF)
    c.ari(0x150, 0x160, 1)
    vf_bars = [0x0000000C, 0, 0, 0x0000000C, 0, 0]
    c.sriov(0x160, 0x1D0, 64, 0x180, 2, 0x0A03, vf_bars)
    c.acs(0x1D0, 0x000)
    sizes = {0: 512 << 10, 2: 32, 3: 16 << 10}
    return "02:00.0", c, sizes, 512 << 10, {0: 16 << 10, 3: 16 << 10}


def nvme():
    c = Cfg()
    c.header(0x1234, 0x0A10, 0x010802, 0x00, False, (0x1234, 0x3001), 1)
    c.bar64(0, 0xFE600000)
    c.w8(0x34, 0x40)
    c.pm(0x40, 0x50)
    c.msi(0x50, 0x70, 5, pvm=True)
    c.pcie(0x70, 0xB0, 3, 4, True)
    c.msix(0xB0, 0x00, 33, 0, 0x3000, 0, 0x2000)
    c.aer(0x100, 0x148)
    c.dsn(0x148, 0x158, 0x0011223344556677)
    c.power_budget(0x158, 0x168)
    c.secondary_pcie(0x168, 0x188, 4)
    c.ltr(0x188, 0x190)
    c.l1ss(0x190, 0x000)
    return "03:00.0", c, None, None


def size_text(x):
    suffix = ["", "K", "M", "G", "T"]
    i = 0
    while i < 4 and x % 1024 == 0:
        x //= 1024
        i += 1
    return f"{x}{suffix[i]}"


def with_text(bdf, c, sizes, rom, vf_sizes=None):
    """The `lspci -vvxxxx` form: what lspci -F decodes, plus sizes. Region
    lines after the first capability are the VF BARs of an SR-IOV
    capability: they take `vf_sizes`."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(bdf + " device\n" + "\n".join(c.hex()) + "\n")
        f.flush()
        out = subprocess.run(
            ["lspci", "-F", f.name, "-vv"], capture_output=True, text=True, check=True
        ).stdout
    lines = []
    in_caps = False
    for line in out.rstrip("\n").split("\n"):
        in_caps = in_caps or line.strip().startswith("Capabilities:")
        m = re.match(r"\s*Region (\d+):", line)
        if m:
            i = int(m.group(1))
            table = (vf_sizes or {}) if in_caps else sizes
            if i not in table:
                continue  # the upper half of a 64-bit BAR
            line += f" [size={size_text(table[i])}]"
        elif line.strip().startswith("Expansion ROM at") and rom:
            line += f" [size={size_text(rom)}]"
        lines.append(line)
    return "\n".join(lines) + "\n" + "\n".join(c.hex()) + "\n\n"


def main():
    bdf, c, sizes, rom = gpu()
    open("gpu-synthetic.txt", "w").write(with_text(bdf, c, sizes, rom))
    bdf, c, sizes, rom, vf_sizes = nic()
    open("nic-sriov-synthetic.txt", "w").write(with_text(bdf, c, sizes, rom, vf_sizes))
    bdf, c, _, _ = nvme()
    header = f"{bdf} Non-Volatile memory controller: Device 1234:0a10\n"
    open("nvme-synthetic.txt", "w").write(header + "\n".join(c.hex()) + "\n\n")


if __name__ == "__main__":
    main()
