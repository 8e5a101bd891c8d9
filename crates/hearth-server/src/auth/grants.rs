//! What a verified bearer token lets its client do, however the token was issued: by Hearth
//! (SMART scopes), or by a trusted OpenID Connect provider (SMART scopes in `scope`, or
//! eHealth-style roles in `realm_access.roles`).

use std::collections::BTreeMap;

use hearth_fhir::resource_type::{canonical_resource_type, resource_types};

use super::scopes::{Access, SystemScope, system_scopes};

/// The eHealth role that may start exports.
pub const EXPORT_ROLE: &str = "$bulk-export";

/// The permissions of one request's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Who the token speaks for: export jobs belong to this id.
    pub client: String,
    /// Access to every type (`system/*.…`).
    all: Access,
    /// Access to single types, on top of `all`.
    types: BTreeMap<&'static str, Access>,
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
            may_export: false,
            may_download: false,
        }
    }

    pub fn add_scopes(&mut self, scopes: &[SystemScope]) {
        for scope in scopes {
            match scope.resource_type {
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

    /// What the token allows on `resource_type`.
    pub fn access(&self, resource_type: &str) -> Access {
        let own = self.types.get(resource_type).copied().unwrap_or_default();
        self.all.union(own)
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

    /// Covers every type (`system/*.…`).
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
    fn no_scope_grants_nothing() {
        let grants = Grants::from_scopes("c", "system/Patient.write openid");
        assert!(!grants.may_export() && !grants.covers("Patient"));
    }
}
