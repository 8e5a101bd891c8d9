//! What a verified bearer token lets its client do, however the token was issued: by Hearth
//! (SMART scopes), or by a trusted OpenID Connect provider (SMART scopes in `scope`, or
//! eHealth-style roles in `realm_access.roles`).

use std::collections::BTreeMap;

use hearth_fhir::resource_type::{canonical_resource_type, resource_types};
use hearth_fhir::search::Filter;

use super::scopes::{Access, SystemScope, system_scopes};

/// The eHealth role that may start exports.
pub const EXPORT_ROLE: &str = "$bulk-export";

/// How much of a type a token reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    Whole,
    /// The resources that match one of these search queries (the text after `?`).
    Filtered(Vec<String>),
    Nothing,
}

/// The permissions of one request's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Who the token speaks for: export jobs belong to this id.
    pub client: String,
    /// Access to every type (`system/*.…`).
    all: Access,
    /// Access to single types, on top of `all`.
    types: BTreeMap<&'static str, Access>,
    /// Granular scopes: access to the resources their filter selects, where `all` and
    /// `types` do not already give it for the whole type.
    filtered: Vec<SystemScope>,
    /// May start exports: any SMART scope, or the `$bulk-export` role.
    may_export: bool,
    /// May download export files: any SMART scope, or the `Binary.read` role (which is also
    /// read access to `Binary`).
    may_download: bool,
}

impl Grants {
    /// Grants of SMART scopes (a space-separated list; others are ignored).
    pub fn from_scopes(client: impl Into<String>, scope: &str) -> Self {
        let mut grants = Self::none(client);
        grants.add_scopes(&system_scopes(scope));
        grants
    }

    /// No permission at all.
    pub fn none(client: impl Into<String>) -> Self {
        Self {
            client: client.into(),
            all: Access::NONE,
            types: BTreeMap::new(),
            filtered: Vec::new(),
            may_export: false,
            may_download: false,
        }
    }

    pub fn add_scopes(&mut self, scopes: &[SystemScope]) {
        for scope in scopes {
            match scope.resource_type {
                _ if scope.filter.is_some() => self.filtered.push(scope.clone()),
                None => self.all = self.all.union(scope.access),
                Some(resource_type) => self.add(resource_type, scope.access),
            }
            if scope.access.any() {
                // With scopes, coverage of each type is checked where it matters.
                self.may_export = true;
                self.may_download = true;
            }
        }
    }

    /// eHealth / Keycloak roles: `$bulk-export`, `<Type>.search`, `<Type>.read` (so
    /// `Binary.read` allows downloads). Unknown roles are ignored.
    pub fn add_roles<'a>(&mut self, roles: impl IntoIterator<Item = &'a str>) {
        for role in roles {
            if role == EXPORT_ROLE {
                self.may_export = true;
                continue;
            }
            let Some((name, action)) = role.rsplit_once('.') else {
                continue;
            };
            let Some(resource_type) = canonical_resource_type(name) else {
                continue;
            };
            let access = match action {
                "read" => Access {
                    read: true,
                    search: false,
                },
                "search" => Access {
                    read: false,
                    search: true,
                },
                _ => continue,
            };
            self.add(resource_type, access);
            if resource_type == "Binary" && access.read {
                self.may_download = true;
            }
        }
    }

    fn add(&mut self, resource_type: &'static str, access: Access) {
        let entry = self.types.entry(resource_type).or_default();
        *entry = entry.union(access);
    }

    /// What the token allows on `resource_type`, on all of its resources or (through granular
    /// scopes) on some.
    pub fn access(&self, resource_type: &str) -> Access {
        self.filtered_scopes(resource_type)
            .fold(self.whole_access(resource_type), |access, scope| {
                access.union(scope.access)
            })
    }

    fn whole_access(&self, resource_type: &str) -> Access {
        let own = self.types.get(resource_type).copied().unwrap_or_default();
        self.all.union(own)
    }

    fn filtered_scopes<'s>(
        &'s self,
        resource_type: &'s str,
    ) -> impl Iterator<Item = &'s SystemScope> {
        self.filtered
            .iter()
            .filter(move |scope| scope.resource_type.is_none_or(|t| t == resource_type))
    }

    /// Which resources of `resource_type` the token reaches for an interaction that needs
    /// what `needs` picks of an [`Access`].
    pub fn reach(&self, resource_type: &str, needs: impl Fn(Access) -> bool) -> Reach {
        if needs(self.whole_access(resource_type)) {
            return Reach::Whole;
        }
        let queries: Vec<String> = self
            .filtered_scopes(resource_type)
            .filter(|scope| needs(scope.access))
            .filter_map(|scope| scope.filter.clone())
            .collect();
        if queries.is_empty() {
            Reach::Nothing
        } else {
            Reach::Filtered(queries)
        }
    }

    /// The search filter a request on `resource_type` must add to stay within the token, or
    /// `None` when it reaches every resource of the type.
    pub fn narrowing(
        &self,
        resource_type: &'static str,
        needs: impl Fn(Access) -> bool,
    ) -> Option<Filter> {
        let Reach::Filtered(queries) = self.reach(resource_type, needs) else {
            return None;
        };
        let alternatives = queries
            .iter()
            .filter_map(|query| Filter::parse_type_filter(&format!("{resource_type}?{query}")).ok())
            .map(|(_, filter)| filter)
            .collect();
        // A type without whole access and without a usable filter: nothing matches.
        Filter::parse(resource_type, &[])
            .ok()
            .map(|all| all.within_any(alternatives))
    }

    /// What the token allows on every type (`system/*.…`).
    pub fn access_all(&self) -> Access {
        self.all
    }

    /// Whether resources of the type may be exported (read or search, as the Bulk Data IG and
    /// eHealth's `<Type>.search` have it).
    pub fn covers(&self, resource_type: &str) -> bool {
        self.access(resource_type).any()
    }

    /// Covers every resource of every type (`system/*.…` without a filter).
    pub fn covers_all(&self) -> bool {
        self.all.any()
    }

    pub fn may_export(&self) -> bool {
        self.may_export
    }

    pub fn may_download(&self) -> bool {
        self.may_download
    }

    /// The types an export without `_type` may contain, sorted; `None` when every type is
    /// covered.
    pub fn covered_types(&self) -> Option<Vec<String>> {
        if self.covers_all() {
            return None;
        }
        Some(
            resource_types()
                .iter()
                .filter(|t| self.covers(t))
                .map(|t| (*t).to_owned())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_their_types() {
        let grants = Grants::from_scopes("c", "system/Patient.read system/Observation.s launch");
        assert!(grants.covers("Patient"));
        assert!(grants.covers("Observation"));
        assert!(!grants.access("Observation").read);
        assert!(!grants.covers("Condition"));
        assert!(grants.may_export() && grants.may_download());
        assert_eq!(
            grants.covered_types(),
            Some(vec!["Observation".to_owned(), "Patient".to_owned()])
        );
        let all = Grants::from_scopes("c", "system/*.rs");
        assert!(all.covers("Condition") && all.covered_types().is_none());
    }

    #[test]
    fn ehealth_roles_map_to_permissions() {
        let mut grants = Grants::none("u");
        grants.add_roles(["Task.search", "offline_access"]);
        assert!(grants.covers("Task"));
        assert!(!grants.may_export() && !grants.may_download());
        grants.add_roles([EXPORT_ROLE, "Binary.read"]);
        assert!(grants.may_export() && grants.may_download());
        assert!(grants.access("Binary").read);
        assert!(!grants.covers("Patient"));
    }

    #[test]
    fn granular_scopes_reach_what_their_filter_selects() {
        let grants = Grants::from_scopes(
            "c",
            "system/Observation.rs?category=laboratory system/Observation.r?category=vital-signs system/Patient.rs",
        );
        assert!(grants.covers("Observation") && grants.may_export());
        assert_eq!(grants.reach("Patient", Access::any), Reach::Whole);
        assert_eq!(
            grants.reach("Observation", Access::any),
            Reach::Filtered(vec![
                "category=laboratory".to_owned(),
                "category=vital-signs".to_owned()
            ])
        );
        assert_eq!(
            grants.reach("Observation", |a| a.search),
            Reach::Filtered(vec!["category=laboratory".to_owned()])
        );
        assert_eq!(grants.reach("Condition", Access::any), Reach::Nothing);
        let narrowing = grants.narrowing("Observation", |a| a.read).unwrap();
        assert!(narrowing.matches_bytes(
            br#"{"resourceType":"Observation","category":[{"coding":[{"code":"vital-signs"}]}]}"#
        ));
        assert!(!narrowing.matches_bytes(
            br#"{"resourceType":"Observation","category":[{"coding":[{"code":"survey"}]}]}"#
        ));
        assert!(grants.narrowing("Patient", |a| a.read).is_none());
        // A whole-type scope wins over a granular one of the same type.
        let both = Grants::from_scopes("c", "system/Observation.rs?status=final system/*.rs");
        assert_eq!(both.reach("Observation", Access::any), Reach::Whole);
        assert_eq!(both.covered_types(), None);
    }

    #[test]
    fn no_scope_grants_nothing() {
        let grants = Grants::from_scopes("c", "system/Patient.write openid");
        assert!(!grants.may_export() && !grants.covers("Patient"));
    }
}
