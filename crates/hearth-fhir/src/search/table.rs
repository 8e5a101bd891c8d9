//! The generated search parameter table and the small path language its rows use.

use super::generated::SEARCH_PARAMETERS;

/// The type of a search parameter, as in `SearchParameter.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    Token,
    String,
    Reference,
    Date,
    Uri,
    Quantity,
    Number,
    Composite,
    Special,
}

impl ParamType {
    /// The FHIR code, as a CapabilityStatement lists it.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Token => "token",
            ParamType::String => "string",
            ParamType::Reference => "reference",
            ParamType::Date => "date",
            ParamType::Uri => "uri",
            ParamType::Quantity => "quantity",
            ParamType::Number => "number",
            ParamType::Composite => "composite",
            ParamType::Special => "special",
        }
    }
}

/// One row of the generated table: a search parameter of one resource type (or of every type,
/// under `Resource` / `DomainResource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchParamDef {
    pub resource_type: &'static str,
    pub code: &'static str,
    pub param_type: ParamType,
    /// Branches in the path language described in the generated file's header.
    pub paths: &'static str,
    /// Why the parameter cannot be evaluated; empty when it can.
    pub unsupported: &'static str,
}

impl SearchParamDef {
    pub fn is_supported(&self) -> bool {
        self.unsupported.is_empty()
    }
}

/// Pseudo-types whose rows every resource type inherits. `DomainResource` strictly excludes
/// Bundle, Binary and Parameters, but its only parameter (`_text`) is refused anyway.
const COMMON_BASES: [&str; 2] = ["Resource", "DomainResource"];

fn rows_of(resource_type: &str) -> &'static [SearchParamDef] {
    let start = SEARCH_PARAMETERS.partition_point(|row| row.resource_type < resource_type);
    let len = SEARCH_PARAMETERS[start..].partition_point(|row| row.resource_type == resource_type);
    &SEARCH_PARAMETERS[start..start + len]
}

/// The definition of `code` for `resource_type` (its own, then the inherited ones).
pub(crate) fn lookup(resource_type: &str, code: &str) -> Option<&'static SearchParamDef> {
    std::iter::once(resource_type)
        .chain(COMMON_BASES)
        .find_map(|base| {
            let rows = rows_of(base);
            rows.binary_search_by(|row| row.code.cmp(code))
                .ok()
                .map(|i| &rows[i])
        })
}

/// Every definition that applies to `resource_type`: its own, then the inherited ones.
pub(crate) fn definitions(resource_type: &str) -> impl Iterator<Item = &'static SearchParamDef> {
    rows_of(resource_type)
        .iter()
        .chain(COMMON_BASES.into_iter().flat_map(rows_of))
}

/// How the values found at the end of a path are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueType {
    Coding,
    CodeableConcept,
    Identifier,
    ContactPoint,
    /// A JSON string compared as a whole: code, string, id, uri, url, oid, uuid, markdown and,
    /// outside reference parameters, canonical.
    Str,
    Boolean,
    HumanName,
    Address,
    Reference,
    /// A canonical (or plain uri) reached by a reference parameter: `url[|version]`.
    Canonical,
    /// date, dateTime, instant.
    DateTime,
    Period,
    Timing,
    /// Quantity and its specialisations (Age, Duration, Count, Distance).
    Quantity,
    Money,
    Range,
    /// decimal, integer, positiveInt, unsignedInt.
    Decimal,
}

impl ValueType {
    fn from_fhir(param_type: ParamType, name: &str) -> Option<ValueType> {
        Some(match name {
            "Coding" => ValueType::Coding,
            "CodeableConcept" => ValueType::CodeableConcept,
            "Identifier" => ValueType::Identifier,
            "ContactPoint" => ValueType::ContactPoint,
            "canonical" | "uri" | "url" if param_type == ParamType::Reference => {
                ValueType::Canonical
            }
            "code" | "string" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid"
            | "markdown" => ValueType::Str,
            "boolean" => ValueType::Boolean,
            "HumanName" => ValueType::HumanName,
            "Address" => ValueType::Address,
            "Reference" => ValueType::Reference,
            "date" | "dateTime" | "instant" => ValueType::DateTime,
            "Period" => ValueType::Period,
            "Timing" => ValueType::Timing,
            "Quantity" | "Age" | "Duration" | "Count" | "Distance" => ValueType::Quantity,
            "Money" => ValueType::Money,
            "Range" => ValueType::Range,
            "decimal" | "integer" | "positiveInt" | "unsignedInt" => ValueType::Decimal,
            _ => return None,
        })
    }
}

/// One step of a path: an element name, optionally keeping only the items whose `child`
/// string equals `value` (FHIRPath `where(child = 'value')`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub name: &'static str,
    pub filter: Option<(&'static str, &'static str)>,
}

/// One branch of a parameter's expression, ready to walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParamPath {
    pub steps: Vec<Step>,
    pub value_type: ValueType,
    /// `where(resolve() is Type)`: only references to this type count.
    pub target: Option<&'static str>,
}

/// Reads a row's `paths`. `None` means the table holds something this code does not know,
/// which the table test rules out for every row.
pub(crate) fn parse_paths(def: &SearchParamDef) -> Option<Vec<ParamPath>> {
    if def.paths.is_empty() {
        return None;
    }
    def.paths
        .split(" | ")
        .map(|branch| {
            let (path, rest) = branch.split_once(':')?;
            let (type_name, target) = match rest.split_once('@') {
                Some((t, target)) => (t, Some(target)),
                None => (rest, None),
            };
            let value_type = ValueType::from_fhir(def.param_type, type_name)?;
            let steps = path
                .split('.')
                .map(|segment| match segment.split_once('[') {
                    None => Some(Step {
                        name: segment,
                        filter: None,
                    }),
                    Some((name, condition)) => {
                        let (child, value) = condition.strip_suffix(']')?.split_once('=')?;
                        Some(Step {
                            name,
                            filter: Some((child, value)),
                        })
                    }
                })
                .collect::<Option<Vec<_>>>()?;
            if steps.iter().any(|s| s.name.is_empty()) {
                return None;
            }
            Some(ParamPath {
                steps,
                value_type,
                target,
            })
        })
        .collect()
}
