//! The one integration test binary: real components on 127.0.0.1:0, real
//! UDP/TCP packets, the real Docker engine.

mod process;
mod support;

mod bind;
mod cache;
mod cluster;
mod config;
mod dns;
mod docker;
mod e2e;
mod forward;
mod http;
mod ops;
mod readiness;
mod reload;
mod scopes;
