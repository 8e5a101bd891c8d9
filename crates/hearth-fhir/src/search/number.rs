//! Search values for number, quantity and date parameters: prefixes and implied ranges.

use crate::instant::{DateRange, Micros};

/// A comparison prefix (R4 search, "Prefixes"); `eq` when none is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

pub(crate) const PREFIXES: [(&str, Prefix); 9] = [
    ("eq", Prefix::Eq),
    ("ne", Prefix::Ne),
    ("gt", Prefix::Gt),
    ("lt", Prefix::Lt),
    ("ge", Prefix::Ge),
    ("le", Prefix::Le),
    ("sa", Prefix::Sa),
    ("eb", Prefix::Eb),
    ("ap", Prefix::Ap),
];

/// Splits a leading prefix off. `Err(letters)` when the value starts with two letters that are
/// not a known prefix (so `on2020` is refused as a prefix, not read as a malformed date).
pub(crate) fn split_prefix(value: &str) -> Result<(Prefix, &str), &str> {
    let Some(head) = value.get(..2) else {
        return Ok((Prefix::Eq, value));
    };
    if let Some((_, prefix)) = PREFIXES.iter().find(|(name, _)| *name == head) {
        return Ok((*prefix, &value[2..]));
    }
    if head.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(head);
    }
    Ok((Prefix::Eq, value))
}

/// A decimal search value: the number and the interval its precision implies (`5.4` stands for
/// `[5.35, 5.45)`, `100` for `[99.5, 100.5)`, `1e2` for `[50, 150)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Decimal {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// Parses FHIR decimal syntax (`-?digits[.digits][e[+-]digits]`), refusing anything f64 would
/// otherwise accept (`inf`, `NaN`, `1_000`, `.5`).
pub(crate) fn parse_decimal(text: &str) -> Option<Decimal> {
    let b = text.as_bytes();
    let mut at = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let int_start = at;
    while b.get(at).is_some_and(u8::is_ascii_digit) {
        at += 1;
    }
    if at == int_start {
        return None;
    }
    let mut decimals = 0i32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return None;
        }
        decimals = (at - start) as i32;
    }
    let mut exponent = 0i32;
    if matches!(b.get(at), Some(b'e' | b'E')) {
        let digits = text.get(at + 1..)?;
        let digits_only = digits.strip_prefix(['+', '-']).unwrap_or(digits);
        if digits_only.is_empty()
            || digits_only.len() > 4
            || !digits_only.bytes().all(|d| d.is_ascii_digit())
        {
            return None;
        }
        exponent = digits.parse().ok()?;
        at = b.len();
    }
    if at != b.len() {
        return None;
    }
    let value: f64 = text.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    let half = 0.5 * 10f64.powi(exponent - decimals);
    Some(Decimal {
        value,
        low: value - half,
        high: value + half,
    })
}

/// Whether a resource's value, the closed interval `[low, high]` (a point when equal; a Range
/// may be open on either side), satisfies `prefix` against the search value `q`.
pub(crate) fn compare_numbers(prefix: Prefix, q: &Decimal, low: f64, high: f64) -> bool {
    match prefix {
        Prefix::Eq => q.low <= low && high < q.high,
        Prefix::Ne => !(q.low <= low && high < q.high),
        Prefix::Gt => high > q.value,
        Prefix::Lt => low < q.value,
        Prefix::Ge => high >= q.value,
        Prefix::Le => low <= q.value,
        Prefix::Sa => low >= q.high,
        Prefix::Eb => high < q.low,
        // Approximately: within 10 % of the value (or within its precision when that is wider,
        // which is what `ap0` needs).
        Prefix::Ap => {
            let margin = (q.value.abs() * 0.1).max(q.high - q.value);
            low <= q.value + margin && high >= q.value - margin
        }
    }
}

/// A date search value: the prefix, the range the value's precision covers, and for `ap` the
/// margin added on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateValue {
    pub prefix: Prefix,
    pub range: DateRange,
    pub ap_margin: Micros,
}

const DAY: Micros = 86_400_000_000;

/// `ap` on dates: 10 % of the distance between the value and now, and at least a day, so
/// `ap2015` in 2025 reaches a year either side and `ap<today>` still means "about today".
pub(crate) fn ap_margin(range: DateRange, now: Micros) -> Micros {
    let gap = if now < range.start {
        range.start - now
    } else if now >= range.end {
        now - range.end
    } else {
        0
    };
    (gap / 10).max(DAY)
}

/// Whether a resource's date range `[start, end)` satisfies the search value (R4 search,
/// "date": comparisons are between ranges, each implied by the value's precision).
pub(crate) fn compare_dates(v: &DateValue, start: Micros, end: Micros) -> bool {
    let (qs, qe) = (v.range.start, v.range.end);
    let within = qs <= start && end <= qe;
    match v.prefix {
        Prefix::Eq => within,
        Prefix::Ne => !within,
        Prefix::Gt => end > qe,
        Prefix::Lt => start < qs,
        Prefix::Ge => end > qe || within,
        Prefix::Le => start < qs || within,
        Prefix::Sa => start >= qe,
        Prefix::Eb => end <= qs,
        Prefix::Ap => {
            start < qe.saturating_add(v.ap_margin) && end > qs.saturating_sub(v.ap_margin)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_carry_their_precision() {
        let d = parse_decimal("5.4").unwrap();
        assert!((d.low - 5.35).abs() < 1e-12 && (d.high - 5.45).abs() < 1e-12);
        let d = parse_decimal("100").unwrap();
        assert_eq!((d.low, d.high), (99.5, 100.5));
        let d = parse_decimal("1e2").unwrap();
        assert_eq!((d.value, d.low, d.high), (100.0, 50.0, 150.0));
        let d = parse_decimal("-0.50").unwrap();
        assert!((d.low + 0.505).abs() < 1e-12);
        for bad in [
            "", "-", ".5", "5.", "1,5", "inf", "NaN", "1e", "1e+", "0x10", "1e99999", "5 ",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(split_prefix("ge100"), Ok((Prefix::Ge, "100")));
        assert_eq!(split_prefix("100"), Ok((Prefix::Eq, "100")));
        assert_eq!(split_prefix("2"), Ok((Prefix::Eq, "2")));
        assert_eq!(split_prefix("on2020"), Err("on"));
        assert_eq!(split_prefix("é1"), Ok((Prefix::Eq, "é1")));
        let q = parse_decimal("100").unwrap();
        assert!(compare_numbers(Prefix::Eq, &q, 100.2, 100.2));
        assert!(!compare_numbers(Prefix::Eq, &q, 100.5, 100.5));
        assert!(compare_numbers(Prefix::Gt, &q, 100.1, 100.1));
        assert!(compare_numbers(Prefix::Ge, &q, 100.0, 100.0));
        assert!(compare_numbers(Prefix::Ap, &q, 109.0, 109.0));
        assert!(!compare_numbers(Prefix::Ap, &q, 111.0, 111.0));
        assert!(compare_numbers(Prefix::Sa, &q, 100.5, 100.5));
        assert!(compare_numbers(Prefix::Eb, &q, 99.4, 99.4));
    }
}
