//! Docker watcher: feeds the registry with this host's container records.

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::registry::RegistryMsg;
use crate::table::Origin;

#[derive(Debug, Default)]
pub struct DockerStats {}

impl DockerStats {
    pub fn render(&self, _out: &mut String) {}
}

/// Handle to the Docker thread.
pub struct Docker {}

impl Docker {
    pub fn start(
        _config: &Config,
        _origin: Origin,
        _registry: Sender<RegistryMsg>,
        _stats: Arc<DockerStats>,
    ) -> anyhow::Result<Docker> {
        Ok(Docker {})
    }

    pub fn stop(self) {}
}
