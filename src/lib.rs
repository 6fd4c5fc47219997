//! Glued: cluster-wide DNS names for Docker containers.
//!
//! A synchronous thread-per-component daemon; see AGENT.md for the map.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod docker;
pub mod gossip;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod table;
