//! The resource envelope: what Hearth checks and changes in a resource it is asked to store.
//!
//! A resource is kept as compact JSON bytes exactly as it will be exported. Only the top level
//! is parsed (into borrowed raw values), so every nested byte, decimal precision included, stays
//! as the client sent it. The server then owns three things: `id` (on create), and
//! `meta.versionId` / `meta.lastUpdated`, which are only known inside the store's writer. So
//! preparation splits the body around the place those two go, and the writer only
//! concatenates.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use xxhash_rust::xxh3::Xxh3;

use crate::compartment::{compartment_params, patient_compartment_members};
use crate::instant::{Micros, write_instant};
use crate::resource_type::canonical_resource_type;

/// Why a resource body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("the resource has no 'resourceType'")]
    MissingResourceType,
    #[error("'{0}' is not an R4 resource type")]
    UnknownResourceType(String),
    #[error("the resource is a {found} but the request is for {expected}")]
    TypeMismatch { expected: String, found: String },
    #[error("the resource has no 'id', which this interaction requires")]
    MissingId,
    #[error("'{0}' is not a valid resource id (1 to 64 of A-Z a-z 0-9 - .)")]
    InvalidId(String),
    #[error("the resource id '{body}' differs from the id '{url}' in the URL")]
    IdMismatch { url: String, body: String },
    #[error("'meta' must be a JSON object")]
    InvalidMeta,
    #[error("the key '{0}' appears twice")]
    DuplicateKey(String),
}

/// How the resource's `id` is decided.
#[derive(Debug, Clone, Copy)]
pub enum IdPolicy<'a> {
    /// Create: the server assigns this id, whatever the body says.
    Assign(&'a str),
    /// Update at a URL: the body must carry exactly this id.
    Expect(&'a str),
    /// Upsert by the body's own id (bulk load, conditional-free transaction entries).
    FromBody,
}

/// A resource checked and split, ready for the writer to give it a version.
#[derive(Debug, Clone)]
pub struct PreparedResource {
    pub resource_type: &'static str,
    pub id: String,
    /// Hash of everything but the server-set `meta.versionId` and `meta.lastUpdated`, so an
    /// update that changes nothing can be recognised and skipped.
    pub content_hash: u128,
    /// Ids of the patients whose compartment holds this resource.
    pub compartment: Vec<String>,
    before_version: Vec<u8>,
    after_version: Vec<u8>,
}

impl PreparedResource {
    /// The stored body with the server's `meta.versionId` and `meta.lastUpdated` filled in.
    pub fn render(&self, version: u64, last_updated: Micros) -> Vec<u8> {
        let mut stamp = String::with_capacity(64);
        stamp.push_str("\"versionId\":\"");
        stamp.push_str(&version.to_string());
        stamp.push_str("\",\"lastUpdated\":\"");
        write_instant(last_updated, &mut stamp);
        stamp.push('"');
        let mut body =
            Vec::with_capacity(self.before_version.len() + stamp.len() + self.after_version.len());
        body.extend_from_slice(&self.before_version);
        body.extend_from_slice(stamp.as_bytes());
        body.extend_from_slice(&self.after_version);
        body
    }

    /// Size of the stored body, give or take the version stamp.
    pub fn approximate_len(&self) -> usize {
        self.before_version.len() + self.after_version.len() + 64
    }
}

/// Checks a resource body and prepares it for storage.
///
/// `expected_type` is the type named by the URL, if any.
pub fn prepare(
    body: &[u8],
    expected_type: Option<&str>,
    id_policy: IdPolicy<'_>,
) -> Result<PreparedResource, EnvelopeError> {
    let compact = compact_json(body);
    let fields: TopLevel<'_> = serde_json::from_slice(&compact).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data && compact.first() != Some(&b'{') {
            EnvelopeError::NotAnObject
        } else {
            match e.to_string() {
                m if m.starts_with(DUPLICATE_KEY) => EnvelopeError::DuplicateKey(
                    m[DUPLICATE_KEY.len()..]
                        .split('"')
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                ),
                m => EnvelopeError::InvalidJson(m),
            }
        }
    })?;
    let fields = fields.0;
    // The top-level parse skips over string contents, so it lets an unpaired surrogate escape
    // (`"\ud90e"`) through: valid JSON grammar, but no Unicode text, and strict parsers refuse
    // the exported line. Found by the `ndjson_line` fuzz target.
    if has_unpaired_surrogate(&compact) {
        return Err(EnvelopeError::InvalidJson(
            "a string holds an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF)".to_owned(),
        ));
    }

    let type_value = field(&fields, "resourceType").ok_or(EnvelopeError::MissingResourceType)?;
    let type_name: Cow<'_, str> =
        serde_json::from_str(type_value.get()).map_err(|_| EnvelopeError::MissingResourceType)?;
    let resource_type = canonical_resource_type(&type_name)
        .ok_or_else(|| EnvelopeError::UnknownResourceType(type_name.to_string()))?;
    if let Some(expected) = expected_type
        && expected != resource_type
    {
        return Err(EnvelopeError::TypeMismatch {
            expected: expected.to_owned(),
            found: resource_type.to_owned(),
        });
    }

    let body_id = match field(&fields, "id") {
        Some(raw) => Some(
            serde_json::from_str::<Cow<'_, str>>(raw.get())
                .map_err(|_| EnvelopeError::InvalidId(raw.get().to_owned()))?,
        ),
        None => None,
    };
    let id = match id_policy {
        IdPolicy::Assign(id) => id.to_owned(),
        IdPolicy::Expect(url_id) => match &body_id {
            None => return Err(EnvelopeError::MissingId),
            Some(body) if body != url_id => {
                return Err(EnvelopeError::IdMismatch {
                    url: url_id.to_owned(),
                    body: body.to_string(),
                });
            }
            Some(body) => body.to_string(),
        },
        IdPolicy::FromBody => body_id
            .as_deref()
            .ok_or(EnvelopeError::MissingId)?
            .to_owned(),
    };
    if !is_valid_id(&id) {
        return Err(EnvelopeError::InvalidId(id));
    }

    let (before_version, after_version) = split_around_version(&fields, &id)?;
    let mut hasher = Xxh3::new();
    hasher.update(&before_version);
    hasher.update(&after_version);
    let compartment = compartment_of(resource_type, &fields);

    Ok(PreparedResource {
        resource_type,
        id,
        content_hash: hasher.digest128(),
        compartment,
        before_version,
        after_version,
    })
}

/// Whether syntactically valid JSON holds a `\\uD800`-`\\uDFFF` escape that is not a high
/// surrogate directly followed by a low one. Backslashes only occur inside strings, so jumping
/// from one to the next (memchr) and stepping over each escape sees every escape exactly once.
fn has_unpaired_surrogate(json: &[u8]) -> bool {
    let hex4 = |at: usize| -> Option<u32> {
        let digits = json.get(at..at + 4)?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut from = 0;
    while from < json.len() {
        let Some(found) = memchr::memchr(b'\\', &json[from..]) else {
            break;
        };
        let at = from + found;
        from = match (json.get(at + 1), hex4(at + 2)) {
            (Some(b'u'), Some(0xD800..=0xDBFF)) => {
                let paired = json.get(at + 6..at + 8) == Some(&b"\\u"[..])
                    && matches!(hex4(at + 8), Some(0xDC00..=0xDFFF));
                if !paired {
                    return true;
                }
                at + 12
            }
            (Some(b'u'), Some(0xDC00..=0xDFFF)) => return true,
            (Some(b'u'), _) => at + 6,
            _ => at + 2,
        };
    }
    false
}

/// FHIR id syntax: 1 to 64 of `A-Z a-z 0-9 - .`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Removes insignificant whitespace. Already-compact input (the common case for NDJSON) is
/// returned without a copy.
pub fn compact_json(input: &[u8]) -> Cow<'_, [u8]> {
    let is_space = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    let mut in_string = false;
    let mut escaped = false;
    let mut first_space = None;
    for (at, &b) in input.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_space(b) {
            first_space = Some(at);
            break;
        }
    }
    let Some(start) = first_space else {
        return Cow::Borrowed(input);
    };
    let mut out = Vec::with_capacity(input.len());
    out.extend_from_slice(&input[..start]);
    for &b in &input[start..] {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !is_space(b) {
            in_string = b == b'"';
            out.push(b);
        }
    }
    Cow::Owned(out)
}

/// Replaces whole JSON string values for which `replacement` answers (used to turn a
/// transaction's `urn:uuid:` references into the ids the server assigned). Strings are matched
/// on their raw bytes between the quotes, so values with escapes are never touched, and keys
/// are strings too: callers match only values that cannot be keys.
pub fn replace_string_values<'a>(
    json: &'a [u8],
    replacement: &dyn Fn(&str) -> Option<String>,
) -> Cow<'a, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied_up_to = 0;
    let mut at = 0;
    while at < json.len() {
        if json[at] != b'"' {
            at += 1;
            continue;
        }
        let start = at + 1;
        let mut end = start;
        let mut has_escape = false;
        while end < json.len() && json[end] != b'"' {
            if json[end] == b'\\' {
                has_escape = true;
                end += 1;
            }
            end += 1;
        }
        if end >= json.len() {
            break;
        }
        if !has_escape
            && let Ok(text) = std::str::from_utf8(&json[start..end])
            && let Some(new) = replacement(text)
        {
            let buffer = out.get_or_insert_with(|| Vec::with_capacity(json.len() + 64));
            buffer.extend_from_slice(&json[copied_up_to..start]);
            // A replacement is plain text: escape it as JSON would.
            let quoted = serde_json::to_string(&new).unwrap_or_default();
            buffer.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
            copied_up_to = end;
        }
        at = end + 1;
    }
    match out {
        None => Cow::Borrowed(json),
        Some(mut buffer) => {
            buffer.extend_from_slice(&json[copied_up_to..]);
            Cow::Owned(buffer)
        }
    }
}

const DUPLICATE_KEY: &str = "duplicate key \"";

type Fields<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

fn field<'a>(fields: &Fields<'a>, name: &str) -> Option<&'a RawValue> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, raw)| *raw)
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
}

/// Renders the top level with the server's `id`, and returns the bytes before and after the
/// point where `"versionId":..,"lastUpdated":..` belong (the start of `meta`).
fn split_around_version(
    fields: &Fields<'_>,
    id: &str,
) -> Result<(Vec<u8>, Vec<u8>), EnvelopeError> {
    let size: usize = fields
        .iter()
        .map(|(k, v)| k.len() + v.get().len() + 4)
        .sum();
    let mut before = Vec::with_capacity(size + id.len() + 32);
    let mut after = Vec::with_capacity(size);
    let has_id = fields.iter().any(|(k, _)| k == "id");
    let has_meta = fields.iter().any(|(k, _)| k == "meta");
    let mut out = &mut before;
    let mut first = true;
    out.push(b'{');
    let separate = |out: &mut Vec<u8>, first: &mut bool| {
        if !std::mem::take(first) {
            out.push(b',');
        }
    };
    for (key, raw) in fields {
        match key.as_ref() {
            "meta" => {
                separate(out, &mut first);
                write_key(out, "meta");
                out.push(b'{');
                let meta: TopLevel<'_> =
                    serde_json::from_str(raw.get()).map_err(|_| EnvelopeError::InvalidMeta)?;
                out = &mut after;
                for (meta_key, meta_raw) in &meta.0 {
                    if meta_key != "versionId" && meta_key != "lastUpdated" {
                        out.push(b',');
                        write_key(out, meta_key);
                        out.extend_from_slice(meta_raw.get().as_bytes());
                    }
                }
                out.push(b'}');
                continue;
            }
            "id" => {
                separate(out, &mut first);
                write_key(out, "id");
                let _ = serde_json::to_writer(&mut *out, id);
            }
            _ => {
                separate(out, &mut first);
                write_key(out, key);
                out.extend_from_slice(raw.get().as_bytes());
            }
        }
        let place_meta_here = !has_meta && ((key == "id") || (key == "resourceType" && !has_id));
        if key == "resourceType" && !has_id {
            out.extend_from_slice(b",\"id\":");
            let _ = serde_json::to_writer(&mut *out, id);
        }
        if place_meta_here {
            out.extend_from_slice(b",\"meta\":{");
            out = &mut after;
            out.push(b'}');
        }
    }
    out.push(b'}');
    Ok((before, after))
}

/// The patients whose compartment holds a stored resource (compact JSON), or none when the
/// bytes are not a JSON object.
pub fn compartment_of_body(resource_type: &str, body: &[u8]) -> Vec<String> {
    match serde_json::from_slice::<TopLevel<'_>>(body) {
        Ok(fields) => compartment_of(resource_type, &fields.0),
        Err(_) => Vec::new(),
    }
}

/// The `meta.tag` that marks a resource trimmed by `_elements` (clients compare the whole
/// object, so exactly these two keys).
pub const SUBSETTED_TAG: &str =
    r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}"#;

/// `_elements`: keeps `resourceType`, `id`, `meta`, the type's mandatory elements and those
/// `keep` names, and tags the result `SUBSETTED`. `None` when nothing would be removed (the
/// stored bytes are then exported unchanged) or the bytes are not a JSON object.
pub fn subset_elements(
    resource_type: &str,
    body: &[u8],
    keep: &dyn Fn(&str) -> bool,
) -> Option<Vec<u8>> {
    let fields = serde_json::from_slice::<TopLevel<'_>>(body).ok()?.0;
    let mandatory = crate::resource_type::mandatory_elements(resource_type).unwrap_or(&[]);
    let wanted = |key: &str| {
        matches!(key, "resourceType" | "id" | "meta")
            || keep(key)
            || mandatory.iter().any(|m| match m.strip_suffix("[x]") {
                // A choice element `value[x]` appears as `valueQuantity`, `valueString`, ...
                Some(stem) => {
                    key.starts_with(stem)
                        && key[stem.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                }
                None => *m == key,
            })
            || keep(&choice_stem(key))
    };
    if fields.iter().all(|(key, _)| wanted(key)) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    out.push(b'{');
    let mut first = true;
    let mut has_meta = false;
    for (key, raw) in &fields {
        if !wanted(key) {
            continue;
        }
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        write_key(&mut out, key);
        if key == "meta" {
            has_meta = true;
            write_meta_with_subsetted(&mut out, raw.get())?;
        } else {
            out.extend_from_slice(raw.get().as_bytes());
        }
    }
    if !has_meta {
        out.extend_from_slice(b",\"meta\":");
        write_meta_with_subsetted(&mut out, "{}")?;
    }
    out.push(b'}');
    Some(out)
}

/// `valueQuantity` → `value[x]`-style stem `value`, so `_elements=value` keeps the choice.
fn choice_stem(key: &str) -> String {
    match key.find(|c: char| c.is_ascii_uppercase()) {
        Some(at) if at > 0 => key[..at].to_owned(),
        _ => key.to_owned(),
    }
}

fn write_meta_with_subsetted(out: &mut Vec<u8>, meta: &str) -> Option<()> {
    let fields = serde_json::from_str::<TopLevel<'_>>(meta).ok()?.0;
    out.push(b'{');
    let mut wrote_tag = false;
    let mut first = true;
    for (key, raw) in &fields {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        write_key(out, key);
        if key == "tag" {
            let tags: Vec<&RawValue> = serde_json::from_str(raw.get()).ok()?;
            out.push(b'[');
            for tag in &tags {
                out.extend_from_slice(tag.get().as_bytes());
                out.push(b',');
            }
            out.extend_from_slice(SUBSETTED_TAG.as_bytes());
            out.push(b']');
            wrote_tag = true;
        } else {
            out.extend_from_slice(raw.get().as_bytes());
        }
    }
    if !wrote_tag {
        if !first {
            out.push(b',');
        }
        out.extend_from_slice(b"\"tag\":[");
        out.extend_from_slice(SUBSETTED_TAG.as_bytes());
        out.push(b']');
    }
    out.push(b'}');
    Some(())
}

/// Parses only the top-level elements a compartment link starts from.
fn compartment_of(resource_type: &str, fields: &Fields<'_>) -> Vec<String> {
    let Some(params) = compartment_params(resource_type) else {
        return Vec::new();
    };
    let mut linked = serde_json::Map::new();
    for (key, raw) in fields {
        let starts_a_link = params
            .iter()
            .flat_map(|param| param.paths.iter())
            .any(|path| path.first() == Some(&key.as_ref()));
        if (starts_a_link || key == "id")
            && let Ok(value) = serde_json::from_str(raw.get())
        {
            linked.insert(key.to_string(), value);
        }
    }
    patient_compartment_members(resource_type, &serde_json::Value::Object(linked))
}

/// The top level of a JSON object, in document order, values left unparsed.
struct TopLevel<'a>(Fields<'a>);

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopLevelVisitor;
        impl<'de> Visitor<'de> for TopLevelVisitor {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Fields<'de> = Vec::with_capacity(16);
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    if fields.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format_args!("{DUPLICATE_KEY}{key}\"")));
                    }
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(TopLevel(fields))
            }
        }
        deserializer.deserialize_map(TopLevelVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaired_surrogate_escapes_are_refused() {
        for body in [
            r#"{"resourceType":"Basic","id":"a","text":"x\ud90e1"}"#,
            r#"{"resourceType":"Basic","id":"a","text":"\udc00"}"#,
            r#"{"resourceType":"Basic","id":"a","text":"\ud83d\u0041"}"#,
            r#"{"resourceType":"Basic","id":"a","text":"\ud83d"}"#,
        ] {
            assert!(
                matches!(
                    prepare(body.as_bytes(), None, IdPolicy::FromBody),
                    Err(EnvelopeError::InvalidJson(_))
                ),
                "{body}"
            );
        }
        for body in [
            r#"{"resourceType":"Basic","id":"a","text":"\ud83d\ude00 \u00e9 \\ud800"}"#,
            r#"{"resourceType":"Basic","id":"a","text":"\\","code":{"text":"\"\u0041"}}"#,
        ] {
            assert!(
                prepare(body.as_bytes(), None, IdPolicy::FromBody).is_ok(),
                "{body}"
            );
        }
    }

    fn stored(body: &str, policy: IdPolicy<'_>) -> String {
        let prepared = prepare(body.as_bytes(), None, policy).unwrap();
        String::from_utf8(prepared.render(3, 0)).unwrap()
    }

    const STAMP: &str = r#""versionId":"3","lastUpdated":"1970-01-01T00:00:00.000000Z""#;

    #[test]
    fn keeps_every_byte_but_the_server_fields() {
        let body = r#"{"resourceType":"Observation","id":"o1","valueQuantity":{"value":1.50,"unit":"mg"},"status":"final"}"#;
        assert_eq!(
            stored(body, IdPolicy::FromBody),
            format!(
                r#"{{"resourceType":"Observation","id":"o1","meta":{{{STAMP}}},"valueQuantity":{{"value":1.50,"unit":"mg"}},"status":"final"}}"#
            )
        );
    }

    #[test]
    fn replaces_client_version_fields_and_keeps_the_rest_of_meta() {
        let body = r#"{"resourceType":"Patient","meta":{"versionId":"9","tag":[{"code":"x"}],"lastUpdated":"2020-01-01T00:00:00Z"},"id":"p"}"#;
        assert_eq!(
            stored(body, IdPolicy::FromBody),
            format!(
                r#"{{"resourceType":"Patient","meta":{{{STAMP},"tag":[{{"code":"x"}}]}},"id":"p"}}"#
            )
        );
    }

    #[test]
    fn compacts_pretty_input() {
        let body = "{\n  \"resourceType\" : \"Patient\",\n  \"id\": \"p\",\n  \"name\": [ { \"text\": \"A  B\" } ]\n}\n";
        assert_eq!(
            stored(body, IdPolicy::FromBody),
            format!(
                r#"{{"resourceType":"Patient","id":"p","meta":{{{STAMP}}},"name":[{{"text":"A  B"}}]}}"#
            )
        );
    }

    #[test]
    fn assigns_an_id_on_create() {
        let with_id = r#"{"resourceType":"Patient","id":"client","active":true}"#;
        let without_id = r#"{"resourceType":"Patient","active":true}"#;
        let expected =
            format!(r#"{{"resourceType":"Patient","id":"new","meta":{{{STAMP}}},"active":true}}"#);
        assert_eq!(stored(with_id, IdPolicy::Assign("new")), expected);
        assert_eq!(stored(without_id, IdPolicy::Assign("new")), expected);
    }

    #[test]
    fn same_content_same_hash_whatever_the_version_fields() {
        let a = prepare(
            br#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1"}}"#,
            None,
            IdPolicy::FromBody,
        )
        .unwrap();
        let b = prepare(
            br#"{"resourceType":"Patient","id":"p"}"#,
            None,
            IdPolicy::FromBody,
        )
        .unwrap();
        let c = prepare(
            br#"{"resourceType":"Patient","id":"p","active":true}"#,
            None,
            IdPolicy::FromBody,
        )
        .unwrap();
        assert_eq!(a.content_hash, b.content_hash);
        assert_ne!(a.content_hash, c.content_hash);
    }

    #[test]
    fn refuses_bad_envelopes() {
        let cases: &[(&str, Option<&str>, IdPolicy<'_>, EnvelopeError)] = &[
            (
                "{",
                None,
                IdPolicy::FromBody,
                EnvelopeError::InvalidJson(String::new()),
            ),
            ("[1]", None, IdPolicy::FromBody, EnvelopeError::NotAnObject),
            (
                r#"{"id":"x"}"#,
                None,
                IdPolicy::FromBody,
                EnvelopeError::MissingResourceType,
            ),
            (
                r#"{"resourceType":"Banana","id":"x"}"#,
                None,
                IdPolicy::FromBody,
                EnvelopeError::UnknownResourceType("Banana".into()),
            ),
            (
                r#"{"resourceType":"Patient","id":"x"}"#,
                Some("Observation"),
                IdPolicy::FromBody,
                EnvelopeError::TypeMismatch {
                    expected: "Observation".into(),
                    found: "Patient".into(),
                },
            ),
            (
                r#"{"resourceType":"Patient"}"#,
                None,
                IdPolicy::Expect("a"),
                EnvelopeError::MissingId,
            ),
            (
                r#"{"resourceType":"Patient","id":"b"}"#,
                None,
                IdPolicy::Expect("a"),
                EnvelopeError::IdMismatch {
                    url: "a".into(),
                    body: "b".into(),
                },
            ),
            (
                r#"{"resourceType":"Patient","id":"a b"}"#,
                None,
                IdPolicy::FromBody,
                EnvelopeError::InvalidId("a b".into()),
            ),
            (
                r#"{"resourceType":"Patient","id":"a","meta":1}"#,
                None,
                IdPolicy::FromBody,
                EnvelopeError::InvalidMeta,
            ),
            (
                r#"{"resourceType":"Patient","id":"a","id":"b"}"#,
                None,
                IdPolicy::FromBody,
                EnvelopeError::DuplicateKey("id".into()),
            ),
        ];
        for (body, expected_type, policy, want) in cases {
            let got = prepare(body.as_bytes(), *expected_type, *policy).unwrap_err();
            match (want, &got) {
                (EnvelopeError::InvalidJson(_), EnvelopeError::InvalidJson(_)) => {}
                _ => assert_eq!(&got, want, "{body}"),
            }
        }
    }

    #[test]
    fn replaces_whole_string_values_only() {
        let json = br#"{"a":{"reference":"urn:uuid:1"},"b":"urn:uuid:12","c":"x\"urn:uuid:1\""}"#;
        let out = replace_string_values(json, &|s| {
            (s == "urn:uuid:1").then(|| "Patient/p".to_owned())
        });
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a":{"reference":"Patient/p"},"b":"urn:uuid:12","c":"x\"urn:uuid:1\""}"#
        );
    }

    #[test]
    fn subsets_top_level_elements_and_tags_them() {
        let body = br#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50},"note":[{"text":"n"}]}"#;
        let keep_value = |e: &str| e == "value";
        let out = subset_elements("Observation", body, &keep_value).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            format!(
                r#"{{"resourceType":"Observation","id":"o","meta":{{"versionId":"1","tag":[{SUBSETTED_TAG}]}},"status":"final","code":{{"text":"x"}},"valueQuantity":{{"value":1.50}}}}"#
            )
        );
        let keep_all = |_: &str| true;
        assert!(subset_elements("Observation", body, &keep_all).is_none());
    }

    #[test]
    fn finds_the_patient_compartment() {
        let prepared = prepare(
            br#"{"resourceType":"Observation","id":"o","subject":{"reference":"Patient/p1"},"performer":[{"reference":"Practitioner/x"}]}"#,
            None,
            IdPolicy::FromBody,
        )
        .unwrap();
        assert_eq!(prepared.compartment, vec!["p1".to_owned()]);
    }
}
