//! Everything the authorization code reads from a client or a token: Hearth's own access
//! tokens, client assertions (header and claims), JWKS documents and key selection, requested
//! scopes, an OpenID provider's claims, and request paths. Nothing panics, and grants are
//! read-only and stable.
//!
//! Input: one byte choosing what the rest is.

#![no_main]

use std::sync::OnceLock;

use axum::http::Method;
use hearth_server::auth::grants::Grants;
use hearth_server::auth::jwks::{check_client_jwks, parse_jwks, select_key};
use hearth_server::auth::middleware::permitted;
use hearth_server::auth::oidc::grants_of;
use hearth_server::auth::scopes::grant;
use hearth_server::auth::tokens::TokenSigner;
use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;

fn signer() -> &'static TokenSigner {
    static SIGNER: OnceLock<TokenSigner> = OnceLock::new();
    SIGNER.get_or_init(|| TokenSigner::new("https://hearth.example/fhir", &[7; 32]))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match mode % 6 {
        0 => {
            if let Ok(claims) = signer().verify(&text) {
                // Only Hearth can make a token that verifies: the input was one it issued.
                assert_eq!(claims.iss, "https://hearth.example/fhir");
            }
        }
        1 => {
            let _ = jsonwebtoken::decode_header(&*text);
            let _ = jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(&*text);
        }
        2 => {
            let _ = check_client_jwks(rest);
            if let Ok(keys) = parse_jwks(rest) {
                for alg in [
                    Algorithm::RS384,
                    Algorithm::ES384,
                    Algorithm::RS256,
                    Algorithm::ES256,
                ] {
                    let _ = select_key(&keys, Some("k1"), alg);
                    let _ = select_key(&keys, None, alg);
                }
            }
        }
        3 => {
            let (requested, allowed) = text.split_once('\n').unwrap_or((&text, ""));
            let allowed = Some(allowed).filter(|a| !a.trim().is_empty());
            if let Ok(granted) = grant(requested, allowed) {
                for scope in granted.split(' ') {
                    let action = scope.rsplit('.').next().unwrap_or("");
                    assert!(
                        action == "read"
                            || !action.is_empty() && action.chars().all(|c| c == 'r' || c == 's'),
                        "granted '{scope}' from '{requested}'"
                    );
                }
                assert_eq!(
                    grant(&granted, None).as_deref(),
                    Ok(granted.as_str()),
                    "a grant grants itself"
                );
            }
        }
        4 => {
            if let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice(rest) {
                let _ = grants_of(&claims, "hearth");
            }
        }
        _ => {
            let (scope, target) = text.split_once('\n').unwrap_or(("system/*.rs", &text));
            let grants = Grants::from_scopes("c", scope);
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (target, None),
            };
            for method in [Method::GET, Method::POST, Method::DELETE] {
                let _ = permitted(&grants, &method, path, query);
            }
        }
    }
});
