//! Query counters of the serving threads.

#[derive(Debug, Default)]
pub struct DnsStats {}

impl DnsStats {
    pub fn render(&self, _out: &mut String) {}
}
