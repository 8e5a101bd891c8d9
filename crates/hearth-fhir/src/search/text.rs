//! Case- and accent-insensitive text comparison for string search.
//!
//! FHIR asks string search to ignore case and accents. Full Unicode decomposition would need a
//! normalisation crate; Latin letters with diacritics (Latin-1 Supplement and Latin Extended-A,
//! which cover the Western and Central European names seen in practice) are folded by a table,
//! combining marks (already decomposed input) are dropped, and anything else is lower-cased.

/// Base letters of U+00C0..=U+00FF; `*` marks a character handled separately or kept.
const LATIN1: &[u8; 64] = b"aaaaaa*ceeeeiiiidnooooo*ouuuuy**aaaaaa*ceeeeiiiidnooooo*ouuuuy*y";
/// Base letters of U+0100..=U+017F.
const LATIN_EXTENDED_A: &[u8; 128] = b"aaaaaaccccccccddddeeeeeeeeeegggggggghhhhiiiiiiiiii**jjkkkllllllllllnnnnnnnnnoooooo**rrrrrrssssssssttttttuuuuuuuuuuuuwwyyyzzzzzzs";

/// Appends the folded form of `text` to `out`.
pub(crate) fn fold_into(text: &str, out: &mut String) {
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
            continue;
        }
        let code = c as u32;
        let base = match code {
            0xC0..=0xFF => LATIN1[(code - 0xC0) as usize],
            0x100..=0x17F => LATIN_EXTENDED_A[(code - 0x100) as usize],
            // Combining diacritical marks: what decomposed input carries its accents in.
            0x300..=0x36F => continue,
            _ => b'*',
        };
        if base != b'*' {
            out.push(char::from(base));
            continue;
        }
        match c {
            'Æ' | 'æ' => out.push_str("ae"),
            'Œ' | 'œ' => out.push_str("oe"),
            'Ĳ' | 'ĳ' => out.push_str("ij"),
            'ß' => out.push_str("ss"),
            'Þ' | 'þ' => out.push_str("th"),
            _ => out.extend(c.to_lowercase()),
        }
    }
}

/// The folded form of `text`.
pub(crate) fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    fold_into(text, &mut out);
    out
}

/// Whether `needle` (already folded) starts `text` once folded.
pub(crate) fn folded_starts_with(text: &str, needle: &str, scratch: &mut String) -> bool {
    // Folding never shortens ASCII, so a text shorter than the needle cannot match.
    if text.is_ascii() && text.len() < needle.len() {
        return false;
    }
    scratch.clear();
    fold_into(text, scratch);
    scratch.starts_with(needle)
}

/// Whether `needle` (already folded) occurs in `text` once folded.
pub(crate) fn folded_contains(text: &str, needle: &str, scratch: &mut String) -> bool {
    scratch.clear();
    fold_into(text, scratch);
    scratch.contains(needle)
}

/// Whether `needle` (already folded) starts a word of `text` once folded: `diabetes` is found
/// in "Type 2 diabetes mellitus" but not in "Prediabetes".
pub(crate) fn folded_word_prefix(text: &str, needle: &str, scratch: &mut String) -> bool {
    scratch.clear();
    fold_into(text, scratch);
    let hay = scratch.as_str();
    hay.match_indices(needle).any(|(at, _)| {
        hay[..at]
            .chars()
            .next_back()
            .is_none_or(|before| !before.is_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_accents() {
        assert_eq!(fold("Ünïcödé"), "unicode");
        assert_eq!(fold("ÀÉÎÕÜÇÑÝÿ"), "aeioucnyy");
        assert_eq!(fold("Łódź Žižek Ørsted"), "lodz zizek orsted");
        assert_eq!(fold("Straße Æsir Œuvre Þór"), "strasse aesir oeuvre thor");
        // Decomposed: e + COMBINING ACUTE ACCENT.
        assert_eq!(fold("Jose\u{301}"), "jose");
        assert_eq!(fold("ΣΊΣΥΦΟΣ"), "σίσυφοσ");
        assert_eq!(fold("a×b÷c"), "a×b÷c");
    }

    #[test]
    fn tables_line_up_with_code_points() {
        for (c, base) in [
            ('Ā', 'a'),
            ('Č', 'c'),
            ('Đ', 'd'),
            ('Ě', 'e'),
            ('Ģ', 'g'),
            ('Ħ', 'h'),
            ('ı', 'i'),
            ('Ĵ', 'j'),
            ('ĸ', 'k'),
            ('ł', 'l'),
            ('ŉ', 'n'),
            ('ŋ', 'n'),
            ('ő', 'o'),
            ('Ř', 'r'),
            ('š', 's'),
            ('ŧ', 't'),
            ('ų', 'u'),
            ('ŵ', 'w'),
            ('Ÿ', 'y'),
            ('ž', 'z'),
            ('ſ', 's'),
            ('Ð', 'd'),
            ('ø', 'o'),
        ] {
            assert_eq!(fold(&c.to_string()), base.to_string(), "{c}");
        }
    }

    #[test]
    fn word_prefixes() {
        let mut scratch = String::new();
        assert!(folded_word_prefix(
            "Type 2 Diabetes",
            "diabetes",
            &mut scratch
        ));
        assert!(folded_word_prefix("Diabetes", "diab", &mut scratch));
        assert!(!folded_word_prefix("Prediabetes", "diabetes", &mut scratch));
        assert!(folded_word_prefix("Pre-diabetes", "diabetes", &mut scratch));
        assert!(folded_starts_with("Smith", "smi", &mut scratch));
        assert!(!folded_starts_with("Sm", "smi", &mut scratch));
        assert!(folded_contains("Goldsmith", "smi", &mut scratch));
    }
}
