//! Deciding from stored JSON bytes: a substring pre-check and a top-level member scanner.
//!
//! Both are sound for any valid JSON object: the pre-check only says "cannot match" when no
//! spelling of the needed value can be in the bytes, and the scanner reads JSON structure
//! (strings, nesting) exactly, only without validating what it skips.

use memchr::memchr2;
use memchr::memmem::Finder;

/// Literals one of which every resource matching a clause contains, as it would be spelled in
/// JSON without escapes (a token code as `"1234-5"`, a reference as `Patient/123`).
#[derive(Debug, Clone)]
pub(crate) struct Needles {
    finders: Vec<Finder<'static>>,
    /// A needle holds a `/`, which JSON may also spell `\/`.
    slash: bool,
}

impl Needles {
    /// `None` when some value has no usable literal: then the clause cannot be pre-checked.
    pub(crate) fn new(literals: impl Iterator<Item = Option<String>>) -> Option<Needles> {
        let mut finders = Vec::new();
        let mut slash = false;
        for literal in literals {
            let literal = literal?;
            // Characters JSON must escape cannot be found as written; a quote at either end
            // is the needle's own delimiter.
            let inner = literal
                .strip_prefix('"')
                .and_then(|l| l.strip_suffix('"'))
                .unwrap_or(&literal);
            if inner.is_empty() || inner.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
                return None;
            }
            slash |= inner.contains('/');
            finders.push(Finder::new(literal.as_bytes()).into_owned());
        }
        (!finders.is_empty()).then_some(Needles { finders, slash })
    }

    /// False only when `body` cannot hold any of the literals.
    pub(crate) fn may_match(&self, body: &[u8], escapes: &mut Escapes) -> bool {
        if self.finders.iter().any(|f| f.find(body).is_some()) {
            return true;
        }
        // A `\uXXXX` escape can spell any character of a needle, and `\/` its slashes; such
        // bodies are rare, so they simply skip the pre-check.
        escapes.unicode(body) || (self.slash && escapes.slash(body))
    }
}

/// Which escapes a body holds, looked up at most once per body.
#[derive(Debug, Default)]
pub(crate) struct Escapes {
    unicode: Option<bool>,
    slash: Option<bool>,
}

impl Escapes {
    fn unicode(&mut self, body: &[u8]) -> bool {
        *self
            .unicode
            .get_or_insert_with(|| memchr::memmem::find(body, b"\\u").is_some())
    }

    fn slash(&mut self, body: &[u8]) -> bool {
        *self
            .slash
            .get_or_insert_with(|| memchr::memmem::find(body, b"\\/").is_some())
    }
}

fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = body.get(at) {
        at += 1;
    }
    at
}

/// The index of the quote closing the string whose content starts at `at`.
fn string_end(body: &[u8], mut at: usize) -> Option<usize> {
    loop {
        // Most strings (keys, codes, dates) are short: a plain loop finds their end sooner
        // than setting up a vectorised search.
        let short = body
            .get(at..)?
            .iter()
            .take(24)
            .position(|&b| b == b'"' || b == b'\\');
        let found = match short {
            Some(offset) => at + offset,
            None => at + 24 + memchr2(b'"', b'\\', body.get(at + 24..)?)?,
        };
        if body[found] == b'"' {
            return Some(found);
        }
        at = found + 2;
    }
}

/// The index just past the container opened at `at` by `open`. Only `open`, `close` and
/// strings matter: in valid JSON the other bracket kind is balanced inside.
fn container_end(body: &[u8], open: u8, close: u8, mut at: usize) -> Option<usize> {
    let mut depth = 0usize;
    while let Some(&b) = body.get(at) {
        if b == b'"' {
            at = string_end(body, at + 1)? + 1;
            continue;
        }
        if b == open {
            depth += 1;
        } else if b == close {
            depth = depth.checked_sub(1)?;
            if depth == 0 {
                return Some(at + 1);
            }
        }
        at += 1;
    }
    None
}

/// The index just past the JSON value starting at `at`.
fn value_end(body: &[u8], at: usize) -> Option<usize> {
    match *body.get(at)? {
        b'"' => string_end(body, at + 1).map(|end| end + 1),
        b'{' => container_end(body, b'{', b'}', at),
        b'[' => container_end(body, b'[', b']', at),
        _ => {
            let len = body[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
                .unwrap_or(body.len() - at);
            (len > 0).then_some(at + len)
        }
    }
}

/// Fills `found[i]` with the raw bytes of the top-level member named `wanted[i]` (the first
/// one, should a name repeat), stopping as soon as every name is found. `None` when the bytes
/// are not a JSON object as far as they were read.
pub(crate) fn find_top_level<'a>(
    body: &'a [u8],
    wanted: &[&str],
    found: &mut [Option<&'a [u8]>],
) -> Option<()> {
    let mut remaining = wanted.len();
    let mut at = skip_ws(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_ws(body, at + 1);
    if body.get(at) == Some(&b'}') {
        return Some(());
    }
    loop {
        if body.get(at) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(body, at + 1)?;
        let key = &body[at + 1..key_end];
        at = skip_ws(body, key_end + 1);
        if body.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_ws(body, at + 1);
        let end = value_end(body, start)?;
        if let Some(i) = wanted_index(key, wanted)
            && found[i].is_none()
        {
            found[i] = Some(&body[start..end]);
            remaining -= 1;
            if remaining == 0 {
                return Some(());
            }
        }
        at = skip_ws(body, end);
        match body.get(at)? {
            b',' => at = skip_ws(body, at + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

fn wanted_index(key: &[u8], wanted: &[&str]) -> Option<usize> {
    if !key.contains(&b'\\') {
        return wanted.iter().position(|w| w.as_bytes() == key);
    }
    // An escaped key (`"s\u0075bject"`) names the member its decoded form spells.
    let mut quoted = Vec::with_capacity(key.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(key);
    quoted.push(b'"');
    let decoded: String = serde_json::from_slice(&quoted).ok()?;
    wanted.iter().position(|w| *w == decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members<'a>(body: &'a str, wanted: &[&str]) -> Option<Vec<Option<&'a str>>> {
        let mut found = vec![None; wanted.len()];
        find_top_level(body.as_bytes(), wanted, &mut found)?;
        Some(
            found
                .into_iter()
                .map(|f| f.map(|b| std::str::from_utf8(b).unwrap()))
                .collect(),
        )
    }

    #[test]
    fn finds_top_level_members_only() {
        let body = r#"{"a":{"code":"x","b":[1,{"code":"y"}]},"s":"q\"}{[","code":{"coding":[]},"n":-1.5e3,"t":true}"#;
        assert_eq!(
            members(body, &["code", "n", "t", "zz"]).unwrap(),
            [Some(r#"{"coding":[]}"#), Some("-1.5e3"), Some("true"), None]
        );
        assert_eq!(members(body, &["s"]).unwrap(), [Some(r#""q\"}{[""#)]);
        let pretty = "{ \"a\" : [ 1 , 2 ] ,\n \"b\" : null }";
        assert_eq!(
            members(pretty, &["a", "b"]).unwrap(),
            [Some("[ 1 , 2 ]"), Some("null")]
        );
        assert_eq!(
            members(r#"{"s\u0075bject":1}"#, &["subject"]).unwrap(),
            [Some("1")]
        );
        assert_eq!(members("{}", &["a"]).unwrap(), [None]);
    }

    #[test]
    fn never_panics_on_garbage() {
        let inputs: &[&[u8]] = &[
            b"",
            b"{",
            b"[",
            b"\"",
            b"{\"",
            b"{\"a",
            b"{\"a\"",
            b"{\"a\":",
            b"{\"a\":\"",
            b"{\"a\":\"\\",
            b"{\"a\":{",
            b"{\"a\":{\"b\":[}",
            b"{\"a\":}",
            b"{\"a\":1,",
            b"{\"a\":1 2}",
            b"{\"a\":]]]]}",
            b"{\"a\":\xff}",
            b"{\"\\",
            b"{\"\xff\":1}",
            b"nul",
            b"{,}",
        ];
        for input in inputs {
            let mut found = [None, None];
            let _ = find_top_level(input, &["a", "b"], &mut found);
        }
        // Every prefix of a real body.
        let body = br#"{"resourceType":"Observation","code":{"coding":[{"code":"1\"2"}]},"v":[1,[2]],"x":null}"#;
        for end in 0..body.len() {
            let mut found = [None, None];
            let _ = find_top_level(&body[..end], &["v", "zz"], &mut found);
        }
    }

    #[test]
    fn needles_respect_escapes() {
        let needles = Needles::new([Some("\"1234-5\"".to_owned())].into_iter()).unwrap();
        let mut e = Escapes::default();
        assert!(needles.may_match(br#"{"code":"1234-5"}"#, &mut e));
        let mut e = Escapes::default();
        assert!(!needles.may_match(br#"{"code":"1234-55"}"#, &mut e));
        let mut e = Escapes::default();
        assert!(needles.may_match(br#"{"code":"1234\u002d5"}"#, &mut e));
        let slash = Needles::new([Some("Patient/1".to_owned())].into_iter()).unwrap();
        let mut e = Escapes::default();
        assert!(slash.may_match(br#"{"r":"Patient\/1"}"#, &mut e));
        assert!(Needles::new([Some("\"a\\\"b\"".to_owned())].into_iter()).is_none());
        assert!(Needles::new([None, Some("x".to_owned())].into_iter()).is_none());
    }
}
