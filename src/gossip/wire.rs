//! The gossip wire format: sealed, versioned, compact messages.
//!
//! Two encodings live here: the current protocol version's and the
//! previous one's (kept until the next bump, so two adjacent releases run in
//! one cluster):
//!
//! ```text
//! v4: 4 ‖ key id (4) ‖ postcard(Header) ‖ postcard(Vec<Facts>) ‖ speaks (1) ‖ HMAC-SHA256 (32) ‖ ed25519 signature (64)
//! v3: 3 ‖ key id (4) ‖ postcard(Header) ‖ speaks (1) ‖ HMAC-SHA256 (32) ‖ ed25519 signature (64)
//! ```
//!
//! The header's layout is the same in both; v4 adds, after it, the
//! [`Facts`] of every group the payload carries (Compose scope, health,
//! SRV ports), in payload order. A v3 peer gets groups without them; a
//! group read from a v3 message has the default facts.
//!
//! v4 also carries [`Payload::Core`], the replication core's signed
//! messages (`core::Body`, whose groups' facts travel after the header like
//! any payload's); a v3 node drops v4 bytes (unknown version) unread.
//!
//! The HMAC (under the message key derived from one key of the keyring:
//! the sender's primary) covers everything before it; the signature (by
//! the `signer` named in the header) covers everything before it. `speaks`
//! is the highest version the sender speaks, so peers that relay to it
//! learn when the whole cluster can move up. The key id names the key the
//! receiver checks.
//!
//! Invariant: [`open`] returns a header only for bytes that carry a version
//! this node accepts, a valid HMAC under a key of its ring, a valid
//! signature by `signer`, `origin == signer` and a node name that is a
//! valid label; everything else is a [`DropReason`]. Decoding never
//! panics on any input. Replay protection (per origin incarnation and
//! sequence) is [`ReplayWindow`], a pure function of its inputs.

use std::net::{Ipv4Addr, Ipv6Addr};

use hmac::{Hmac, KeyInit, Mac};
use iroh::{PublicKey, SecretKey, Signature};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::{KeyId, Keyring};
use crate::table::{Group, Health, MAX_ADDRS_PER_GROUP, MAX_SRV_PORTS, Scope, Source, SrvPort};

/// Protocol version of this release (messages and admission).
pub const PROTOCOL_VERSION: u8 = crate::config::PROTOCOL_VERSION;
/// Oldest version this binary can encode: the previous release's.
pub const OLDEST_VERSION: u8 = PROTOCOL_VERSION - 1;
/// First version whose messages carry the groups' [`Facts`].
pub const FACTS_VERSION: u8 = 4;
/// Bytes of the key id carried by a message.
pub const KEY_ID_LEN: usize = crate::config::KEY_ID_LEN;
/// Bytes of the HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Bytes of an ed25519 signature.
pub const SIG_LEN: usize = 64;
/// Bytes added around the body: version, key id, speaks, MAC, signature.
pub const OVERHEAD: usize = 1 + KEY_ID_LEN + 1 + MAC_LEN + SIG_LEN;
/// iroh-gossip `max_message_size`, set explicitly on every node (the same
/// on all of them: IROH.md trap 2).
pub const GOSSIP_MAX_MESSAGE_SIZE: usize = 4096;
/// Largest sealed message Glued broadcasts: far below the
/// `GOSSIP_MAX_MESSAGE_SIZE - 39` bytes that silently break a link.
pub const MAX_GOSSIP_BYTES: usize = 3072;
/// Largest sealed message accepted on a direct state stream (full state).
pub const MAX_STREAM_BYTES: usize = 64 * 1024 * 1024;
/// Width of the per-origin replay window, in sequence numbers.
pub const REPLAY_WINDOW: u64 = 1024;
/// Longest node name carried (a DNS label).
pub const MAX_NODE_NAME_LEN: usize = 63;

type HmacSha256 = Hmac<Sha256>;

/// Keys derived from one cluster key. Never logged.
#[derive(Clone)]
pub struct Keys {
    /// Key of the per-message HMAC.
    pub message: [u8; 32],
    /// Key of the admission proofs.
    pub auth: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Keys {
    /// HKDF-style derivation: extract with a fixed salt, then one expand
    /// step per domain-separated label.
    pub fn derive(secret: &[u8]) -> Keys {
        let prk = hmac(b"glued/v1/extract", &[secret]);
        Keys {
            message: hmac(&prk, &[b"glued/v1/gossip-mac", &[1]]),
            auth: hmac(&prk, &[b"glued/v1/auth", &[1]]),
        }
    }
}

/// The keyring as gossip uses it: derived keys by key id, primary first.
/// Swapped whole on `SIGHUP`.
#[derive(Clone, Debug)]
pub struct Ring {
    keys: Vec<(KeyId, Keys)>,
}

impl Ring {
    /// Derives the keys of every key of `keyring` (which must not be empty).
    pub fn new(keyring: &Keyring) -> Ring {
        Ring {
            keys: keyring
                .keys()
                .iter()
                .map(|k| (k.id(), Keys::derive(k.expose())))
                .collect(),
        }
    }

    /// A one-key ring of the test keyring [`Keyring::for_tests`]`(label)`.
    pub fn for_tests(label: &str) -> Ring {
        Ring::new(&Keyring::for_tests(label))
    }

    /// The key used to send and to prove admission.
    pub fn primary(&self) -> (KeyId, &Keys) {
        let (id, k) = self.keys.first().expect("a ring is never empty");
        (*id, k)
    }

    pub fn get(&self, id: KeyId) -> Option<&Keys> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| k)
    }

    pub fn contains(&self, id: KeyId) -> bool {
        self.get(id).is_some()
    }

    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }
}

/// The protocol versions a node speaks: its own and the one before it (not
/// below what this binary can encode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Versions {
    pub min: u8,
    pub max: u8,
}

impl Versions {
    /// What a node whose highest version is `max` speaks.
    pub fn speaking(max: u8) -> Versions {
        Versions {
            min: max.saturating_sub(1).max(OLDEST_VERSION).min(max),
            max,
        }
    }

    pub fn contains(self, v: u8) -> bool {
        (self.min..=self.max).contains(&v)
    }

    /// The highest version both speak, if any.
    pub fn highest_shared(self, other: Versions) -> Option<u8> {
        let v = self.max.min(other.max);
        (v >= self.min.max(other.min)).then_some(v)
    }
}

impl std::fmt::Display for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.max)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

/// How to seal one message: at which version, saying which version the
/// sender speaks at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoding {
    pub version: u8,
    pub speaks: u8,
}

impl Encoding {
    /// The current version, spoken by this release.
    pub const CURRENT: Encoding = Encoding {
        version: PROTOCOL_VERSION,
        speaks: PROTOCOL_VERSION,
    };
}

/// A message that passed [`open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub header: Header,
    /// Version it was sealed at.
    pub version: u8,
    /// Highest version its sender speaks.
    pub speaks: u8,
    /// Key whose message key verified its HMAC.
    pub key_id: KeyId,
}

/// Where a group comes from, as carried on the wire (postcard needs an
/// externally tagged enum; [`Source`] is internally tagged for JSON).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WireSource {
    Static(String),
    Container { id: String, network: String },
}

impl From<&Source> for WireSource {
    fn from(s: &Source) -> WireSource {
        match s {
            Source::Static { name } => WireSource::Static(name.as_str().into()),
            Source::Container { id, network } => WireSource::Container {
                id: id.as_str().into(),
                network: network.as_str().into(),
            },
        }
    }
}

/// A peer's source as the registry keeps it: a name of up to 24 bytes
/// inline, so a static group's key owns no allocation.
impl From<WireSource> for Source {
    fn from(s: WireSource) -> Source {
        match s {
            WireSource::Static(name) => Source::Static { name: name.into() },
            WireSource::Container { id, network } => Source::Container {
                id: id.into(),
                network: network.into(),
            },
        }
    }
}

/// One group as carried on the wire. `facts` travel after the header (v4
/// and later): they are not part of the header's postcard layout, which
/// stays the v3 one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGroup {
    pub names: Vec<String>,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    #[serde(skip)]
    pub facts: Facts,
}

/// What a v4 message says of a group besides its names and addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub scope: Option<Scope>,
    pub health: Health,
    pub srv: Vec<SrvPort>,
}

impl From<&Group> for WireGroup {
    fn from(g: &Group) -> WireGroup {
        WireGroup {
            names: g.names.iter().map(|n| n.as_str().into()).collect(),
            v4: g.v4.to_vec(),
            v6: g.v6.to_vec(),
            facts: Facts {
                scope: g.scope.as_deref().cloned(),
                health: g.health,
                srv: g.srv.clone(),
            },
        }
    }
}

/// A peer's group as the registry takes it: names that are not valid
/// labels ([`crate::table::label`]) are left out, the others lowercased, so a
/// member cannot publish a name no DNS query could ask for; a scope whose
/// labels are not valid names is dropped, and so are SRV ports whose
/// service is not a label (at most [`MAX_SRV_PORTS`] are kept).
impl From<WireGroup> for Group {
    fn from(g: WireGroup) -> Group {
        let scope = g.facts.scope.and_then(|s| {
            Some(Scope {
                project: crate::table::record_name(&s.project)?,
                service: crate::table::record_name(&s.service)?,
            })
        });
        let srv = g
            .facts
            .srv
            .into_iter()
            .filter_map(|p| {
                let service = crate::table::label(&p.service)?;
                (p.port > 0 && service.len() < crate::table::MAX_LABEL_LEN)
                    .then_some(SrvPort { service, ..p })
            })
            .take(MAX_SRV_PORTS)
            .collect();
        Group {
            names: g
                .names
                .iter()
                .filter_map(|n| crate::table::record_name(n))
                .take(crate::table::MAX_NAMES_PER_GROUP)
                .collect(),
            v4: g.v4.into_iter().take(MAX_ADDRS_PER_GROUP).collect(),
            v6: g.v6.into_iter().take(MAX_ADDRS_PER_GROUP).collect(),
            scope: scope.map(Box::new),
            health: g.facts.health,
            srv,
        }
    }
}

impl Payload {
    /// Every group the payload carries, in order.
    fn groups(&self) -> Vec<&WireGroup> {
        use super::core::Body;
        let (changes, full) = match self {
            Payload::Delta { changes, .. } | Payload::Core(Body::Delta { changes, .. }) => {
                (Some(changes), None)
            }
            Payload::FullState { groups, .. } | Payload::Core(Body::FullState { groups, .. }) => {
                (None, Some(groups))
            }
            _ => (None, None),
        };
        let mut out = Vec::new();
        if let Some(changes) = changes {
            out.extend(changes.iter().filter_map(|c| match c {
                Change::Upsert(_, g) => Some(g),
                Change::Remove(_) => None,
            }));
        }
        if let Some(groups) = full {
            out.extend(groups.iter().map(|(_, g)| g));
        }
        out
    }

    fn groups_mut(&mut self) -> Vec<&mut WireGroup> {
        use super::core::Body;
        match self {
            Payload::Delta { changes, .. } | Payload::Core(Body::Delta { changes, .. }) => changes
                .iter_mut()
                .filter_map(|c| match c {
                    Change::Upsert(_, g) => Some(g),
                    Change::Remove(_) => None,
                })
                .collect(),
            Payload::FullState { groups, .. } | Payload::Core(Body::FullState { groups, .. }) => {
                groups.iter_mut().map(|(_, g)| g).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// One change of one group of the origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Upsert(WireSource, WireGroup),
    Remove(WireSource),
}

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// "I just joined": holders answer with a heartbeat at once.
    Hello,
    /// Alive; the origin's records are at `version`. `ready` is false while a
    /// restarted node is still collecting its own records: peers keep the
    /// previous incarnation's records until it is true.
    Heartbeat {
        version: u64,
        n_groups: u64,
        ready: bool,
    },
    /// The changes that take the origin's records from `version - 1` to
    /// `version`.
    Delta { version: u64, changes: Vec<Change> },
    /// Every group of the origin at `version` (direct stream only).
    FullState {
        version: u64,
        groups: Vec<(WireSource, WireGroup)>,
    },
    /// A message of the replication core (v4 only).
    Core(super::core::Body),
}

/// Who sent a message, in which life, in which order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Public key that signed the message.
    pub signer: [u8; 32],
    /// Node whose records the payload is about; must equal `signer`.
    pub origin: [u8; 32],
    pub node_name: String,
    /// Grows with every start of the origin.
    pub incarnation: u64,
    /// Grows with every message of one incarnation.
    pub seq: u64,
    pub payload: Payload,
}

/// Why a message was dropped; each has a counter in `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    TooLarge,
    UnknownVersion,
    Malformed,
    BadMac,
    BadSignature,
    NotOwner,
    Replay,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::TooLarge,
        DropReason::UnknownVersion,
        DropReason::Malformed,
        DropReason::BadMac,
        DropReason::BadSignature,
        DropReason::NotOwner,
        DropReason::Replay,
    ];

    /// Label used in `/metrics` and logs.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::UnknownVersion => "unknown_version",
            DropReason::Malformed => "malformed",
            DropReason::BadMac => "bad_hmac",
            DropReason::BadSignature => "bad_signature",
            DropReason::NotOwner => "not_owner",
            DropReason::Replay => "replay",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Encodes, MACs and signs `header` with `key` at `enc.version` (current
/// or previous encoder), under the ring's primary key. Does not check the
/// size. A version this binary cannot encode is sealed at the oldest one
/// it can.
pub fn seal(ring: &Ring, enc: Encoding, key: &SecretKey, header: &Header) -> Vec<u8> {
    let (key_id, keys) = ring.primary();
    let version = enc.version.clamp(OLDEST_VERSION, PROTOCOL_VERSION);
    let mut out = Vec::with_capacity(256);
    out.push(version);
    if version >= 3 {
        out.extend_from_slice(&key_id.0);
    }
    let mut out = postcard::to_extend(header, out).expect("encoding into a Vec cannot fail");
    if version >= FACTS_VERSION {
        let facts: Vec<&Facts> = header
            .payload
            .groups()
            .into_iter()
            .map(|g| &g.facts)
            .collect();
        out = postcard::to_extend(&facts, out).expect("encoding into a Vec cannot fail");
    }
    out.push(enc.speaks);
    let mac = hmac(&keys.message, &[&out]);
    out.extend_from_slice(&mac);
    let sig = key.sign(&out);
    out.extend_from_slice(&sig.to_bytes());
    out
}

/// Seals a message of this node (`signer == origin == key.public()`).
#[allow(clippy::too_many_arguments)]
pub fn seal_own(
    ring: &Ring,
    enc: Encoding,
    key: &SecretKey,
    node_name: &str,
    incarnation: u64,
    seq: u64,
    payload: Payload,
) -> Vec<u8> {
    let id = *key.public().as_bytes();
    let header = Header {
        signer: id,
        origin: id,
        node_name: node_name.to_string(),
        incarnation,
        seq,
        payload,
    };
    seal(ring, enc, key, &header)
}

fn mac_ok(keys: &Keys, covered: &[u8], tag: &[u8]) -> bool {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&keys.message).expect("any key length");
    mac.update(covered);
    mac.verify_slice(tag).is_ok()
}

/// Checks and decodes a sealed message of at most `max_len` bytes, sealed
/// at a version in `accept` under a key of `ring`.
pub fn open(
    ring: &Ring,
    accept: Versions,
    bytes: &[u8],
    max_len: usize,
) -> Result<Opened, DropReason> {
    if bytes.len() > max_len {
        return Err(DropReason::TooLarge);
    }
    if bytes.len() < OVERHEAD + 1 {
        return Err(DropReason::Malformed);
    }
    let version = bytes[0];
    if !accept.contains(version) || !(OLDEST_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(DropReason::UnknownVersion);
    }
    let sig_at = bytes.len() - SIG_LEN;
    let mac_at = sig_at - MAC_LEN;
    let (covered, tag) = (&bytes[..mac_at], &bytes[mac_at..sig_at]);
    let (key_id, body) = if version >= 3 {
        let id = KeyId(bytes[1..1 + KEY_ID_LEN].try_into().expect("length checked"));
        match ring.get(id) {
            Some(keys) if mac_ok(keys, covered, tag) => (id, &bytes[1 + KEY_ID_LEN..mac_at]),
            _ => return Err(DropReason::BadMac),
        }
    } else {
        match ring.keys.iter().find(|(_, k)| mac_ok(k, covered, tag)) {
            Some((id, _)) => (*id, &bytes[1..mac_at]),
            None => return Err(DropReason::BadMac),
        }
    };
    let (mut header, mut rest): (Header, &[u8]) =
        postcard::take_from_bytes(body).map_err(|_| DropReason::Malformed)?;
    if version >= FACTS_VERSION {
        let (facts, after): (Vec<Facts>, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|_| DropReason::Malformed)?;
        let groups = header.payload.groups_mut();
        if facts.len() != groups.len() {
            return Err(DropReason::Malformed);
        }
        for (g, f) in groups.into_iter().zip(facts) {
            g.facts = f;
        }
        rest = after;
    }
    let speaks = match (version, rest) {
        (_, [s]) if *s >= version => *s,
        _ => return Err(DropReason::Malformed),
    };
    if header.node_name.len() > MAX_NODE_NAME_LEN
        || !crate::table::is_valid_label(&header.node_name)
    {
        return Err(DropReason::Malformed);
    }
    let signer = PublicKey::from_bytes(&header.signer).map_err(|_| DropReason::BadSignature)?;
    let sig: &[u8; SIG_LEN] = bytes[sig_at..].try_into().expect("length checked");
    signer
        .verify(&bytes[..sig_at], &Signature::from_bytes(sig))
        .map_err(|_| DropReason::BadSignature)?;
    if header.origin != header.signer {
        return Err(DropReason::NotOwner);
    }
    Ok(Opened {
        header,
        version,
        speaks,
        key_id,
    })
}

/// Sliding replay window of one origin: accepts each `(incarnation, seq)`
/// once, rejects older incarnations and sequences older than the window.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    incarnation: u64,
    /// Highest sequence accepted in `incarnation`.
    top: u64,
    /// Bit `i` set: `top - i` was accepted.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
    started: bool,
}

/// What [`ReplayWindow::check`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fresh {
    /// New message of the known incarnation.
    Yes,
    /// First message of a newer incarnation (a restart).
    NewIncarnation,
    /// Replayed or too old.
    No,
}

impl ReplayWindow {
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Accepts `(incarnation, seq)` if it was never seen; records it.
    pub fn check(&mut self, incarnation: u64, seq: u64) -> Fresh {
        if !self.started || incarnation > self.incarnation {
            let fresh = if self.started {
                Fresh::NewIncarnation
            } else {
                Fresh::Yes
            };
            *self = ReplayWindow {
                incarnation,
                top: seq,
                seen: Default::default(),
                started: true,
            };
            self.seen[0] = 1;
            return fresh;
        }
        if incarnation < self.incarnation {
            return Fresh::No;
        }
        if seq > self.top {
            self.shift(seq - self.top);
            self.top = seq;
            self.seen[0] |= 1;
            return Fresh::Yes;
        }
        let age = self.top - seq;
        if age >= REPLAY_WINDOW {
            return Fresh::No;
        }
        let (word, bit) = ((age / 64) as usize, age % 64);
        if self.seen[word] & (1 << bit) != 0 {
            return Fresh::No;
        }
        self.seen[word] |= 1 << bit;
        Fresh::Yes
    }

    /// Ages every bit by `by` positions.
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = Default::default();
            return;
        }
        let words = (by / 64) as usize;
        let bits = by % 64;
        let n = self.seen.len();
        for i in (0..n).rev() {
            let from = i as isize - words as isize;
            let mut v = if from >= 0 {
                self.seen[from as usize] << bits
            } else {
                0
            };
            if bits > 0 && from >= 1 {
                v |= self.seen[from as usize - 1] >> (64 - bits);
            }
            self.seen[i] = v;
        }
    }
}

/// Splits `changes` into payloads that each seal to at most `max_bytes`.
/// A change too large for any message is left out and reported in the
/// second value: the caller then relies on a full-state pull.
pub fn chunk_changes(
    changes: Vec<Change>,
    max_bytes: usize,
    header_budget: usize,
) -> (Vec<Vec<Change>>, usize) {
    let budget = max_bytes.saturating_sub(OVERHEAD + header_budget);
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    let mut skipped = 0;
    for c in changes {
        // The change in the header, and its group's facts after it (v4).
        let facts = match &c {
            Change::Upsert(_, g) => postcard::experimental::serialized_size(&g.facts),
            Change::Remove(_) => Ok(0),
        };
        let n = postcard::experimental::serialized_size(&c)
            .and_then(|n| Ok(n + facts?))
            .unwrap_or(usize::MAX);
        if n > budget {
            skipped += 1;
            continue;
        }
        if size + n > budget && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += n;
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    (out, skipped)
}

/// Bytes a header with an empty payload list can take, plus varint slack:
/// used as the budget reserved for the header when chunking.
/// (The last 5: the length of the facts list of a v4 message.)
pub const HEADER_BUDGET: usize = 32 + 32 + 1 + MAX_NODE_NAME_LEN + 10 + 10 + 1 + 10 + 5 + 5;

#[cfg(test)]
mod tests {

    #[test]
    fn a_peer_group_keeps_only_valid_labels_lowercased() {
        let g: crate::table::Group = WireGroup {
            names: vec![
                "Api".into(),
                "a.b".into(),
                "".into(),
                "-x".into(),
                "db_1".into(),
            ],
            v4: vec!["10.0.0.1".parse().unwrap()],
            v6: vec![],
            ..Default::default()
        }
        .into();
        assert_eq!(g.names[..], ["api", "db_1"]);
    }
    use super::*;

    /// A group's facts keep the postcard bytes of the v4 release, whose
    /// `Scope` and `SrvPort` held `String`s: v4 peers read what this node
    /// sends, and this node reads theirs.
    #[test]
    fn facts_keep_the_bytes_of_the_v4_release() {
        let facts = Facts {
            scope: Some(Scope {
                project: "p".into(),
                service: "svc".into(),
            }),
            health: Health::Healthy,
            srv: vec![SrvPort {
                service: "http".into(),
                proto: crate::table::Proto::Udp,
                port: 8080,
            }],
        };
        let bytes = [
            1, 1, b'p', 3, b's', b'v', b'c', // Some(scope): project, service
            2,    // healthy
            1, 4, b'h', b't', b't', b'p', 1, 0x90, 0x3f, // one port: http, udp, 8080
        ];
        assert_eq!(postcard::to_allocvec(&facts).unwrap(), bytes);
        assert_eq!(postcard::from_bytes::<Facts>(&bytes).unwrap(), facts);
    }

    const ACCEPT: Versions = Versions {
        min: OLDEST_VERSION,
        max: PROTOCOL_VERSION,
    };

    fn open1(ring: &Ring, bytes: &[u8], max: usize) -> Result<Header, DropReason> {
        open(ring, ACCEPT, bytes, max).map(|o| o.header)
    }

    fn key(n: u8) -> SecretKey {
        SecretKey::from_bytes(&[n; 32])
    }

    fn delta(version: u64) -> Payload {
        Payload::Delta {
            version,
            changes: vec![Change::Upsert(
                WireSource::Static("db".into()),
                WireGroup {
                    names: vec!["db".into()],
                    v4: vec![Ipv4Addr::new(10, 0, 0, 1)],
                    v6: vec![],
                    ..Default::default()
                },
            )],
        }
    }

    #[test]
    fn roundtrip() {
        let ring = Ring::for_tests("s");
        let bytes = seal_own(&ring, Encoding::CURRENT, &key(1), "node-a", 7, 9, delta(3));
        let h = open1(&ring, &bytes, MAX_GOSSIP_BYTES).unwrap();
        assert_eq!(h.origin, *key(1).public().as_bytes());
        assert_eq!((h.incarnation, h.seq), (7, 9));
        assert_eq!(h.node_name, "node-a");
        assert_eq!(h.payload, delta(3));
        assert!(bytes.len() < 200, "compact: {} bytes", bytes.len());
    }

    #[test]
    fn another_secret_fails_the_hmac() {
        let bytes = seal_own(
            &Ring::for_tests("s"),
            Encoding::CURRENT,
            &key(1),
            "a",
            1,
            1,
            Payload::Hello,
        );
        assert_eq!(
            open1(&Ring::for_tests("other"), &bytes, MAX_GOSSIP_BYTES),
            Err(DropReason::BadMac)
        );
    }

    #[test]
    fn tampering_fails() {
        let ring = Ring::for_tests("s");
        let bytes = seal_own(&ring, Encoding::CURRENT, &key(1), "a", 1, 1, delta(1));
        let mut v = bytes.clone();
        v[0] = 1;
        assert_eq!(open1(&ring, &v, 4096), Err(DropReason::UnknownVersion));
        let mut v = bytes.clone();
        v[0] = PROTOCOL_VERSION + 1;
        assert_eq!(open1(&ring, &v, 4096), Err(DropReason::UnknownVersion));
        let mut v = bytes.clone();
        v[10] ^= 1;
        assert_eq!(open1(&ring, &v, 4096), Err(DropReason::BadMac));
        let mut v = bytes.clone();
        let n = v.len();
        v[n - 1] ^= 1;
        assert_eq!(open1(&ring, &v, 4096), Err(DropReason::BadSignature));
        assert_eq!(open1(&ring, &bytes, 10), Err(DropReason::TooLarge));
        assert_eq!(
            open1(&ring, &bytes[..bytes.len() - 1], 4096),
            Err(DropReason::BadMac)
        );
        assert_eq!(open1(&ring, &[1, 2, 3], 4096), Err(DropReason::Malformed));
    }

    #[test]
    fn signature_by_another_key_fails_and_origin_must_be_signer() {
        let ring = Ring::for_tests("s");
        // Claims to be signed by key 1 but is signed by key 2.
        let header = Header {
            signer: *key(1).public().as_bytes(),
            origin: *key(1).public().as_bytes(),
            node_name: "a".into(),
            incarnation: 1,
            seq: 1,
            payload: delta(1),
        };
        let bytes = seal(&ring, Encoding::CURRENT, &key(2), &header);
        assert_eq!(open1(&ring, &bytes, 4096), Err(DropReason::BadSignature));
        // Signed by key 2, honest signer, claims key 1's records.
        let header = Header {
            signer: *key(2).public().as_bytes(),
            ..header
        };
        let bytes = seal(&ring, Encoding::CURRENT, &key(2), &header);
        assert_eq!(open1(&ring, &bytes, 4096), Err(DropReason::NotOwner));
    }

    #[test]
    fn replay_window_accepts_each_sequence_once() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(5, 10), Fresh::Yes);
        assert_eq!(w.check(5, 10), Fresh::No);
        assert_eq!(w.check(5, 12), Fresh::Yes);
        // Out of order but inside the window: accepted once.
        assert_eq!(w.check(5, 11), Fresh::Yes);
        assert_eq!(w.check(5, 11), Fresh::No);
        assert_eq!(w.check(5, 9), Fresh::Yes);
        // Far ahead, then the old ones are outside the window.
        assert_eq!(w.check(5, 12 + REPLAY_WINDOW), Fresh::Yes);
        assert_eq!(w.check(5, 12), Fresh::No);
        assert_eq!(w.check(5, 13), Fresh::Yes);
        assert_eq!(w.check(5, 13), Fresh::No);
        // Older incarnation: never; newer: a restart.
        assert_eq!(w.check(4, 100_000), Fresh::No);
        assert_eq!(w.check(6, 1), Fresh::NewIncarnation);
        assert_eq!(w.check(6, 1), Fresh::No);
        assert_eq!(w.check(5, 99_999), Fresh::No);
    }

    #[test]
    fn replay_window_shifts_across_words() {
        let mut w = ReplayWindow::default();
        for s in 0..300 {
            assert_eq!(w.check(1, s), Fresh::Yes);
        }
        for s in 0..300 {
            assert_eq!(w.check(1, s), Fresh::No, "seq {s}");
        }
        assert_eq!(w.check(1, 370), Fresh::Yes);
        for s in 300..370 {
            assert_eq!(w.check(1, s), Fresh::Yes, "seq {s}");
        }
    }

    #[test]
    fn chunks_fit_the_limit() {
        let ring = Ring::for_tests("s");
        let changes: Vec<Change> = (0..500)
            .map(|i| {
                Change::Upsert(
                    WireSource::Container {
                        id: format!("{i:064x}"),
                        network: "net".into(),
                    },
                    WireGroup {
                        names: vec![format!("c{i}")],
                        v4: vec![Ipv4Addr::new(10, 0, 1, (i % 250) as u8)],
                        v6: vec![],
                        ..Default::default()
                    },
                )
            })
            .chain([Change::Upsert(
                WireSource::Static("huge".into()),
                WireGroup {
                    names: (0..400).map(|i| format!("name-{i}")).collect(),
                    v4: vec![],
                    v6: vec![],
                    ..Default::default()
                },
            )])
            .collect();
        let (chunks, skipped) = chunk_changes(changes, MAX_GOSSIP_BYTES, HEADER_BUDGET);
        assert_eq!(skipped, 1);
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 500);
        let name = "n".repeat(MAX_NODE_NAME_LEN);
        for c in chunks {
            let bytes = seal_own(
                &ring,
                Encoding::CURRENT,
                &key(1),
                &name,
                u64::MAX,
                u64::MAX,
                Payload::Delta {
                    version: u64::MAX,
                    changes: c,
                },
            );
            assert!(bytes.len() <= MAX_GOSSIP_BYTES, "{}", bytes.len());
        }
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_bytes(&[7; 32])
    }

    fn seal_at(ring: &Ring, version: u8, speaks: u8) -> Vec<u8> {
        seal_own(
            ring,
            Encoding { version, speaks },
            &key(),
            "node-a",
            1,
            1,
            Payload::Hello,
        )
    }

    #[test]
    fn both_encoders_open_and_say_what_the_sender_speaks() {
        let ring = Ring::for_tests("s");
        let both = Versions::speaking(PROTOCOL_VERSION);
        let (current, previous_v) = (PROTOCOL_VERSION, PROTOCOL_VERSION - 1);
        for (version, speaks) in [
            (current, current),
            (previous_v, current),
            (previous_v, previous_v),
        ] {
            let o = open(&ring, both, &seal_at(&ring, version, speaks), 4096).unwrap();
            assert_eq!((o.version, o.speaks), (version, speaks));
            assert_eq!(o.key_id, ring.primary().0);
        }
        // A node held at the previous version drops the current encoding.
        let previous = Versions::speaking(previous_v);
        assert_eq!(
            open(&ring, previous, &seal_at(&ring, current, current), 4096),
            Err(DropReason::UnknownVersion)
        );
        assert!(open(&ring, previous, &seal_at(&ring, previous_v, current), 4096).is_ok());
    }

    fn delta_of(groups: Vec<WireGroup>) -> Payload {
        Payload::Delta {
            version: 9,
            changes: groups
                .into_iter()
                .enumerate()
                .flat_map(|(i, g)| {
                    [
                        Change::Remove(WireSource::Static(format!("gone-{i}"))),
                        Change::Upsert(WireSource::Static(format!("s{i}")), g),
                    ]
                })
                .collect(),
        }
    }

    /// v4 carries the groups' facts after the header; v3 keeps the v3
    /// layout (a v3 peer reads it) and a v4 node reading it gets defaults.
    #[test]
    fn facts_travel_at_v4_and_default_at_v3() {
        use crate::table::Proto;
        let ring = Ring::for_tests("s");
        let facts = Facts {
            scope: Some(Scope {
                project: "shop".into(),
                service: "db".into(),
            }),
            health: Health::Unhealthy,
            srv: vec![SrvPort {
                service: "http".into(),
                proto: Proto::Udp,
                port: 8080,
            }],
        };
        let with = WireGroup {
            names: vec!["db".into()],
            v4: vec!["10.0.0.1".parse().unwrap()],
            facts: facts.clone(),
            ..WireGroup::default()
        };
        let plain = WireGroup {
            names: vec!["web".into()],
            ..WireGroup::default()
        };
        let payload = delta_of(vec![with.clone(), plain.clone()]);
        let accept = Versions::speaking(PROTOCOL_VERSION);
        let seal = |version: u8, payload: Payload| {
            seal_own(
                &ring,
                Encoding {
                    version,
                    speaks: version,
                },
                &key(),
                "node-a",
                1,
                1,
                payload,
            )
        };
        let v4 = open(&ring, accept, &seal(FACTS_VERSION, payload.clone()), 4096).unwrap();
        assert_eq!(v4.header.payload, payload);
        let Payload::Delta { changes, .. } = &v4.header.payload else {
            panic!()
        };
        let Change::Upsert(_, g) = &changes[1] else {
            panic!()
        };
        let group = Group::from(g.clone());
        assert_eq!(
            (group.scope, group.health, group.srv),
            (
                facts.scope.clone().map(Box::new),
                facts.health,
                facts.srv.clone()
            )
        );
        // v3: the same bytes as a header without facts, read with defaults.
        let v3_bytes = seal(FACTS_VERSION - 1, payload.clone());
        let v3 = open(&ring, accept, &v3_bytes, 4096).unwrap();
        assert_eq!(
            v3.header.payload,
            delta_of(vec![
                WireGroup {
                    facts: Facts::default(),
                    ..with
                },
                plain
            ])
        );
        let body = &v3_bytes[1 + KEY_ID_LEN..v3_bytes.len() - SIG_LEN - MAC_LEN - 1];
        let header: Header = postcard::from_bytes(body).unwrap();
        assert_eq!(header, v3.header);
        // A v4 message whose facts do not match its groups is malformed.
        let mut short = seal(FACTS_VERSION, payload.clone());
        let facts_at = 1 + KEY_ID_LEN + postcard::to_allocvec(&v4.header).unwrap().len();
        short[facts_at] = 1;
        short.truncate(short.len() - SIG_LEN - MAC_LEN);
        let covered = short.clone();
        short.extend_from_slice(&hmac(&ring.primary().1.message, &[&covered]));
        let sig = key().sign(&short);
        short.extend_from_slice(&sig.to_bytes());
        assert!(open(&ring, accept, &short, 4096).is_err());
    }

    #[test]
    fn invalid_facts_from_a_peer_are_dropped() {
        use crate::table::Proto;
        let g: Group = WireGroup {
            names: vec!["db".into()],
            facts: Facts {
                scope: Some(Scope {
                    project: "a.b".into(),
                    service: "db".into(),
                }),
                health: Health::Healthy,
                srv: (0..40)
                    .map(|i| SrvPort {
                        service: if i % 2 == 0 {
                            "Web".into()
                        } else {
                            "bad label".into()
                        },
                        proto: Proto::Tcp,
                        port: i,
                    })
                    .collect(),
            },
            ..WireGroup::default()
        }
        .into();
        assert_eq!(g.scope, None);
        assert_eq!(g.health, Health::Healthy);
        // Even ports only (odd ones have a bad service), port 0 left out,
        // at most MAX_SRV_PORTS.
        assert_eq!(g.srv.len(), MAX_SRV_PORTS);
        assert!(
            g.srv
                .iter()
                .all(|p| p.service == "web" && p.port > 0 && p.port % 2 == 0)
        );
    }

    #[test]
    fn a_core_message_travels_in_v4() {
        let ring = Ring::for_tests("s");
        // Seals `body` as message `seq` of node-a, opens it back.
        let round_trip = |seq: u64, body: &crate::gossip::core::Body| {
            let payload = Payload::Core(body.clone());
            let bytes = seal_own(&ring, Encoding::CURRENT, &key(), "node-a", 1, seq, payload);
            open(&ring, Versions::speaking(PROTOCOL_VERSION), &bytes, 4096).unwrap()
        };
        let body = crate::gossip::core::Body::Alive {
            beat: 3,
            version: 7,
            addrs: vec!["10.0.0.1:9254".parse().unwrap()],
        };
        let o = round_trip(1, &body);
        assert_eq!(o.header.payload, Payload::Core(body));
        assert_eq!(o.version, 4);
        // A core full state keeps its groups' facts.
        let mut g = WireGroup {
            names: vec!["web".into()],
            ..Default::default()
        };
        g.facts.health = crate::table::Health::Unhealthy;
        let body = crate::gossip::core::Body::FullState {
            version: 2,
            groups: vec![(WireSource::Static("web".into()), g)],
        };
        let o = round_trip(2, &body);
        assert_eq!(o.header.payload, Payload::Core(body));
    }

    #[test]
    fn any_key_of_the_ring_opens_a_message_and_a_removed_one_does_not() {
        let old = Keyring::for_tests("old");
        let new = Keyring::for_tests("new");
        let both = Ring::new(&Keyring::new(
            new.keys().iter().chain(old.keys()).cloned().collect(),
        ));
        let accept = Versions::speaking(PROTOCOL_VERSION);
        for version in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION] {
            let by_old = seal_at(&Ring::new(&old), version, PROTOCOL_VERSION);
            let o = open(&both, accept, &by_old, 4096).unwrap();
            assert_eq!(o.key_id, old.primary().unwrap().id());
            assert_eq!(
                open(&Ring::new(&new), accept, &by_old, 4096),
                Err(DropReason::BadMac)
            );
        }
    }

    #[test]
    fn adjacent_versions_share_the_highest_and_n_minus_2_shares_none() {
        let p = PROTOCOL_VERSION;
        let n = Versions::speaking(p);
        assert_eq!(n.highest_shared(Versions::speaking(p)), Some(p));
        assert_eq!(n.highest_shared(Versions::speaking(p - 1)), Some(p - 1));
        assert_eq!(
            n.highest_shared(Versions {
                min: p - 3,
                max: p - 2
            }),
            None
        );
        assert_eq!(n.to_string(), format!("{} to {p}", p - 1));
    }

    #[test]
    fn a_node_name_that_is_not_a_label_is_dropped() {
        let ring = Ring::for_tests("s");
        let bytes = seal_own(
            &ring,
            Encoding::CURRENT,
            &key(),
            "evil\n[ERROR] forged",
            1,
            1,
            Payload::Hello,
        );
        assert_eq!(
            open(&ring, Versions::speaking(PROTOCOL_VERSION), &bytes, 4096),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn a_peer_group_keeps_at_most_the_capped_names_and_addresses() {
        use crate::table::MAX_NAMES_PER_GROUP;
        let wire = WireGroup {
            names: (0..3 * MAX_NAMES_PER_GROUP)
                .map(|i| format!("n{i}"))
                .collect(),
            v4: (0..2 * MAX_ADDRS_PER_GROUP as u32)
                .map(Ipv4Addr::from)
                .collect(),
            v6: (0..2 * MAX_ADDRS_PER_GROUP as u128)
                .map(Ipv6Addr::from)
                .collect(),
            ..Default::default()
        };
        let g = Group::from(wire);
        assert_eq!(g.names.len(), MAX_NAMES_PER_GROUP);
        assert_eq!(g.names[0], "n0");
        assert_eq!(
            (g.v4.len(), g.v6.len()),
            (MAX_ADDRS_PER_GROUP, MAX_ADDRS_PER_GROUP)
        );
    }
}
