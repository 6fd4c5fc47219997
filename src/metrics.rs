//! Every component's counters, gathered for `/metrics`.
//!
//! Each component owns its stats struct (atomics, written on its own
//! thread); this module only holds them together and renders Prometheus
//! text on demand from the status thread.

use std::sync::Arc;

use crate::dns::forward::ForwardStats;
use crate::dns::stats::DnsStats;
use crate::docker::DockerStats;
use crate::gossip::GossipStats;
use crate::registry::RegistryStats;
use crate::table::Table;

#[derive(Default)]
pub struct Metrics {
    pub dns: Arc<DnsStats>,
    pub forward: Arc<ForwardStats>,
    pub registry: Arc<RegistryStats>,
    pub docker: Arc<DockerStats>,
    pub gossip: Arc<GossipStats>,
}

impl Metrics {
    /// Prometheus text exposition of every counter.
    pub fn render(&self, table: &Table) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(8192);
        self.dns.render(&mut out);
        self.forward.render(&mut out);
        self.registry.render(&mut out);
        self.docker.render(&mut out);
        self.gossip.render(&mut out);
        let _ = writeln!(
            out,
            "# TYPE glued_records gauge\nglued_records {}\n# TYPE glued_names gauge\nglued_names {}",
            table.n_records(),
            table.n_names()
        );
        out
    }
}
