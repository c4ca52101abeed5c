//! A minimal MC146818 CMOS RTC at ports 0x70 (index) and 0x71 (data), by hand: the time
//! registers give the host's UTC time (binary, 24-hour), status A says no update is in
//! progress and status D that the time is valid; writes are ignored. Without it Linux's
//! `rtc_cmos` waits seconds for a clock that never answers, and the guest has no wall-clock
//! time (without ACPI nothing else tells it).

/// The index port.
pub const INDEX_PORT: u16 = 0x70;
/// The data port.
pub const DATA_PORT: u16 = 0x71;

/// Status register A: divider bits of a running 32.768 kHz clock, UIP (bit 7) clear.
const STATUS_A: u8 = 0x26;
/// Status register B: 24-hour (bit 1) and binary (bit 2) mode, no interrupts.
const STATUS_B: u8 = 0x06;
/// Status register D: VRT, valid RAM and time.
const STATUS_D: u8 = 0x80;

/// The RTC's state: the index latch.
#[derive(Debug, Default)]
pub struct Cmos {
    index: u8,
}

/// (year, month 1..=12, day 1..=31) of the day `days` after 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil algorithm, on the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The value of CMOS register `index` at `unix` seconds since the epoch.
pub fn register(index: u8, unix: u64) -> u8 {
    let secs = (unix % 86_400) as u32;
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
    let weekday = ((days + 4).rem_euclid(7) + 1) as u8;
    match index {
        0x00 => (secs % 60) as u8,
        0x02 => (secs / 60 % 60) as u8,
        0x04 => (secs / 3600) as u8,
        0x06 => weekday,
        0x07 => day as u8,
        0x08 => month as u8,
        0x09 => year.rem_euclid(100) as u8,
        0x0a => STATUS_A,
        0x0b => STATUS_B,
        0x0d => STATUS_D,
        0x32 => (year / 100).clamp(0, 99) as u8,
        _ => 0,
    }
}

impl Cmos {
    /// A read of `port` at `unix` seconds.
    pub fn read(&self, port: u16, unix: u64) -> u8 {
        if port == DATA_PORT {
            register(self.index, unix)
        } else {
            0xff
        }
    }

    /// A write of `value` to `port`: the index port selects a register (bit 7, the NMI
    /// mask, is dropped); data writes are ignored.
    pub fn write(&mut self, port: u16, value: u8) {
        if port == INDEX_PORT {
            self.index = value & 0x7f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_registers_give_utc_date_and_time_in_binary_24_hour_mode() {
        // 2026-12-06 09:45:30 UTC, a Sunday.
        let t = 1_796_550_330;
        let mut c = Cmos::default();
        let mut reg = |i: u8| {
            c.write(INDEX_PORT, i | 0x80);
            c.read(DATA_PORT, t)
        };
        assert_eq!(
            [reg(0x32), reg(9), reg(8), reg(7), reg(4), reg(2), reg(0)],
            [20, 26, 12, 6, 9, 45, 30]
        );
        assert_eq!(reg(6), 1, "Sunday");
        assert_eq!(reg(0x0a) & 0x80, 0, "no update in progress");
        assert_eq!(reg(0x0b) & 0x06, 0x06, "binary, 24-hour");
        assert_eq!(reg(0x0d) & 0x80, 0x80, "valid time");
    }

    #[test]
    fn days_map_to_the_gregorian_calendar_across_leap_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
