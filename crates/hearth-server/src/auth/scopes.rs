//! SMART scopes, v1 (`system/Observation.read`) and v2 (`system/Observation.rs`), as far as a
//! Bulk Data server grants them: read and search only.
//!
//! Hearth never grants create, update or delete: `.*`/`.cruds` are down-graded to
//! `.read`/`.rs`, and a request that asks only for writes gets `invalid_scope`. Granted scopes
//! echo the client's syntax (v1 stays v1), as SMART asks of servers that advertise
//! `permission-v1`.
//!
//! v2 granular scopes (`system/Observation.rs?category=laboratory`) are granted as they are
//! when the search engine understands their query; the token then reaches only the resources
//! of that type the query selects (see `Grants`).

use hearth_fhir::resource_type::canonical_resource_type;
use hearth_fhir::search::Filter;

/// What a scope (or a role) allows on one resource type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// `r`: read, vread and history of single resources; export files of the type.
    pub read: bool,
    /// `s`: type-level search.
    pub search: bool,
}

impl Access {
    pub const NONE: Access = Access {
        read: false,
        search: false,
    };
    pub const READ_SEARCH: Access = Access {
        read: true,
        search: true,
    };

    pub fn any(self) -> bool {
        self.read || self.search
    }

    pub fn union(self, other: Access) -> Access {
        Access {
            read: self.read || other.read,
            search: self.search || other.search,
        }
    }

    pub fn intersect(self, other: Access) -> Access {
        Access {
            read: self.read && other.read,
            search: self.search && other.search,
        }
    }
}

/// One `system/` scope, already down-graded to read and search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemScope {
    /// `None` stands for `*`.
    pub resource_type: Option<&'static str>,
    /// What Hearth may grant of it; `Access::NONE` for a write-only scope.
    pub access: Access,
    /// Written in v2 syntax (`.rs`) rather than v1 (`.read`).
    pub v2: bool,
    /// A v2 granular filter: the search query after `?`, as written.
    pub filter: Option<String>,
}

impl SystemScope {
    /// The scope text, in the client's own syntax where that can say it.
    pub fn render(&self) -> String {
        let resource = self.resource_type.unwrap_or("*");
        if !self.v2 && self.access == Access::READ_SEARCH {
            return format!("system/{resource}.read");
        }
        let mut permissions = String::with_capacity(2);
        if self.access.read {
            permissions.push('r');
        }
        if self.access.search {
            permissions.push('s');
        }
        match &self.filter {
            Some(filter) => format!("system/{resource}.{permissions}?{filter}"),
            None => format!("system/{resource}.{permissions}"),
        }
    }

    /// The granular filter as a search of `resource_type`, or `None` when the scope has no
    /// filter. A filter the search engine cannot read for that type selects nothing.
    pub fn search_filter(&self, resource_type: &str) -> Option<Option<Filter>> {
        let query = self.filter.as_deref()?;
        Some(
            Filter::parse_type_filter(&format!("{resource_type}?{query}"))
                .ok()
                .map(|(_, filter)| filter),
        )
    }

    /// Whether this scope and `other` can apply to the same type, and if so to which (`None`:
    /// every type).
    fn meet(&self, other: &SystemScope) -> Option<Option<&'static str>> {
        match (self.resource_type, other.resource_type) {
            (None, t) | (t, None) => Some(t),
            (Some(a), Some(b)) if a == b => Some(Some(a)),
            _ => None,
        }
    }
}

/// One scope of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    System(SystemScope),
    /// Anything that is not a `system/` resource scope (`launch`, `openid`, `patient/…`,
    /// `user/…`): not for a backend service, never granted, not an error.
    Other,
}

/// Why a scope request cannot be granted (the token endpoint's `invalid_scope`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("no scope was requested")]
    Empty,
    #[error("'{0}' does not name an R4 resource type (or *)")]
    UnknownType(String),
    #[error("'{0}' has an unknown permission (use read, write, * or a subset of cruds)")]
    UnknownAction(String),
    #[error("'{0}' is not a SMART scope")]
    Malformed(String),
    #[error("the granular filter of '{scope}' cannot be enforced: {reason}")]
    UnsupportedFilter { scope: String, reason: String },
    #[error(
        "nothing in '{0}' can be granted: Hearth grants read and search access through system/ scopes within the client's registered scopes"
    )]
    NothingGrantable(String),
}

/// Parses one scope token.
pub fn parse_scope(token: &str) -> Result<Scope, ScopeError> {
    let Some(rest) = token.strip_prefix("system/") else {
        return Ok(Scope::Other);
    };
    let malformed = || ScopeError::Malformed(token.to_owned());
    let (resource, action) = rest.split_once('.').ok_or_else(malformed)?;
    let resource_type = match resource {
        "*" => None,
        name => Some(
            canonical_resource_type(name)
                .ok_or_else(|| ScopeError::UnknownType(token.to_owned()))?,
        ),
    };
    let (action, filter) = match action.split_once('?') {
        Some((action, filter)) => (action, Some(filter)),
        None => (action, None),
    };
    let (access, v2) = match action {
        "read" => (Access::READ_SEARCH, false),
        "*" => (Access::READ_SEARCH, false),
        "write" => (Access::NONE, false),
        v2 => (
            v2_access(v2).ok_or_else(|| ScopeError::UnknownAction(token.to_owned()))?,
            true,
        ),
    };
    let filter = match filter {
        None => None,
        // Granular filters exist in v2 only and need at least one `name=value`.
        Some(filter) if v2 && !filter.is_empty() && filter.split('&').all(|p| p.contains('=')) => {
            // Checked against the type (any type for `*`, whose filters can only use the
            // parameters every resource has), so that a token never carries a filter the
            // server would have to ignore.
            let checked_as = resource_type.unwrap_or("Basic");
            if let Err(e) = Filter::parse_type_filter(&format!("{checked_as}?{filter}")) {
                return Err(ScopeError::UnsupportedFilter {
                    scope: token.to_owned(),
                    reason: e.to_string(),
                });
            }
            Some(filter.to_owned())
        }
        Some(_) => return Err(malformed()),
    };
    Ok(Scope::System(SystemScope {
        resource_type,
        access,
        v2,
        filter,
    }))
}

/// A v2 permission string: a non-empty subset of `cruds`, in that order, no repeats. Only `r`
/// and `s` survive.
fn v2_access(action: &str) -> Option<Access> {
    if action.is_empty() {
        return None;
    }
    let mut position = 0;
    let mut access = Access::NONE;
    for c in action.chars() {
        let at = "cruds".find(c)?;
        if at < position {
            return None;
        }
        position = at + 1;
        match c {
            'r' => access.read = true,
            's' => access.search = true,
            _ => {}
        }
    }
    Some(access)
}

/// The `system/` scopes of a space-separated list, leniently: malformed and other scopes are
/// skipped. For scopes Hearth itself granted, or a trusted provider issued.
pub fn system_scopes(list: &str) -> Vec<SystemScope> {
    list.split_ascii_whitespace()
        .filter_map(|token| match parse_scope(token) {
            Ok(Scope::System(scope)) if scope.access.any() => Some(scope),
            _ => None,
        })
        .collect()
}

/// Checks a list of scopes a client registers with (`hearth clients add --scope`).
pub fn check_registered(list: &str) -> Result<Vec<SystemScope>, ScopeError> {
    let mut scopes = Vec::new();
    for token in list.split_ascii_whitespace() {
        match parse_scope(token)? {
            Scope::System(scope) if scope.access.any() => scopes.push(scope),
            _ => return Err(ScopeError::NothingGrantable(token.to_owned())),
        }
    }
    if scopes.is_empty() {
        return Err(ScopeError::Empty);
    }
    Ok(scopes)
}

/// What a token request is granted: `requested` down-graded to read and search, and narrowed
/// to the client's registered scopes (`allowed`, when it has any). Returns the granted scope
/// string; an error is `invalid_scope`.
pub fn grant(requested: &str, allowed: Option<&str>) -> Result<String, ScopeError> {
    let tokens: Vec<&str> = requested.split_ascii_whitespace().collect();
    if tokens.is_empty() {
        return Err(ScopeError::Empty);
    }
    let mut wanted = Vec::new();
    for token in &tokens {
        if let Scope::System(scope) = parse_scope(token)? {
            // Write-only scopes are down-graded to nothing (see the module docs).
            if scope.access.any() {
                wanted.push(scope);
            }
        }
    }
    let limits = allowed.map(system_scopes);
    let mut granted: Vec<String> = Vec::new();
    for scope in &wanted {
        let narrowed: Vec<SystemScope> = match &limits {
            None => vec![scope.clone()],
            Some(limits) => limits
                .iter()
                .filter_map(|limit| {
                    let resource_type = scope.meet(limit)?;
                    let access = scope.access.intersect(limit.access);
                    // Both filters would have to hold, which one scope cannot say unless
                    // they are the same.
                    let filter = match (&scope.filter, &limit.filter) {
                        (Some(a), Some(b)) if a != b => return None,
                        (a, b) => a.clone().or_else(|| b.clone()),
                    };
                    access.any().then(|| SystemScope {
                        resource_type,
                        access,
                        v2: scope.v2 || filter.is_some(),
                        filter,
                    })
                })
                .collect(),
        };
        for scope in narrowed {
            let text = scope.render();
            if !granted.contains(&text) {
                granted.push(text);
            }
        }
    }
    if granted.is_empty() {
        return Err(ScopeError::NothingGrantable(tokens.join(" ")));
    }
    Ok(granted.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(requested: &str) -> Result<String, ScopeError> {
        grant(requested, None)
    }

    #[test]
    fn v1_scopes_are_down_graded_to_read() {
        assert_eq!(granted("system/*.read").unwrap(), "system/*.read");
        assert_eq!(granted("system/*.*").unwrap(), "system/*.read");
        assert_eq!(granted("system/Patient.*").unwrap(), "system/Patient.read");
        assert_eq!(
            granted("system/Patient.read system/Patient.write").unwrap(),
            "system/Patient.read"
        );
    }

    #[test]
    fn v2_scopes_are_down_graded_to_read_and_search() {
        assert_eq!(granted("system/*.cruds").unwrap(), "system/*.rs");
        assert_eq!(granted("system/*.rs").unwrap(), "system/*.rs");
        assert_eq!(
            granted("system/Patient.cruds").unwrap(),
            "system/Patient.rs"
        );
        assert_eq!(granted("system/Patient.r").unwrap(), "system/Patient.r");
        assert_eq!(granted("system/Patient.cs").unwrap(), "system/Patient.s");
    }

    #[test]
    fn mixed_versions_keep_their_syntax() {
        assert_eq!(
            granted("system/Patient.read system/Observation.rs").unwrap(),
            "system/Patient.read system/Observation.rs"
        );
    }

    #[test]
    fn write_only_unknown_and_empty_requests_are_refused() {
        assert_eq!(granted(""), Err(ScopeError::Empty));
        assert_eq!(granted("   "), Err(ScopeError::Empty));
        for scope in [
            "system/Patient.write",
            "system/Patient.c",
            "system/Patient.cu",
            "system/Patient.cd",
            "system/Patient.cud",
            "system/Patient.ud",
            "system/Patient.d",
            "system/Patient.u",
            "launch fhirUser",
            "patient/*.read",
        ] {
            assert!(
                matches!(granted(scope), Err(ScopeError::NothingGrantable(_))),
                "{scope}"
            );
        }
        for scope in [
            "system/Patient.unknownAction",
            "system/Patient.xyz",
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Patient.",
        ] {
            assert!(
                matches!(granted(scope), Err(ScopeError::UnknownAction(_))),
                "{scope}"
            );
        }
        for scope in ["system/UnknownResource.read", "system/UnknownResource.r"] {
            assert!(
                matches!(granted(scope), Err(ScopeError::UnknownType(_))),
                "{scope}"
            );
        }
        for scope in [
            "system/Patient",
            "system/Patient.read?a=b",
            "system/Patient.rs?",
        ] {
            assert!(
                matches!(granted(scope), Err(ScopeError::Malformed(_))),
                "{scope}"
            );
        }
    }

    #[test]
    fn granular_scopes_are_granted_when_their_filter_can_be_enforced() {
        let lab = "system/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
        assert_eq!(granted(lab).unwrap(), lab);
        assert_eq!(
            granted("system/Observation.cruds?status=final system/Patient.rs").unwrap(),
            "system/Observation.rs?status=final system/Patient.rs"
        );
        assert_eq!(
            granted("system/*.rs?_tag=research").unwrap(),
            "system/*.rs?_tag=research"
        );
        for scope in [
            "system/Patient.rs?a=b",
            "system/Observation.rs?code:below=x",
            "system/*.rs?category=laboratory",
        ] {
            assert!(
                matches!(granted(scope), Err(ScopeError::UnsupportedFilter { .. })),
                "{scope}"
            );
        }
    }

    #[test]
    fn granular_scopes_narrow_registered_scopes_and_are_narrowed_by_them() {
        assert_eq!(
            grant("system/Observation.rs?status=final", Some("system/*.rs")).unwrap(),
            "system/Observation.rs?status=final"
        );
        assert_eq!(
            grant("system/*.read", Some("system/Observation.rs?status=final")).unwrap(),
            "system/Observation.rs?status=final"
        );
        assert!(matches!(
            grant(
                "system/Observation.rs?status=amended",
                Some("system/Observation.rs?status=final")
            ),
            Err(ScopeError::NothingGrantable(_))
        ));
    }

    #[test]
    fn grants_stay_within_the_registered_scopes() {
        let allowed = Some("system/Patient.rs system/Observation.r");
        assert_eq!(
            grant("system/*.read", allowed).unwrap(),
            "system/Patient.read system/Observation.r"
        );
        assert_eq!(
            grant("system/Observation.rs", allowed).unwrap(),
            "system/Observation.r"
        );
        assert!(matches!(
            grant("system/Condition.rs", allowed),
            Err(ScopeError::NothingGrantable(_))
        ));
        assert_eq!(
            grant("system/Condition.rs", Some("system/*.rs")).unwrap(),
            "system/Condition.rs"
        );
    }

    #[test]
    fn granted_scopes_never_carry_writes() {
        // bdt's check on every granted scope string.
        // Stricter than bdt's regex: every granted action is `read` or made of r and s.
        let forbidden = |s: &str| {
            s.split(' ').any(|scope| {
                let action = scope.rsplit('.').next().unwrap_or("");
                !(action == "read"
                    || !action.is_empty() && action.chars().all(|c| "rs".contains(c)))
            })
        };
        for request in [
            "system/*.*",
            "system/*.cruds",
            "system/Patient.*",
            "system/Patient.cruds",
            "system/*.read system/*.write",
        ] {
            let scope = granted(request).unwrap();
            assert!(!forbidden(&scope), "{request} -> {scope}");
        }
    }

    #[test]
    fn registered_scopes_must_be_grantable() {
        assert!(check_registered("system/*.rs system/Patient.read").is_ok());
        assert!(check_registered("system/Observation.rs?status=final").is_ok());
        assert!(check_registered("system/Observation.rs?nonsense=1").is_err());
        assert!(check_registered("system/Patient.write").is_err());
        assert!(check_registered("launch").is_err());
        assert!(check_registered("").is_err());
    }
}
