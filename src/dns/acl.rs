//! Access control: which client addresses get answers.
//!
//! The allowed networks are flattened once into (network, mask) integer
//! pairs so the per-query check is a few AND/compare instructions.
//! IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`, seen on a dual-stack `[::]`
//! socket) are checked as the IPv4 address they are.
//!
//! Invariant: [`Acl::allows`] never allocates; an empty list allows nobody.
//! The serving threads hold a [`LiveAcl`]: a reload replaces the whole list
//! and they pick it up with an `arc-swap` load, never a lock.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use ipnet::IpNet;

/// The access list shared by every serving thread and replaced whole by a
/// reload ([`LiveAcl::store`]). Readers `load` it once per batch (UDP) or
/// per accepted connection (TCP).
#[derive(Clone, Debug)]
pub struct LiveAcl(Arc<ArcSwap<Acl>>);

impl LiveAcl {
    pub fn new(acl: Acl) -> LiveAcl {
        LiveAcl(Arc::new(ArcSwap::from_pointee(acl)))
    }
    /// The current list: lock-free, no allocation.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Acl>> {
        self.0.load()
    }
    /// Replaces the list for every reader.
    pub fn store(&self, acl: Acl) {
        self.0.store(Arc::new(acl));
    }
}

impl From<Acl> for LiveAcl {
    fn from(acl: Acl) -> LiveAcl {
        LiveAcl::new(acl)
    }
}

/// The allowed client networks, ready for cheap checks.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    v4: Box<[(u32, u32)]>,
    v6: Box<[(u128, u128)]>,
}

impl Acl {
    pub fn new(nets: &[IpNet]) -> Acl {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => {
                    let mask = u32::from(n.netmask());
                    v4.push((u32::from(n.network()) & mask, mask));
                }
                IpNet::V6(n) => {
                    let mask = u128::from(n.netmask());
                    v6.push((u128::from(n.network()) & mask, mask));
                }
            }
        }
        Acl {
            v4: v4.into_boxed_slice(),
            v6: v6.into_boxed_slice(),
        }
    }

    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.v4.iter().any(|&(net, mask)| ip & mask == net)
            }
            IpAddr::V6(ip6) => {
                if let Some(ip4) = ip6.to_ipv4_mapped() {
                    return self.allows(IpAddr::V4(ip4));
                }
                let ip = u128::from(ip6);
                self.v6.iter().any(|&(net, mask)| ip & mask == net)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_by_prefix_and_mapped_addresses_as_v4() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let acl = Acl::new(&nets);
        assert!(acl.allows("10.1.2.3".parse().unwrap()));
        assert!(!acl.allows("11.0.0.1".parse().unwrap()));
        assert!(acl.allows("192.168.1.7".parse().unwrap()));
        assert!(!acl.allows("192.168.1.8".parse().unwrap()));
        assert!(acl.allows("fd12::1".parse().unwrap()));
        assert!(!acl.allows("fe80::1".parse().unwrap()));
        assert!(acl.allows("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!Acl::new(&[]).allows("127.0.0.1".parse().unwrap()));
    }
}
