//! FHIR `instant`, `dateTime` and `date` values as microseconds since the Unix epoch.
//!
//! Hearth keeps every timestamp as an `i64` count of microseconds (UTC): change-sequence
//! timestamps must be strictly increasing even at 50,000 writes a second, which milliseconds
//! cannot give.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

/// Why a date or instant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a valid FHIR {expected}")]
pub struct InstantError {
    pub value: String,
    pub expected: &'static str,
}

/// The half-open interval `[start, end)` a partial date stands for (`2024` is the whole year).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub start: Micros,
    pub end: Micros,
}

/// Parses a FHIR `instant`: seconds and a time zone are required.
pub fn parse_instant(value: &str) -> Result<Micros, InstantError> {
    let err = || InstantError {
        value: value.to_owned(),
        expected: "instant (YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm))",
    };
    let parsed = parse_date_time(value).ok_or_else(err)?;
    if parsed.precision != Precision::Second || !parsed.has_zone {
        return Err(err());
    }
    Ok(parsed.range.start)
}

/// Parses a FHIR `date` or `dateTime` at any precision into the range it covers; a missing time
/// zone is read as UTC.
pub fn parse_date_range(value: &str) -> Result<DateRange, InstantError> {
    parse_date_time(value)
        .map(|parsed| parsed.range)
        .ok_or_else(|| InstantError {
            value: value.to_owned(),
            expected: "date or dateTime",
        })
}

/// Formats as a FHIR instant in UTC with microsecond precision.
pub fn format_instant(micros: Micros) -> String {
    let mut out = String::with_capacity(27);
    write_instant(micros, &mut out);
    out
}

/// Appends the FHIR instant form of `micros` to `out`, for writers that build JSON by hand.
pub fn write_instant(micros: Micros, out: &mut String) {
    use std::fmt::Write;
    let at = to_offset_date_time(micros);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        at.month() as u8,
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    );
}

/// The current time, in microseconds.
pub fn now_micros() -> Micros {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as Micros
}

/// Converts to a `SystemTime`, for HTTP date headers.
pub fn to_system_time(micros: Micros) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    if micros >= 0 {
        base + std::time::Duration::from_micros(micros as u64)
    } else {
        base - std::time::Duration::from_micros(micros.unsigned_abs())
    }
}

fn to_offset_date_time(micros: Micros) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[derive(Debug, PartialEq, Eq)]
enum Precision {
    Year,
    Month,
    Day,
    Minute,
    Second,
}

struct Parsed {
    range: DateRange,
    precision: Precision,
    has_zone: bool,
}

fn digits(bytes: &[u8], at: usize, count: usize) -> Option<u32> {
    let slice = bytes.get(at..at + count)?;
    slice.iter().try_fold(0u32, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

fn expect(bytes: &[u8], at: usize, byte: u8) -> Option<()> {
    (bytes.get(at) == Some(&byte)).then_some(())
}

fn parse_date_time(value: &str) -> Option<Parsed> {
    let b = value.as_bytes();
    let year = digits(b, 0, 4)? as i32;
    if b.len() == 4 {
        let start = Date::from_calendar_date(year, Month::January, 1).ok()?;
        let end = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
        return Some(day_range(start, end, Precision::Year));
    }
    expect(b, 4, b'-')?;
    let month = Month::try_from(digits(b, 5, 2)? as u8).ok()?;
    if b.len() == 7 {
        let start = Date::from_calendar_date(year, month, 1).ok()?;
        let (next_year, next_month) = if month == Month::December {
            (year + 1, Month::January)
        } else {
            (year, month.next())
        };
        let end = Date::from_calendar_date(next_year, next_month, 1).ok()?;
        return Some(day_range(start, end, Precision::Month));
    }
    expect(b, 7, b'-')?;
    let date = Date::from_calendar_date(year, month, digits(b, 8, 2)? as u8).ok()?;
    if b.len() == 10 {
        return Some(day_range(date, date.next_day()?, Precision::Day));
    }
    expect(b, 10, b'T')?;
    let hour = digits(b, 11, 2)? as u8;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)? as u8;
    let mut at = 16;
    let mut second = 0u8;
    let mut micros = 0u32;
    let mut precision = Precision::Minute;
    // A value stands for the whole span of its last digit: `10:00:00` is a second long,
    // `10:00:00.5` a tenth of one.
    let mut width: Micros = 60_000_000;
    if b.get(at) == Some(&b':') {
        second = digits(b, 17, 2)? as u8;
        at = 19;
        precision = Precision::Second;
        width = 1_000_000;
        if b.get(at) == Some(&b'.') {
            at += 1;
            let start = at;
            while b.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            if at == start {
                return None;
            }
            // Digits beyond microseconds are truncated: Hearth's clock has no finer grain.
            let fraction = &value[start..at.min(start + 6)];
            micros = fraction.parse::<u32>().ok()? * 10u32.pow(6 - fraction.len() as u32);
            width = 10_i64.pow(6 - fraction.len() as u32);
        }
    }
    let (offset, has_zone) = match b.get(at) {
        None => (UtcOffset::UTC, false),
        Some(b'Z') if b.len() == at + 1 => (UtcOffset::UTC, true),
        Some(sign @ (b'+' | b'-')) if b.len() == at + 6 => {
            let hours = digits(b, at + 1, 2)? as i8;
            expect(b, at + 3, b':')?;
            let minutes = digits(b, at + 4, 2)? as i8;
            if hours > 14 || minutes > 59 {
                return None;
            }
            let factor = if *sign == b'-' { -1 } else { 1 };
            (
                UtcOffset::from_hms(hours * factor, minutes * factor, 0).ok()?,
                true,
            )
        }
        _ => return None,
    };
    let time = Time::from_hms_micro(hour, minute, second, micros).ok()?;
    let start = micros_of(PrimitiveDateTime::new(date, time).assume_offset(offset));
    Some(Parsed {
        range: DateRange {
            start,
            end: start + width,
        },
        precision,
        has_zone,
    })
}

fn micros_of(at: OffsetDateTime) -> Micros {
    (at.unix_timestamp_nanos() / 1_000) as Micros
}

fn day_range(start: Date, end: Date, precision: Precision) -> Parsed {
    Parsed {
        range: DateRange {
            start: micros_of(start.midnight().assume_utc()),
            end: micros_of(end.midnight().assume_utc()),
        },
        precision,
        has_zone: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instant_round_trips_with_microseconds() {
        let micros = parse_instant("2024-02-29T13:45:10.123456Z").unwrap();
        assert_eq!(format_instant(micros), "2024-02-29T13:45:10.123456Z");
    }

    #[test]
    fn instant_applies_offsets() {
        assert_eq!(
            parse_instant("2025-01-01T00:00:00+05:00").unwrap(),
            parse_instant("2024-12-31T19:00:00Z").unwrap()
        );
    }

    #[test]
    fn instant_rejects_bad_values() {
        for bad in [
            "0000-60-01T30:70:80+05:00",
            "2024-01-01",
            "2024-01-01T10:00Z",
            "2024-01-01T10:00:00",
            "2024-02-30T00:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+15:00",
            "yesterday",
            "",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn partial_dates_cover_their_period() {
        let year = parse_date_range("2024").unwrap();
        assert_eq!(year.start, parse_instant("2024-01-01T00:00:00Z").unwrap());
        assert_eq!(year.end, parse_instant("2025-01-01T00:00:00Z").unwrap());
        let december = parse_date_range("2023-12").unwrap();
        assert_eq!(december.end, parse_instant("2024-01-01T00:00:00Z").unwrap());
        let day = parse_date_range("2024-03-05").unwrap();
        assert_eq!(day.end - day.start, 86_400_000_000);
        let second = parse_date_range("2024-03-05T10:00:00Z").unwrap();
        assert_eq!(second.end - second.start, 1_000_000);
        let tenth = parse_date_range("2024-03-05T10:00:00.5Z").unwrap();
        assert_eq!(tenth.end - tenth.start, 100_000);
        let micro = parse_date_range("2024-03-05T10:00:00.1234567Z").unwrap();
        assert_eq!(micro.end - micro.start, 1);
    }
}
