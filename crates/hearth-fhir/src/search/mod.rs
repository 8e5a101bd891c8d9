//! FHIR R4 search parameters: parsing a query into a [`Filter`] and deciding whether a resource
//! matches it, for REST search (`GET [base]/Type?params`) and bulk export `_typeFilter`.
//!
//! The parameters, their types and their element paths come from the generated table
//! (`generated/search_parameters.rs`, written by `tools/gen_r4_tables.py` from the R4
//! SearchParameter definitions). A parameter whose FHIRPath the generator could not reduce to
//! plain paths, and every composite or special parameter, is refused by name
//! ([`SearchError::UnsupportedParameter`]) rather than evaluated approximately.
//!
//! Semantics (R4 search page), with the choices this engine makes where it leaves room:
//! - Repeated parameters are AND-ed, comma-separated values OR-ed (`\,` is a literal comma;
//!   `\|` and `\$` are literal too, `\\` a backslash).
//! - token: `code`, `system|code`, `|code` (no system), `system|`. Codings, CodeableConcepts
//!   (any coding), Identifiers (`system|value`), ContactPoints (`system|value`, the system
//!   being `phone`, `email`...), booleans and plain codes. Codes compare case-sensitively. A
//!   plain `code` element has an implicit system, which is not known here: a system in the
//!   search value is ignored for it. `:not` matches resources with no matching value
//!   (including those without the element); `:text` matches CodeableConcept.text,
//!   Coding.display or Identifier.type.text where a word starts with the value, ignoring case
//!   and accents (`code:text=diabetes` finds "Type 2 diabetes" but not "Prediabetes").
//! - string: case- and accent-insensitive prefix (see `text.rs` for the folding); `:exact`
//!   compares whole values exactly, `:contains` looks anywhere. HumanName and Address match on
//!   any of their parts.
//! - reference: `Type/id`, `id` (any type), an absolute URL (matched as the `Type/id` it ends
//!   with, or exactly), `:Type` with an id. Stored references match by their `Type/id`, with
//!   any service base and `_history` ignored. `where(resolve() is Type)` keeps only references
//!   to that type. References to canonicals compare the URL (and the version, if searched).
//! - date: comparisons between ranges, each implied by its value's precision (`2020` is the
//!   year); Period is its start to its end (open if one is missing); Timing is its events. `ap`
//!   widens the search range by 10 % of its distance from now, and by at least one day; the
//!   margin is fixed when the filter is parsed.
//! - number and quantity: the search value implies a range from its precision (`100` is
//!   `[99.5, 100.5)`) used by `eq`/`ne`/`sa`/`eb`; `gt`/`lt`/`ge`/`le` compare with the value
//!   itself; `ap` is within 10 %. Quantities: `value|system|code` matches system and code,
//!   `value||code` code or unit; no unit conversion. A Range matches as the interval it spans.
//! - uri: exact.
//! - `:missing=true|false` on every type. Any other modifier is refused, as are chained
//!   parameters (`subject.name`) and `_has`. A comparison prefix on a coded token or uri
//!   parameter (`status=gt2`) is refused as a value error, since only number, date and quantity
//!   take prefixes; identifiers and ids are free text, so they are left alone.
//! - When one element holds several values, the parameter matches if any of them does (`ne`
//!   included).
//!
//! [`Filter::matches_bytes`] works on stored compact JSON: a substring pre-check rejects most
//! non-matching rows without parsing, then only the top-level members the filter reads are
//! parsed. It decides exactly as [`Filter::matches`] does on the parsed resource, given valid
//! JSON without duplicate keys (which the store guarantees).

mod bytes;
mod number;
mod table;
mod text;

#[path = "../generated/search_parameters.rs"]
mod generated;

#[cfg(test)]
mod sample_tests;
#[cfg(test)]
mod tests;

use serde_json::Value;

use crate::instant::{Micros, now_micros, parse_date_range};
use crate::resource_type::{canonical_resource_type, is_resource_type};
use bytes::Needles;
use number::{DateValue, Decimal, Prefix};
use table::{ParamPath, Step, ValueType};

pub use table::{ParamType, SearchParamDef};

/// Why a search query was refused. Each names the parameter an OperationOutcome should point
/// at ([`SearchError::parameter`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("'{name}' is not a search parameter of {resource_type}")]
    UnknownParameter { resource_type: String, name: String },
    #[error("the search parameter '{name}' of {resource_type} is not supported")]
    UnsupportedParameter { resource_type: String, name: String },
    #[error("the modifier ':{modifier}' is not supported on the search parameter '{name}'")]
    UnsupportedModifier { name: String, modifier: String },
    #[error("the prefix '{prefix}' is not supported on the search parameter '{name}'")]
    UnsupportedPrefix { name: String, prefix: String },
    #[error("'{value}' is not a valid value for the search parameter '{name}': {reason}")]
    InvalidValue {
        name: String,
        value: String,
        reason: String,
    },
    #[error("'{name}' controls how results are returned; it is not a filter")]
    ResultParameter { name: String },
}

impl SearchError {
    /// The parameter to name in an OperationOutcome.
    pub fn parameter(&self) -> &str {
        match self {
            SearchError::UnknownParameter { name, .. }
            | SearchError::UnsupportedParameter { name, .. }
            | SearchError::UnsupportedModifier { name, .. }
            | SearchError::UnsupportedPrefix { name, .. }
            | SearchError::InvalidValue { name, .. }
            | SearchError::ResultParameter { name } => name,
        }
    }
}

/// Parameters that shape results rather than select resources.
const RESULT_PARAMETERS: &[&str] = &[
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_summary",
    "_elements",
    "_total",
    "_contained",
    "_containedType",
    "_format",
    "_pretty",
    "_cursor",
];

/// General FHIR search parameters that are not in the R4 SearchParameter bundle (or not for a
/// single-type search) and that this engine does not evaluate.
const UNSUPPORTED_GENERAL: &[&str] = &["_has", "_list", "_filter", "_type", "_query"];

/// A parsed search: an AND of parameters, each an OR of values.
#[derive(Debug, Clone)]
pub struct Filter {
    resource_type: &'static str,
    clauses: Vec<Clause>,
    /// Every top-level element some clause reads, for [`Filter::matches_bytes`].
    top_level: Vec<&'static str>,
    /// Further conditions from outside the query (an access token's granular scopes): a
    /// matching resource matches at least one filter of every group.
    within: Vec<Vec<Filter>>,
}

#[derive(Debug, Clone)]
struct Clause {
    paths: Vec<ParamPath>,
    test: Test,
    /// Literals one of which every matching resource contains, if the test allows a pre-check.
    needles: Option<Needles>,
}

#[derive(Debug, Clone)]
enum Test {
    Missing(bool),
    Token {
        values: Vec<TokenValue>,
        not: bool,
    },
    TokenText(Vec<String>),
    String {
        mode: StringMode,
        values: Vec<String>,
    },
    Reference(Vec<ReferenceValue>),
    Date(Vec<DateValue>),
    Uri(Vec<String>),
    Number(Vec<(Prefix, Decimal)>),
    Quantity(Vec<QuantityValue>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringMode {
    Prefix,
    Exact,
    Contains,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SystemMatch {
    Any,
    /// `|code`: the value must have no system.
    Absent,
    Is(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenValue {
    system: SystemMatch,
    /// `None` for `system|`.
    code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ReferenceValue {
    /// The value as given, for exact comparison (`urn:uuid:...`, canonical URLs).
    raw: String,
    /// Resource type, when the value names one (`Type/id`, a URL ending in it, `:Type`).
    resource_type: Option<String>,
    id: Option<String>,
}

#[derive(Debug, Clone)]
struct QuantityValue {
    prefix: Prefix,
    number: Decimal,
    system: Option<String>,
    code: Option<String>,
}

impl Filter {
    /// Parses search parameters, already URL-decoded, in order.
    ///
    /// Repeated names are AND-ed, commas inside a value OR-ed (a `\,` is a literal comma).
    pub fn parse(resource_type: &str, params: &[(String, String)]) -> Result<Filter, SearchError> {
        let resource_type =
            canonical_resource_type(resource_type).ok_or_else(|| SearchError::InvalidValue {
                name: "_type".to_owned(),
                value: resource_type.to_owned(),
                reason: "not an R4 resource type".to_owned(),
            })?;
        let now = now_micros();
        let mut clauses = Vec::with_capacity(params.len());
        for (name, value) in params {
            clauses.push(parse_clause(resource_type, name, value, now)?);
        }
        let mut top_level: Vec<&'static str> = clauses
            .iter()
            .flat_map(|c| {
                c.paths
                    .iter()
                    .filter_map(|p| p.steps.first().map(|s| s.name))
            })
            .collect();
        top_level.sort_unstable();
        top_level.dedup();
        Ok(Filter {
            resource_type,
            clauses,
            top_level,
            within: Vec::new(),
        })
    }

    /// Narrows this filter to resources that also match at least one of `alternatives`
    /// (filters of the same type; others never match).
    pub fn within_any(mut self, alternatives: Vec<Filter>) -> Filter {
        let alternatives = alternatives
            .into_iter()
            .filter(|f| f.resource_type == self.resource_type)
            .collect();
        self.within.push(alternatives);
        self
    }

    /// Parses one `_typeFilter` value, `Type?name=value&...` with the query part URL-encoded.
    pub fn parse_type_filter(value: &str) -> Result<(&'static str, Filter), SearchError> {
        let invalid = |reason: &str| SearchError::InvalidValue {
            name: "_typeFilter".to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let (type_name, query) = value
            .split_once('?')
            .ok_or_else(|| invalid("expected a search of one type, 'Type?name=value&...'"))?;
        let resource_type = canonical_resource_type(type_name)
            .ok_or_else(|| invalid("it does not start with an R4 resource type"))?;
        let mut params = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (name, param_value) = part.split_once('=').unwrap_or((part, ""));
            let name = percent_decode(name).ok_or_else(|| invalid("bad percent-encoding"))?;
            let param_value =
                percent_decode(param_value).ok_or_else(|| SearchError::InvalidValue {
                    name: name.clone(),
                    value: param_value.to_owned(),
                    reason: "bad percent-encoding".to_owned(),
                })?;
            // S2 clients comma-join whole queries; one that reached here unsplit would
            // otherwise be read as extra OR values ("active,MedicationRequest?status=stopped").
            if split_or(&param_value).iter().skip(1).any(|v| {
                v.split_once('?')
                    .is_some_and(|(t, _)| canonical_resource_type(t).is_some())
            }) {
                return Err(invalid(
                    "holds several queries joined by commas; each is a _typeFilter of its own",
                ));
            }
            params.push((name, param_value));
        }
        let filter = Filter::parse(resource_type, &params)?;
        Ok((resource_type, filter))
    }

    /// Whether `resource` (of this filter's type; the caller selects by type) matches.
    pub fn matches(&self, resource: &Value) -> bool {
        let mut scratch = String::new();
        self.clauses
            .iter()
            .all(|clause| clause.matches(Root::Resource(resource), &mut scratch))
            && self
                .within
                .iter()
                .all(|group| group.iter().any(|f| f.matches(resource)))
    }

    /// Whether the stored compact JSON `body` matches; the same decision as [`Filter::matches`]
    /// on the parsed resource, without parsing it whole. Bytes that are not a JSON object
    /// never match.
    pub fn matches_bytes(&self, body: &[u8]) -> bool {
        if !self
            .within
            .iter()
            .all(|group| group.iter().any(|f| f.matches_bytes(body)))
        {
            return false;
        }
        if self.clauses.is_empty() {
            return true;
        }
        let mut escapes = bytes::Escapes::default();
        if !self.clauses.iter().all(|clause| {
            clause
                .needles
                .as_ref()
                .is_none_or(|needles| needles.may_match(body, &mut escapes))
        }) {
            return false;
        }
        let mut found: Vec<Option<&[u8]>> = vec![None; self.top_level.len()];
        if bytes::find_top_level(body, &self.top_level, &mut found).is_none() {
            return false;
        }
        let mut members: Vec<(&'static str, Value)> = Vec::with_capacity(found.len());
        for (name, raw) in self.top_level.iter().zip(found) {
            if let Some(raw) = raw {
                match serde_json::from_slice::<Value>(raw) {
                    Ok(value) => members.push((name, value)),
                    Err(_) => return false,
                }
            }
        }
        let mut scratch = String::new();
        self.clauses
            .iter()
            .all(|clause| clause.matches(Root::Members(&members), &mut scratch))
    }

    /// The resource type this filter applies to.
    pub fn resource_type(&self) -> &'static str {
        self.resource_type
    }
}

/// The search parameters `resource_type` supports, as (code, type) for the CapabilityStatement:
/// its own, then those every resource has. Empty for a name that is not a resource type.
pub fn supported_parameters(resource_type: &str) -> Vec<(&'static str, &'static str)> {
    if !is_resource_type(resource_type) {
        return Vec::new();
    }
    table::definitions(resource_type)
        .filter(|def| def.is_supported())
        .map(|def| (def.code, def.param_type.as_str()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

fn parse_clause(
    resource_type: &'static str,
    raw_name: &str,
    value: &str,
    now: Micros,
) -> Result<Clause, SearchError> {
    let (name, modifier) = match raw_name.split_once(':') {
        Some((name, modifier)) => (name, Some(modifier)),
        None => (raw_name, None),
    };
    if RESULT_PARAMETERS.contains(&name) {
        return Err(SearchError::ResultParameter {
            name: name.to_owned(),
        });
    }
    let unsupported = |name: &str| SearchError::UnsupportedParameter {
        resource_type: resource_type.to_owned(),
        name: name.to_owned(),
    };
    if UNSUPPORTED_GENERAL.contains(&name) {
        return Err(unsupported(name));
    }
    // A chain: `subject.name=x` or `subject:Patient.name=x`.
    if let Some((head, _)) = raw_name.split_once('.') {
        let head = head.split_once(':').map_or(head, |(h, _)| h);
        return Err(match table::lookup(resource_type, head) {
            Some(_) => unsupported(raw_name),
            None => SearchError::UnknownParameter {
                resource_type: resource_type.to_owned(),
                name: head.to_owned(),
            },
        });
    }
    let def = table::lookup(resource_type, name).ok_or_else(|| SearchError::UnknownParameter {
        resource_type: resource_type.to_owned(),
        name: name.to_owned(),
    })?;
    let paths = match table::parse_paths(def) {
        Some(paths) if def.is_supported() => paths,
        _ => return Err(unsupported(name)),
    };
    let name = def.code;
    let invalid = |value: &str, reason: &str| SearchError::InvalidValue {
        name: name.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let bad_modifier = |modifier: &str| SearchError::UnsupportedModifier {
        name: name.to_owned(),
        modifier: modifier.to_owned(),
    };

    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(invalid(value, ":missing takes true or false")),
        };
        return Ok(Clause {
            paths,
            test: Test::Missing(missing),
            needles: None,
        });
    }

    let values = split_or(value);
    if values.iter().any(|v| v.is_empty()) {
        return Err(invalid(value, "empty value"));
    }
    let param_type = def.param_type;
    let refuses_prefixes = match param_type {
        ParamType::Uri => true,
        ParamType::Token => {
            name != "_id"
                && paths.iter().all(|p| {
                    !matches!(
                        p.value_type,
                        ValueType::Identifier | ValueType::ContactPoint
                    )
                })
        }
        _ => false,
    };
    if refuses_prefixes {
        for v in &values {
            let text = unescape(v);
            if let Ok((_, rest)) = number::split_prefix(&text)
                && prefix_given(&text)
                && (number::parse_decimal(rest).is_some() || parse_date_range(rest).is_ok())
            {
                return Err(invalid(
                    &text,
                    "prefixes such as gt or le apply to number, date and quantity parameters only",
                ));
            }
        }
    }

    let (test, needles) = match param_type {
        ParamType::Token => match modifier {
            None | Some("not") => {
                let values: Vec<TokenValue> = values.iter().map(|v| parse_token(v)).collect();
                let not = modifier == Some("not");
                let any_boolean = paths.iter().any(|p| p.value_type == ValueType::Boolean);
                // Plain codes and booleans ignore a searched system, so only a code is a
                // literal every match of theirs contains.
                let system_checked = paths
                    .iter()
                    .all(|p| !matches!(p.value_type, ValueType::Str | ValueType::Boolean));
                let needles = if not {
                    None
                } else {
                    Needles::new(values.iter().map(|v| {
                        let literal = v.code.as_deref().or(match &v.system {
                            SystemMatch::Is(system) if system_checked => Some(system.as_str()),
                            _ => None,
                        })?;
                        // Booleans are bare JSON literals; everything else is a whole string.
                        Some(if any_boolean {
                            literal.to_owned()
                        } else {
                            format!("\"{literal}\"")
                        })
                    }))
                };
                (Test::Token { values, not }, needles)
            }
            Some("text") => {
                let values = values.iter().map(|v| text::fold(&unescape(v))).collect();
                (Test::TokenText(values), None)
            }
            Some(other) => return Err(bad_modifier(other)),
        },
        ParamType::String => {
            let mode = match modifier {
                None => StringMode::Prefix,
                Some("exact") => StringMode::Exact,
                Some("contains") => StringMode::Contains,
                Some(other) => return Err(bad_modifier(other)),
            };
            let raw: Vec<String> = values.iter().map(|v| unescape(v)).collect();
            let needles = match mode {
                StringMode::Exact => Needles::new(raw.iter().map(|v| Some(format!("\"{v}\"")))),
                _ => None,
            };
            let values = match mode {
                StringMode::Exact => raw,
                _ => raw.iter().map(|v| text::fold(v)).collect(),
            };
            (Test::String { mode, values }, needles)
        }
        ParamType::Reference => {
            let type_modifier = match modifier {
                None => None,
                Some(t) if is_resource_type(t) => Some(t),
                Some(other) => return Err(bad_modifier(other)),
            };
            let values = values
                .iter()
                .map(|v| parse_reference(&unescape(v), type_modifier).map_err(|r| invalid(v, r)))
                .collect::<Result<Vec<_>, _>>()?;
            let needles = Needles::new(values.iter().map(|v| {
                Some(match (&v.resource_type, &v.id) {
                    (Some(t), Some(id)) => format!("{t}/{id}"),
                    (None, Some(id)) => id.clone(),
                    _ => v.raw.split('|').next().unwrap_or_default().to_owned(),
                })
            }));
            (Test::Reference(values), needles)
        }
        ParamType::Date => {
            if let Some(other) = modifier {
                return Err(bad_modifier(other));
            }
            let values = values
                .iter()
                .map(|v| {
                    let text = unescape(v);
                    // An unencoded '+' in a time zone arrives as a space.
                    let (prefix, range) = prefixed(
                        name,
                        &text,
                        |rest| parse_date_range(&rest.replace(' ', "+")).ok(),
                        "expected a date, e.g. 2020, 2020-03-01 or 2020-03-01T10:00:00Z",
                    )?;
                    Ok(DateValue {
                        prefix,
                        range,
                        ap_margin: number::ap_margin(range, now),
                    })
                })
                .collect::<Result<Vec<_>, SearchError>>()?;
            (Test::Date(values), None)
        }
        ParamType::Uri => {
            if let Some(other) = modifier {
                return Err(bad_modifier(other));
            }
            let values: Vec<String> = values.iter().map(|v| unescape(v)).collect();
            let needles = Needles::new(values.iter().map(|v| Some(format!("\"{v}\""))));
            (Test::Uri(values), needles)
        }
        ParamType::Number => {
            if let Some(other) = modifier {
                return Err(bad_modifier(other));
            }
            let values = values
                .iter()
                .map(|v| {
                    let text = unescape(v);
                    let (prefix, number) = prefixed(
                        name,
                        &text,
                        number::parse_decimal,
                        "expected a decimal number",
                    )?;
                    Ok((prefix, number))
                })
                .collect::<Result<Vec<_>, SearchError>>()?;
            (Test::Number(values), None)
        }
        ParamType::Quantity => {
            if let Some(other) = modifier {
                return Err(bad_modifier(other));
            }
            let values = values
                .iter()
                .map(|v| parse_quantity(name, v))
                .collect::<Result<Vec<_>, SearchError>>()?;
            let needles = Needles::new(
                values
                    .iter()
                    .map(|v| v.code.as_ref().map(|code| format!("\"{code}\""))),
            );
            (Test::Quantity(values), needles)
        }
        ParamType::Composite | ParamType::Special => return Err(unsupported(name)),
    };
    Ok(Clause {
        paths,
        test,
        needles,
    })
}

/// Reads `[prefix]value`. Two letters that are not a prefix but precede a valid value are an
/// unsupported prefix; anything else unreadable is an invalid value.
fn prefixed<T>(
    name: &str,
    text: &str,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<(Prefix, T), SearchError> {
    let invalid = || SearchError::InvalidValue {
        name: name.to_owned(),
        value: text.to_owned(),
        reason: expected.to_owned(),
    };
    match number::split_prefix(text) {
        Ok((prefix, rest)) => parse(rest).map(|v| (prefix, v)).ok_or_else(invalid),
        Err(letters) if parse(&text[letters.len()..]).is_some() => {
            Err(SearchError::UnsupportedPrefix {
                name: name.to_owned(),
                prefix: letters.to_owned(),
            })
        }
        Err(_) => Err(invalid()),
    }
}

/// Whether `text` really starts with a prefix (and is not, say, the number `2`).
fn prefix_given(text: &str) -> bool {
    text.get(..2)
        .is_some_and(|head| number::PREFIXES.iter().any(|(p, _)| *p == head))
}

/// Splits on commas not escaped by a backslash; escapes stay for the later split on `|`.
fn split_or(value: &str) -> Vec<&str> {
    split_unescaped(value, b',')
}

fn split_unescaped(value: &str, separator: u8) -> Vec<&str> {
    let bytes = value.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b if b == separator => {
                parts.push(&value[start..at]);
                at += 1;
                start = at;
            }
            _ => at += 1,
        }
    }
    parts.push(&value[start.min(value.len())..]);
    parts
}

/// Removes the search escapes `\,` `\|` `\$` `\\`; other backslashes are literal.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next) = chars.peek()
            && matches!(next, ',' | '|' | '$' | '\\')
        {
            out.push(next);
            chars.next();
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_token(value: &str) -> TokenValue {
    let parts = split_unescaped(value, b'|');
    if parts.len() == 1 {
        return TokenValue {
            system: SystemMatch::Any,
            code: Some(unescape(value)),
        };
    }
    // The first unescaped '|' separates system and code; any later one is part of the code.
    let system = parts[0];
    let code = &value[system.len() + 1..];
    TokenValue {
        system: if system.is_empty() {
            SystemMatch::Absent
        } else {
            SystemMatch::Is(unescape(system))
        },
        code: (!code.is_empty()).then(|| unescape(code)),
    }
}

fn parse_reference(
    value: &str,
    type_modifier: Option<&str>,
) -> Result<ReferenceValue, &'static str> {
    let (resource_type, id) = match value.split_once("://") {
        Some(_) => match split_stored_reference(value) {
            Some((t, id)) => (Some(t.to_owned()), Some(id.to_owned())),
            None => (None, None),
        },
        None if value.contains('/') => {
            let without_history = strip_history(value);
            let (t, id) = without_history
                .split_once('/')
                .filter(|(t, id)| is_resource_type(t) && crate::envelope::is_valid_id(id))
                .ok_or("expected Type/id, an id, or an absolute URL")?;
            (Some(t.to_owned()), Some(id.to_owned()))
        }
        None if crate::envelope::is_valid_id(value) => (None, Some(value.to_owned())),
        None => (None, None),
    };
    let resource_type = match (type_modifier, resource_type) {
        (Some(m), Some(t)) if m != t => {
            return Err("the value names a different type than the modifier");
        }
        (Some(m), _) if id.is_some() => Some(m.to_owned()),
        (Some(_), _) => return Err("a :Type modifier needs an id"),
        (None, t) => t,
    };
    Ok(ReferenceValue {
        raw: value.to_owned(),
        resource_type,
        id,
    })
}

fn parse_quantity(name: &str, value: &str) -> Result<QuantityValue, SearchError> {
    let invalid = |reason: &str| SearchError::InvalidValue {
        name: name.to_owned(),
        value: unescape(value),
        reason: reason.to_owned(),
    };
    let parts = split_unescaped(value, b'|');
    if parts.len() != 1 && parts.len() != 3 {
        return Err(invalid(
            "expected number, number|system|code or number||code",
        ));
    }
    let number_text = unescape(parts[0]);
    let (prefix, number) = prefixed(
        name,
        &number_text,
        number::parse_decimal,
        "expected a decimal number",
    )?;
    let non_empty = |s: &str| (!s.is_empty()).then(|| unescape(s));
    let (system, code) = match parts.as_slice() {
        [_, system, code] => (non_empty(system), non_empty(code)),
        _ => (None, None),
    };
    if system.is_some() && code.is_none() {
        return Err(invalid("a system needs a code"));
    }
    Ok(QuantityValue {
        prefix,
        number,
        system,
        code,
    })
}

/// Decodes `%XX` and `+` (a space, as in HTML forms and as axum's query extractor reads it).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let hex = bytes.get(at + 1..at + 3)?;
                let digit = |b: u8| char::from(b).to_digit(16);
                out.push((digit(hex[0])? * 16 + digit(hex[1])?) as u8);
                at += 3;
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            b => {
                out.push(b);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------------------------

impl Clause {
    fn matches(&self, resource: Root<'_>, scratch: &mut String) -> bool {
        match &self.test {
            Test::Missing(missing) => {
                let present = self.any(resource, &mut |node, path| match path.target {
                    Some(target) => reference_type(node) == Some(target),
                    None => !node.is_null(),
                });
                present != *missing
            }
            Test::Token { values, not } => {
                let found = self.any(resource, &mut |node, path| {
                    values
                        .iter()
                        .any(|v| token_matches(node, path.value_type, v))
                });
                found != *not
            }
            Test::TokenText(values) => self.any(resource, &mut |node, path| {
                values
                    .iter()
                    .any(|v| token_text_matches(node, path.value_type, v, scratch))
            }),
            Test::String { mode, values } => self.any(resource, &mut |node, path| {
                values
                    .iter()
                    .any(|v| string_matches(node, path.value_type, *mode, v, scratch))
            }),
            Test::Reference(values) => self.any(resource, &mut |node, path| {
                values.iter().any(|v| reference_matches(node, path, v))
            }),
            Test::Date(values) => self.any(resource, &mut |node, path| {
                date_ranges(node, path.value_type, &mut |start, end| {
                    values.iter().any(|v| number::compare_dates(v, start, end))
                })
            }),
            Test::Uri(values) => self.any(resource, &mut |node, _| {
                node.as_str().is_some_and(|s| values.iter().any(|v| v == s))
            }),
            Test::Number(values) => self.any(resource, &mut |node, path| {
                number_interval(node, path.value_type).is_some_and(|(low, high)| {
                    values
                        .iter()
                        .any(|(prefix, q)| number::compare_numbers(*prefix, q, low, high))
                })
            }),
            Test::Quantity(values) => self.any(resource, &mut |node, path| {
                values
                    .iter()
                    .any(|v| quantity_matches(node, path.value_type, v))
            }),
        }
    }

    /// Whether `f` holds for some value at the end of some path.
    fn any(&self, resource: Root<'_>, f: &mut dyn FnMut(&Value, &ParamPath) -> bool) -> bool {
        self.paths.iter().any(|path| {
            let Some((first, rest)) = path.steps.split_first() else {
                return false;
            };
            resource
                .member(first.name)
                .is_some_and(|child| walk_child(child, first, rest, &mut |node| f(node, path)))
        })
    }
}

/// Where a clause starts: the whole resource, or (deciding from bytes) only the top-level
/// members the filter reads, parsed.
#[derive(Clone, Copy)]
enum Root<'a> {
    Resource(&'a Value),
    Members(&'a [(&'static str, Value)]),
}

impl<'a> Root<'a> {
    fn member(self, name: &str) -> Option<&'a Value> {
        match self {
            Root::Resource(resource) => resource.as_object().and_then(|o| o.get(name)),
            Root::Members(members) => members.iter().find(|(n, _)| *n == name).map(|(_, v)| v),
        }
    }
}

/// Follows `steps` from `node`, fanning out over arrays (one level: FHIR JSON has no arrays of
/// arrays, and recursing into them would let input choose the depth).
fn walk(node: &Value, steps: &[Step], f: &mut dyn FnMut(&Value) -> bool) -> bool {
    let Some((step, rest)) = steps.split_first() else {
        return f(node);
    };
    match node.as_object().and_then(|o| o.get(step.name)) {
        Some(child) => walk_child(child, step, rest, f),
        None => false,
    }
}

/// Continues a walk at `child`, the value found for `step`.
fn walk_child(
    child: &Value,
    step: &Step,
    rest: &[Step],
    f: &mut dyn FnMut(&Value) -> bool,
) -> bool {
    let kept = |item: &Value| match step.filter {
        None => true,
        Some((key, value)) => item.get(key).and_then(Value::as_str) == Some(value),
    };
    match child {
        Value::Array(items) => items
            .iter()
            .any(|item| kept(item) && walk(item, rest, &mut *f)),
        Value::Null => false,
        _ => kept(child) && walk(child, rest, f),
    }
}

fn str_field<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    node.get(key).and_then(Value::as_str)
}

fn token_matches(node: &Value, value_type: ValueType, v: &TokenValue) -> bool {
    let pair_matches = |system: Option<&str>, code: Option<&str>| {
        let system_ok = match &v.system {
            SystemMatch::Any => true,
            SystemMatch::Absent => system.is_none_or(str::is_empty),
            SystemMatch::Is(s) => system == Some(s.as_str()),
        };
        system_ok && v.code.as_deref().is_none_or(|c| code == Some(c))
    };
    match value_type {
        ValueType::Coding => {
            node.is_object() && pair_matches(str_field(node, "system"), str_field(node, "code"))
        }
        ValueType::CodeableConcept => match node.get("coding") {
            Some(Value::Array(codings)) => codings.iter().any(|c| {
                c.is_object() && pair_matches(str_field(c, "system"), str_field(c, "code"))
            }),
            Some(c @ Value::Object(_)) => {
                pair_matches(str_field(c, "system"), str_field(c, "code"))
            }
            _ => false,
        },
        ValueType::Identifier | ValueType::ContactPoint => {
            node.is_object() && pair_matches(str_field(node, "system"), str_field(node, "value"))
        }
        ValueType::Str | ValueType::Boolean => {
            let text = match node {
                Value::String(s) => s.as_str(),
                Value::Bool(true) => "true",
                Value::Bool(false) => "false",
                _ => return false,
            };
            // The system of a plain code is implicit in its binding, unknown here: ignored.
            match &v.code {
                Some(c) => c == text,
                None => true,
            }
        }
        _ => false,
    }
}

fn token_text_matches(
    node: &Value,
    value_type: ValueType,
    needle: &str,
    scratch: &mut String,
) -> bool {
    let mut test =
        |text: Option<&str>| text.is_some_and(|t| text::folded_word_prefix(t, needle, scratch));
    match value_type {
        ValueType::CodeableConcept => {
            test(str_field(node, "text"))
                || match node.get("coding") {
                    Some(Value::Array(codings)) => {
                        codings.iter().any(|c| test(str_field(c, "display")))
                    }
                    Some(c) => test(str_field(c, "display")),
                    None => false,
                }
        }
        ValueType::Coding => test(str_field(node, "display")),
        ValueType::Identifier => test(node.get("type").and_then(|t| str_field(t, "text"))),
        _ => false,
    }
}

const HUMAN_NAME_PARTS: &[&str] = &["text", "family", "given", "prefix", "suffix"];
const ADDRESS_PARTS: &[&str] = &[
    "text",
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
];

fn string_matches(
    node: &Value,
    value_type: ValueType,
    mode: StringMode,
    needle: &str,
    scratch: &mut String,
) -> bool {
    let mut test = |text: &str| match mode {
        StringMode::Exact => text == needle,
        StringMode::Prefix => text::folded_starts_with(text, needle, scratch),
        StringMode::Contains => text::folded_contains(text, needle, scratch),
    };
    let parts = match value_type {
        ValueType::HumanName => HUMAN_NAME_PARTS,
        ValueType::Address => ADDRESS_PARTS,
        _ => return node.as_str().is_some_and(test),
    };
    parts.iter().any(|part| match node.get(*part) {
        Some(Value::String(s)) => test(s),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).any(&mut test),
        _ => false,
    })
}

/// `/_history/<v>` stripped from the end of a reference.
fn strip_history(reference: &str) -> &str {
    match reference.rsplit_once("/_history/") {
        Some((head, version)) if !version.is_empty() && !version.contains('/') => head,
        _ => reference,
    }
}

/// The `(Type, id)` a literal reference names: `Type/id`, `Type/id/_history/v`, or an absolute
/// URL ending in either. Contained (`#x`), `urn:` and conditional references give `None`.
fn split_stored_reference(reference: &str) -> Option<(&str, &str)> {
    let path = strip_history(reference);
    let absolute = match path.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() && !scheme.contains('/') => Some(rest),
        Some(_) => return None,
        None => None,
    };
    let (head, id) = path.rsplit_once('/')?;
    let resource_type = head.rsplit('/').next()?;
    // A relative reference is exactly `Type/id`; only an absolute URL carries a service base.
    if absolute.is_none() && head.contains('/') {
        return None;
    }
    (is_resource_type(resource_type) && crate::envelope::is_valid_id(id))
        .then_some((resource_type, id))
}

fn reference_type(node: &Value) -> Option<&str> {
    str_field(node, "reference")
        .and_then(split_stored_reference)
        .map(|(t, _)| t)
}

fn reference_matches(node: &Value, path: &ParamPath, v: &ReferenceValue) -> bool {
    match path.value_type {
        ValueType::Reference => {
            let Some(stored) = str_field(node, "reference") else {
                return false;
            };
            let parsed = split_stored_reference(stored);
            if let Some(target) = path.target
                && parsed.is_none_or(|(t, _)| t != target)
            {
                return false;
            }
            if stored == v.raw {
                return true;
            }
            match (parsed, &v.resource_type, &v.id) {
                (Some((t, id)), Some(want_t), Some(want_id)) => t == want_t && id == want_id,
                (Some((_, id)), None, Some(want_id)) => id == want_id,
                _ => false,
            }
        }
        ValueType::Canonical => {
            let Some(stored) = node.as_str() else {
                return false;
            };
            let (url, version) = stored
                .split_once('|')
                .map_or((stored, None), |(u, v)| (u, Some(v)));
            match v.raw.split_once('|') {
                Some((want_url, want_version)) => url == want_url && version == Some(want_version),
                None => url == v.raw,
            }
        }
        _ => false,
    }
}

/// Calls `f` with each `[start, end)` a date-like value covers, until it returns true.
fn date_ranges(
    node: &Value,
    value_type: ValueType,
    f: &mut dyn FnMut(Micros, Micros) -> bool,
) -> bool {
    let range_of = |text: &str| parse_date_range(text).ok();
    match value_type {
        ValueType::DateTime => node
            .as_str()
            .and_then(range_of)
            .is_some_and(|r| f(r.start, r.end)),
        ValueType::Period => {
            let start = str_field(node, "start").map(range_of);
            let end = str_field(node, "end").map(range_of);
            match (start, end) {
                // An unreadable bound makes the period unknowable, not open.
                (Some(None), _) | (_, Some(None)) | (None, None) => false,
                (start, end) => f(
                    start.flatten().map_or(Micros::MIN, |r| r.start),
                    end.flatten().map_or(Micros::MAX, |r| r.end),
                ),
            }
        }
        ValueType::Timing => match node.get("event") {
            Some(Value::Array(events)) => events
                .iter()
                .filter_map(Value::as_str)
                .filter_map(range_of)
                .any(|r| f(r.start, r.end)),
            _ => false,
        },
        _ => false,
    }
}

/// The closed interval a number-like value covers.
fn number_interval(node: &Value, value_type: ValueType) -> Option<(f64, f64)> {
    match value_type {
        ValueType::Decimal => node.as_f64().map(|n| (n, n)),
        ValueType::Range => range_interval(node),
        _ => None,
    }
}

fn range_interval(node: &Value) -> Option<(f64, f64)> {
    let low = node
        .get("low")
        .and_then(|q| q.get("value"))
        .and_then(Value::as_f64);
    let high = node
        .get("high")
        .and_then(|q| q.get("value"))
        .and_then(Value::as_f64);
    if low.is_none() && high.is_none() {
        return None;
    }
    Some((
        low.unwrap_or(f64::NEG_INFINITY),
        high.unwrap_or(f64::INFINITY),
    ))
}

const CURRENCY_SYSTEM: &str = "urn:iso:std:iso:4217";

fn quantity_matches(node: &Value, value_type: ValueType, v: &QuantityValue) -> bool {
    let units_match =
        |system: Option<&str>, code: Option<&str>, unit: Option<&str>| match (&v.system, &v.code) {
            (Some(s), Some(c)) => system == Some(s.as_str()) && code == Some(c.as_str()),
            (None, Some(c)) => code == Some(c.as_str()) || unit == Some(c.as_str()),
            _ => true,
        };
    let (interval, unit_ok) = match value_type {
        ValueType::Quantity => (
            node.get("value").and_then(Value::as_f64).map(|n| (n, n)),
            units_match(
                str_field(node, "system"),
                str_field(node, "code"),
                str_field(node, "unit"),
            ),
        ),
        ValueType::Money => {
            let currency = str_field(node, "currency");
            (
                node.get("value").and_then(Value::as_f64).map(|n| (n, n)),
                units_match(currency.map(|_| CURRENCY_SYSTEM), currency, None),
            )
        }
        ValueType::Range => {
            // The bounds share a unit; use whichever bound is present.
            let bound = node
                .get("low")
                .filter(|b| b.is_object())
                .or_else(|| node.get("high"));
            let unit = |key| bound.and_then(|b| str_field(b, key));
            (
                range_interval(node),
                units_match(unit("system"), unit("code"), unit("unit")),
            )
        }
        _ => (None, false),
    };
    unit_ok
        && interval
            .is_some_and(|(low, high)| number::compare_numbers(v.prefix, &v.number, low, high))
}
