//! The control API: HTTP/1.1 with JSON bodies on a UNIX socket
//! (`rvm run --api-sock PATH`), so that a program in any language can
//! drive a running VM: its state, each NIC's counters, link, rate limits,
//! capture and egress policy, and shutdown. The routes are in
//! [`routes::ROUTES`] and described in `api/openapi.json`.

pub mod routes;
mod server;
mod target;

pub use server::{
    ApiServer, ApiServerError, ApiSocket, CONNECTION_LIFETIME, HEAD_TIMEOUT, MAX_BODY,
    MAX_CONNECTIONS,
};
pub use target::{ApiTarget, VmState, VmTarget};

#[cfg(test)]
mod tests;
