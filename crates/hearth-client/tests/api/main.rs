//! The client against real servers on loopback ports: one test binary, several modules.

mod auth;
mod fake;
mod hearth;
mod helpers;
mod resume;
