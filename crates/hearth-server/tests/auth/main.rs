//! End-to-end tests of authorization and hardening: SMART Backend Services with Hearth as the
//! authorization server, tokens of an external OpenID Connect provider, enforcement on every
//! interaction, HTTPS and the connection limits. Real servers on loopback ports, keys and
//! certificates generated per test, JWKS served over loopback.

mod enforcement;
mod hardening;
mod helpers;
mod oidc;
mod smart;
