//! A minimal JSON writer over `Vec<u8>`.
//!
//! Resources are written straight into a reused buffer instead of building
//! `serde_json::Value` trees: the generator produces hundreds of thousands of
//! resources per second and allocation-free writing is what makes that cheap.
//! Numbers and timestamps are formatted with integer arithmetic only, so the
//! bytes are identical on every platform.

/// A resource id: a UUID in its 36-character textual form.
pub(crate) type Id = [u8; 36];

pub(crate) trait JsonBuf {
    fn raw(&mut self, bytes: &[u8]);
    /// A quoted, escaped JSON string.
    fn str(&mut self, s: &str);
    /// String content without the surrounding quotes (for composing values).
    fn str_inner(&mut self, s: &str);
    fn uint(&mut self, v: u64);
    fn int(&mut self, v: i64);
    /// A decimal `v / 10^scale`, keeping trailing zeros (`150, 2` → `1.50`),
    /// which FHIR uses to convey precision.
    fn decimal(&mut self, v: i64, scale: u32);
    /// Zero-padded unsigned integer without quotes.
    fn padded(&mut self, v: u64, width: usize);
    /// `"YYYY-MM-DDThh:mm:ss+00:00"`
    fn datetime(&mut self, ts: i64);
    /// `"YYYY-MM-DDThh:mm:ss.mmm+00:00"`
    fn instant(&mut self, ts: i64, millis: u32);
    /// `"YYYY-MM-DD"`
    fn date(&mut self, ts: i64);
    /// Date without quotes, for narrative text.
    fn date_inner(&mut self, ts: i64);
    /// `{"reference":"Type/id"}`
    fn reference(&mut self, rt: &str, id: &Id);
    /// `{"reference":"Type/id","display":"..."}`
    fn reference_display(&mut self, rt: &str, id: &Id, display: &str);
    /// Standard base64 with padding.
    fn base64(&mut self, data: &[u8]);
}

const HEX: &[u8; 16] = b"0123456789abcdef";
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

impl JsonBuf for Vec<u8> {
    #[inline]
    fn raw(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    #[inline]
    fn str(&mut self, s: &str) {
        self.push(b'"');
        self.str_inner(s);
        self.push(b'"');
    }

    fn str_inner(&mut self, s: &str) {
        let bytes = s.as_bytes();
        if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
            self.extend_from_slice(bytes);
            return;
        }
        for &b in bytes {
            match b {
                b'"' => self.extend_from_slice(b"\\\""),
                b'\\' => self.extend_from_slice(b"\\\\"),
                b'\n' => self.extend_from_slice(b"\\n"),
                b'\r' => self.extend_from_slice(b"\\r"),
                b'\t' => self.extend_from_slice(b"\\t"),
                0..0x20 => {
                    self.extend_from_slice(b"\\u00");
                    self.push(HEX[usize::from(b >> 4)]);
                    self.push(HEX[usize::from(b & 0xf)]);
                }
                _ => self.push(b),
            }
        }
    }

    fn uint(&mut self, mut v: u64) {
        let mut tmp = [0u8; 20];
        let mut pos = tmp.len();
        loop {
            pos -= 1;
            tmp[pos] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.extend_from_slice(&tmp[pos..]);
    }

    fn int(&mut self, v: i64) {
        if v < 0 {
            self.push(b'-');
        }
        self.uint(v.unsigned_abs());
    }

    fn decimal(&mut self, v: i64, scale: u32) {
        if scale == 0 {
            self.int(v);
            return;
        }
        if v < 0 {
            self.push(b'-');
        }
        let abs = v.unsigned_abs();
        let div = 10u64.pow(scale);
        self.uint(abs / div);
        self.push(b'.');
        self.padded(abs % div, scale as usize);
    }

    fn padded(&mut self, v: u64, width: usize) {
        let mut tmp = [b'0'; 20];
        let mut pos = tmp.len();
        let mut rest = v;
        while rest > 0 && pos > 0 {
            pos -= 1;
            tmp[pos] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        let start = tmp.len().saturating_sub(width).min(pos);
        self.extend_from_slice(&tmp[start..]);
    }

    fn datetime(&mut self, ts: i64) {
        self.push(b'"');
        write_date(self, ts);
        write_time(self, ts);
        self.extend_from_slice(b"+00:00\"");
    }

    fn instant(&mut self, ts: i64, millis: u32) {
        self.push(b'"');
        write_date(self, ts);
        write_time(self, ts);
        self.push(b'.');
        self.padded(u64::from(millis % 1000), 3);
        self.extend_from_slice(b"+00:00\"");
    }

    fn date(&mut self, ts: i64) {
        self.push(b'"');
        write_date(self, ts);
        self.push(b'"');
    }

    fn date_inner(&mut self, ts: i64) {
        write_date(self, ts);
    }

    fn reference(&mut self, rt: &str, id: &Id) {
        self.extend_from_slice(b"{\"reference\":\"");
        self.extend_from_slice(rt.as_bytes());
        self.push(b'/');
        self.extend_from_slice(id);
        self.extend_from_slice(b"\"}");
    }

    fn reference_display(&mut self, rt: &str, id: &Id, display: &str) {
        self.extend_from_slice(b"{\"reference\":\"");
        self.extend_from_slice(rt.as_bytes());
        self.push(b'/');
        self.extend_from_slice(id);
        self.extend_from_slice(b"\",\"display\":");
        self.str(display);
        self.push(b'}');
    }

    fn base64(&mut self, data: &[u8]) {
        self.reserve(data.len().div_ceil(3) * 4);
        let mut chunks = data.chunks_exact(3);
        for c in &mut chunks {
            let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
            self.extend_from_slice(&[
                B64[(n >> 18) as usize & 63],
                B64[(n >> 12) as usize & 63],
                B64[(n >> 6) as usize & 63],
                B64[n as usize & 63],
            ]);
        }
        match *chunks.remainder() {
            [a] => {
                let n = u32::from(a) << 16;
                self.extend_from_slice(&[
                    B64[(n >> 18) as usize & 63],
                    B64[(n >> 12) as usize & 63],
                    b'=',
                    b'=',
                ]);
            }
            [a, b] => {
                let n = u32::from(a) << 16 | u32::from(b) << 8;
                self.extend_from_slice(&[
                    B64[(n >> 18) as usize & 63],
                    B64[(n >> 12) as usize & 63],
                    B64[(n >> 6) as usize & 63],
                    b'=',
                ]);
            }
            _ => {}
        }
    }
}

fn write_date(out: &mut Vec<u8>, ts: i64) {
    let (y, m, d) = civil_from_days(ts.div_euclid(86_400));
    out.padded(y.unsigned_abs(), 4);
    out.push(b'-');
    out.padded(u64::from(m), 2);
    out.push(b'-');
    out.padded(u64::from(d), 2);
}

fn write_time(out: &mut Vec<u8>, ts: i64) {
    let secs = ts.rem_euclid(86_400).unsigned_abs();
    out.push(b'T');
    out.padded(secs / 3600, 2);
    out.push(b':');
    out.padded(secs / 60 % 60, 2);
    out.push(b':');
    out.padded(secs % 60, 2);
}

/// Formats 128 bits as a version-4 style UUID string.
pub(crate) fn uuid(hi: u64, lo: u64) -> Id {
    let mut out = [b'-'; 36];
    let mut pos = 0;
    for (i, nibble_index) in (0..32u32).enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            pos += 1;
        }
        let (word, shift) = if nibble_index < 16 {
            (hi, 60 - 4 * nibble_index)
        } else {
            (lo, 60 - 4 * (nibble_index - 16))
        };
        out[pos] = HEX[((word >> shift) & 0xf) as usize];
        pos += 1;
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm; exact for the whole i64 day range we use).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
pub(crate) const fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut b = Vec::new();
        f(&mut b);
        String::from_utf8(b).unwrap_or_default()
    }

    #[test]
    fn decimals_keep_precision() {
        assert_eq!(s(|b| b.decimal(150, 2)), "1.50");
        assert_eq!(s(|b| b.decimal(-5, 2)), "-0.05");
        assert_eq!(s(|b| b.decimal(1234, 1)), "123.4");
        assert_eq!(s(|b| b.decimal(7, 0)), "7");
        assert_eq!(s(|b| b.int(i64::MIN)), "-9223372036854775808");
        assert_eq!(s(|b| b.uint(0)), "0");
    }

    #[test]
    fn dates_round_trip() {
        for days in -40_000..40_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let ts = days_from_civil(1956, 8, 3) * 86_400 + 3600 * 23 + 60 * 37 + 54;
        assert_eq!(s(|b| b.datetime(ts)), "\"1956-08-03T23:37:54+00:00\"");
        assert_eq!(
            s(|b| b.instant(ts, 53)),
            "\"1956-08-03T23:37:54.053+00:00\""
        );
        assert_eq!(s(|b| b.date(ts)), "\"1956-08-03\"");
    }

    #[test]
    fn escapes_and_base64() {
        assert_eq!(s(|b| b.str("a\"b\\c\nd\u{1}")), r#""a\"b\\c\nd\u0001""#);
        assert_eq!(s(|b| b.base64(b"")), "");
        assert_eq!(s(|b| b.base64(b"f")), "Zg==");
        assert_eq!(s(|b| b.base64(b"fo")), "Zm8=");
        assert_eq!(s(|b| b.base64(b"foobar")), "Zm9vYmFy");
    }

    #[test]
    fn uuid_layout() {
        let id = uuid(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
        assert_eq!(&id[..], b"01234567-89ab-cdef-fedc-ba9876543210");
    }
}
