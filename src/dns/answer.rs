//! Answer building: a pure function of (query bytes, table snapshot,
//! rotation counter, transport) that writes the response into a
//! caller-owned buffer and says what happened.
//!
//! Invariants: [`answer`] never allocates (the caller's buffer keeps its
//! capacity; [`MAX_MESSAGE_LEN`] is enough), never panics on input, and
//! never writes more than the transport's size limit: what does not fit is
//! replaced by an empty answer with TC=1. Names of the zone (single labels,
//! the domain and everything below it) are always answered here, never
//! forwarded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::table::Table;

use super::wire::{
    self, CLASS_ANY, CLASS_IN, EDNS_FLAG_DO, FLAG_AA, FLAG_CD, FLAG_QR, FLAG_RA, FLAG_RD, FLAG_TC,
    HEADER_LEN, Header, MAX_NAME_LEN, Name, OPCODE_QUERY, RCODE_BADVERS, RCODE_FORMERR,
    RCODE_NOERROR, RCODE_NOTIMP, RCODE_NXDOMAIN, RCODE_REFUSED, TYPE_A, TYPE_AAAA, TYPE_ANY,
    TYPE_NS, TYPE_OPT, TYPE_PTR, TYPE_SOA,
};

/// Largest DNS message (TCP length prefix, RFC 1035 §4.2.2).
pub const MAX_MESSAGE_LEN: usize = 65535;
/// UDP payload without EDNS, and the least a client may advertise
/// (RFC 1035 §2.3.4, RFC 6891 §6.2.5).
pub const UDP_PAYLOAD_MIN: usize = 512;
/// UDP payload we advertise and the most we send in a local answer
/// (DNS flag day 2020: avoids IP fragmentation).
pub const UDP_PAYLOAD_ADVERTISED: u16 = 1232;
/// SOA timers of the synthetic zone (seconds). The SOA minimum (negative
/// TTL) is the table's TTL.
pub const SOA_REFRESH_SECS: u32 = 3600;
pub const SOA_RETRY_SECS: u32 = 600;
pub const SOA_EXPIRE_SECS: u32 = 86400;
/// First label of the apex NS target and SOA MNAME (`ns.<domain>.`).
pub const NS_LABEL: &[u8] = b"\x02ns";
/// First label of the SOA RNAME (`hostmaster.<domain>.`).
pub const HOSTMASTER_LABEL: &[u8] = b"\x0ahostmaster";

/// Length of an OPT record with no options.
const OPT_LEN: usize = 11;
/// Zone transfers are refused (RFC 5936, RFC 1995).
const TYPE_AXFR: u16 = 252;
const TYPE_IXFR: u16 = 251;
/// Compression pointer to the question name.
const QNAME_PTR: [u8; 2] = [0xC0, 0x0C];

/// How the query arrived: decides the size limit of the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What [`answer`] did with a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `out` holds the response.
    Answered {
        rcode: u16,
        /// The question's type, when the question could be parsed.
        qtype: Option<u16>,
        /// TC=1 was set because the answer did not fit.
        truncated: bool,
    },
    /// Not ours: relay the query upstream. `max_len` is the largest answer
    /// the client accepts on this transport.
    Forward { qtype: u16, max_len: usize },
    /// Not a query worth answering (shorter than a header, or QR=1).
    Drop,
}

/// Builds the response to `query` into `out` (cleared first).
/// `rotation` picks the first address of multi-address answers; callers
/// bump it per answer.
pub fn answer(
    query: &[u8],
    table: &Table,
    rotation: usize,
    transport: Transport,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    let Some(header) = Header::new_checked(query) else {
        return Outcome::Drop;
    };
    if header.is_response() {
        return Outcome::Drop;
    }
    if header.opcode() != OPCODE_QUERY {
        return bare(header, RCODE_NOTIMP, out);
    }
    if header.qdcount() != 1 {
        return bare(header, RCODE_FORMERR, out);
    }
    let Ok(question) = wire::parse_question(query) else {
        return bare(header, RCODE_FORMERR, out);
    };
    let Ok(edns) = wire::parse_edns(query, header, question.end) else {
        return bare(header, RCODE_FORMERR, out);
    };
    let qtype = question.qtype;
    let (limit, forward_len) = match (transport, edns) {
        (Transport::Tcp, _) => (MAX_MESSAGE_LEN, MAX_MESSAGE_LEN),
        (Transport::Udp, None) => (UDP_PAYLOAD_MIN, UDP_PAYLOAD_MIN),
        (Transport::Udp, Some(e)) => {
            let asked = (e.payload as usize).max(UDP_PAYLOAD_MIN);
            (asked.min(UDP_PAYLOAD_ADVERTISED as usize), asked)
        }
    };
    let mut w = Writer::new(
        out,
        &query[..question.end],
        header,
        limit,
        edns.map(|e| e.dnssec_ok),
        table.ttl_secs,
    );
    if let Some(e) = edns
        && e.version > 0
    {
        return w.finish(RCODE_BADVERS, false, qtype);
    }

    let name = &question.name;
    // Where the domain sits in the question, to point at it.
    let below = name.labels_below(&table.domain_wire);
    let domain_at = below.map(|_| HEADER_LEN + name.wire().len() - table.domain_wire.len());
    let mut key = [0; MAX_NAME_LEN];
    let zone = classify(
        name,
        below.filter(|_| table.domain_wire.len() > 1),
        &mut key,
    );
    if matches!(zone, Zone::Other) {
        return match reverse_addr(name).and_then(|ip| table.reverse(&ip)) {
            Some(target) if qtype == TYPE_PTR && question.qclass == CLASS_IN => {
                w.rr_qname(TYPE_PTR, target);
                w.finish(RCODE_NOERROR, true, qtype)
            }
            _ => w.forward(qtype, forward_len),
        };
    }
    if (question.qclass != CLASS_IN && question.qclass != CLASS_ANY)
        || matches!(qtype, TYPE_AXFR | TYPE_IXFR)
    {
        return w.finish(RCODE_REFUSED, false, qtype);
    }
    match zone {
        Zone::Apex => {
            let ptr = QNAME_PTR;
            if matches!(qtype, TYPE_SOA | TYPE_ANY) {
                w.soa(table, Some(HEADER_LEN), false);
            }
            if matches!(qtype, TYPE_NS | TYPE_ANY) {
                w.ns(ptr);
            }
            if w.ancount == 0 {
                w.soa(table, domain_at, true);
            }
            w.finish(RCODE_NOERROR, true, qtype)
        }
        Zone::Key { len } => match table.lookup(&key[..len]) {
            None => {
                w.soa(table, domain_at, true);
                w.finish(RCODE_NXDOMAIN, true, qtype)
            }
            Some(entry) => {
                if matches!(qtype, TYPE_A | TYPE_ANY) {
                    let n = entry.v4.len();
                    for i in 0..n {
                        let ip = entry.v4[(rotation + i) % n];
                        w.rr_qname(TYPE_A, &ip.octets());
                    }
                }
                if matches!(qtype, TYPE_AAAA | TYPE_ANY) {
                    let n = entry.v6.len();
                    for i in 0..n {
                        let ip = entry.v6[(rotation + i) % n];
                        w.rr_qname(TYPE_AAAA, &ip.octets());
                    }
                }
                if w.ancount == 0 {
                    w.soa(table, domain_at, true);
                }
                w.finish(RCODE_NOERROR, true, qtype)
            }
        },
        Zone::Unknown => {
            w.soa(table, domain_at, true);
            w.finish(RCODE_NXDOMAIN, true, qtype)
        }
        Zone::Other => unreachable!("handled above"),
    }
}

/// A response to `query` with only `rcode` (and the question when it
/// parses): REFUSED for clients outside the allowed networks, SERVFAIL when
/// the forwarder is saturated. Drops what [`answer`] would drop.
pub fn error_reply(query: &[u8], rcode: u16, out: &mut Vec<u8>) -> Outcome {
    out.clear();
    let Some(header) = Header::new_checked(query) else {
        return Outcome::Drop;
    };
    if header.is_response() {
        return Outcome::Drop;
    }
    if header.qdcount() != 1 {
        return bare(header, rcode, out);
    }
    match wire::parse_question(query) {
        Ok(q) => Writer::new(out, &query[..q.end], header, MAX_MESSAGE_LEN, None, 0)
            .finish(rcode, false, q.qtype),
        Err(_) => bare(header, rcode, out),
    }
}

/// Header-only response: the id, opcode and RD of the query, `rcode`.
fn bare(header: Header<'_>, rcode: u16, out: &mut Vec<u8>) -> Outcome {
    let flags = FLAG_QR | (header.flags() & (0x7800 | FLAG_RD)) | FLAG_RA | (rcode & 0xF);
    out.extend_from_slice(&header.id().to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Outcome::Answered {
        rcode,
        qtype: None,
        truncated: false,
    }
}

/// Where a question name falls.
enum Zone {
    /// The domain itself.
    Apex,
    /// A name of the zone with its table key (`api`, `api.node-a`).
    Key { len: usize },
    /// A name of the zone that cannot be a key.
    Unknown,
    /// Not ours (root, reverse zones, the rest of the internet).
    Other,
}

/// Sorts `name` into the zone; a table key is written into `key`.
/// `below`: the labels in front of the domain, if the name is in it.
fn classify(name: &Name, below: Option<usize>, key: &mut [u8; MAX_NAME_LEN]) -> Zone {
    let key_labels = match below {
        Some(0) => return Zone::Apex,
        Some(k) => k,
        None if name.n_labels() == 1 => 1,
        None => return Zone::Other,
    };
    match name.dotted_key(key_labels, key) {
        Some(len) => Zone::Key { len },
        None => Zone::Unknown,
    }
}

/// The address named by `d.c.b.a.in-addr.arpa.` or a full 32-nibble
/// `ip6.arpa.` name.
fn reverse_addr(name: &Name) -> Option<IpAddr> {
    let mut labels = name.labels();
    let arpa = |labels: &mut wire::Labels, zone: &[u8]| {
        labels.next()?.eq_ignore_ascii_case(zone).then_some(())?;
        labels.next()?.eq_ignore_ascii_case(b"arpa").then_some(())
    };
    match name.n_labels() {
        6 => {
            let mut octets = [0u8; 4];
            for o in octets.iter_mut().rev() {
                *o = decimal_octet(labels.next()?)?;
            }
            arpa(&mut labels, b"in-addr")?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        34 => {
            let mut value: u128 = 0;
            for i in 0..32 {
                let &[c] = labels.next()? else { return None };
                value |= ((c as char).to_digit(16)? as u128) << (4 * i);
            }
            arpa(&mut labels, b"ip6")?;
            Some(IpAddr::V6(Ipv6Addr::from(value)))
        }
        _ => None,
    }
}

fn decimal_octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    let mut v: u16 = 0;
    for &c in label {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u16;
    }
    u8::try_from(v).ok()
}

/// Appends records after the copied question, within `limit`.
struct Writer<'a> {
    /// Header and question copied from the query, then the records.
    out: &'a mut Vec<u8>,
    /// Flags of the query.
    query_flags: u16,
    /// Length of header and question.
    qend: usize,
    /// Most bytes the header, question and records may take (the OPT, if
    /// any, is kept aside).
    room: usize,
    /// The client sent OPT: `Some(DO bit)`.
    opt: Option<bool>,
    ttl: u32,
    ancount: u16,
    nscount: u16,
    truncated: bool,
}

/// Type, class, TTL and RDLENGTH of a record: everything between its owner
/// and its data.
#[inline]
fn rr_fields(rtype: u16, ttl: u32, rdlen: usize) -> [u8; 10] {
    let [t0, t1] = rtype.to_be_bytes();
    let [c0, c1] = CLASS_IN.to_be_bytes();
    let [l0, l1, l2, l3] = ttl.to_be_bytes();
    let [r0, r1] = (rdlen as u16).to_be_bytes();
    [t0, t1, c0, c1, l0, l1, l2, l3, r0, r1]
}

impl<'a> Writer<'a> {
    /// Starts the message in `out` (cleared) with `question`: the query's
    /// header and question, copied as they are.
    fn new(
        out: &'a mut Vec<u8>,
        question: &[u8],
        header: Header<'_>,
        limit: usize,
        opt: Option<bool>,
        ttl: u32,
    ) -> Writer<'a> {
        out.clear();
        out.extend_from_slice(question);
        Writer {
            out,
            query_flags: header.flags(),
            qend: question.len(),
            room: limit - if opt.is_some() { OPT_LEN } else { 0 },
            opt,
            ttl,
            ancount: 0,
            nscount: 0,
            truncated: false,
        }
    }

    /// True when `len` more bytes fit; sets `truncated` otherwise.
    #[inline]
    fn fits(&mut self, len: usize) -> bool {
        let ok = !self.truncated && self.out.len() + len <= self.room;
        self.truncated |= !ok;
        ok
    }

    /// An answer record owned by the question name.
    #[inline]
    fn rr_qname(&mut self, rtype: u16, rdata: &[u8]) {
        if !self.fits(QNAME_PTR.len() + 10 + rdata.len()) {
            return;
        }
        self.out.extend_from_slice(&QNAME_PTR);
        self.out
            .extend_from_slice(&rr_fields(rtype, self.ttl, rdata.len()));
        self.out.extend_from_slice(rdata);
        self.ancount += 1;
    }

    /// The apex NS record, owned by `owner` (a pointer to the domain).
    fn ns(&mut self, owner: [u8; 2]) {
        if !self.fits(owner.len() + 10 + NS_LABEL.len() + owner.len()) {
            return;
        }
        self.out.extend_from_slice(&owner);
        self.out
            .extend_from_slice(&rr_fields(TYPE_NS, self.ttl, NS_LABEL.len() + 2));
        self.out.extend_from_slice(NS_LABEL);
        self.out.extend_from_slice(&owner);
        self.ancount += 1;
    }

    /// The zone's SOA, in the answer or (`authority`) the authority
    /// section. `domain_at` is the offset of the domain name already in the
    /// message, if any.
    fn soa(&mut self, table: &Table, domain_at: Option<usize>, authority: bool) {
        let owner_len = if domain_at.is_some() {
            2
        } else {
            table.domain_wire.len()
        };
        let rdlen = NS_LABEL.len() + 2 + HOSTMASTER_LABEL.len() + 2 + 20;
        if !self.fits(owner_len + 10 + rdlen) {
            return;
        }
        let at = match domain_at {
            Some(at) => {
                self.out
                    .extend_from_slice(&(0xC000 | at as u16).to_be_bytes());
                at
            }
            None => {
                let at = self.out.len();
                self.out.extend_from_slice(&table.domain_wire);
                at
            }
        };
        let ptr = (0xC000 | at as u16).to_be_bytes();
        self.out
            .extend_from_slice(&rr_fields(TYPE_SOA, self.ttl, rdlen));
        self.out.extend_from_slice(NS_LABEL);
        self.out.extend_from_slice(&ptr);
        self.out.extend_from_slice(HOSTMASTER_LABEL);
        self.out.extend_from_slice(&ptr);
        for v in [
            table.serial,
            SOA_REFRESH_SECS,
            SOA_RETRY_SECS,
            SOA_EXPIRE_SECS,
            table.ttl_secs,
        ] {
            self.out.extend_from_slice(&v.to_be_bytes());
        }
        if authority {
            self.nscount += 1;
        } else {
            self.ancount += 1;
        }
    }

    /// Not ours after all: nothing to send from here (`out` is emptied).
    fn forward(self, qtype: u16, max_len: usize) -> Outcome {
        self.out.clear();
        Outcome::Forward { qtype, max_len }
    }

    /// Fills the header, appends the OPT, and truncates (TC=1, question
    /// and OPT only) when something did not fit.
    fn finish(mut self, rcode: u16, authoritative: bool, qtype: u16) -> Outcome {
        if self.truncated {
            self.out.truncate(self.qend);
            self.ancount = 0;
            self.nscount = 0;
        }
        let q = self.query_flags;
        let mut flags = FLAG_QR | (q & (0x7800 | FLAG_RD | FLAG_CD)) | FLAG_RA | (rcode & 0xF);
        if authoritative {
            flags |= FLAG_AA;
        }
        if self.truncated {
            flags |= FLAG_TC;
        }
        let [f0, f1] = flags.to_be_bytes();
        let [a0, a1] = self.ancount.to_be_bytes();
        let [n0, n1] = self.nscount.to_be_bytes();
        let arcount = u8::from(self.opt.is_some());
        // Everything after the id: flags, QDCOUNT = 1 and the counts.
        self.out[2..HEADER_LEN].copy_from_slice(&[f0, f1, 0, 1, a0, a1, n0, n1, 0, arcount]);
        if let Some(dnssec_ok) = self.opt {
            let ttl = ((rcode >> 4) as u32) << 24 | if dnssec_ok { EDNS_FLAG_DO as u32 } else { 0 };
            let [p0, p1] = UDP_PAYLOAD_ADVERTISED.to_be_bytes();
            let [o0, o1] = TYPE_OPT.to_be_bytes();
            let [l0, l1, l2, l3] = ttl.to_be_bytes();
            self.out
                .extend_from_slice(&[0, o0, o1, p0, p1, l0, l1, l2, l3, 0, 0]);
        }
        Outcome::Answered {
            rcode,
            qtype: Some(qtype),
            truncated: self.truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name as HName, RData, RecordType};

    use super::*;
    use crate::table::{Group, Origin, Source};

    fn table() -> Table {
        let mut groups = BTreeMap::new();
        let mut add = |node: &str, name: &str, v4: &[&str], v6: &[&str]| {
            groups.insert(
                (
                    Origin {
                        id: node.into(),
                        node_name: node.into(),
                    },
                    Source::Static { name: name.into() },
                ),
                Group {
                    names: vec![name.into()],
                    v4: v4.iter().map(|a| a.parse().unwrap()).collect(),
                    v6: v6.iter().map(|a| a.parse().unwrap()).collect(),
                },
            );
        };
        add("node-a", "api", &["10.0.0.1"], &["fd00::1"]);
        add("node-b", "api", &["10.0.0.2"], &[]);
        add("node-a", "web", &["10.0.0.3"], &[]);
        Table::build("glued.internal", 5, 7, Arc::new(groups))
    }

    fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(HName::from_ascii(name).unwrap(), rtype));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// Answers `q` over UDP and parses the response.
    fn check(q: &[u8], t: &Table) -> (Outcome, Message) {
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        let outcome = answer(q, t, 0, Transport::Udp, &mut out);
        (outcome, Message::from_vec(&out).unwrap())
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::PTR(p) => p.0.to_string(),
                RData::NS(n) => n.0.to_string(),
                RData::SOA(s) => format!("SOA {} {}", s.mname, s.serial),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_answer_echoes_the_case_and_is_authoritative() {
        let t = table();
        let (o, m) = check(&query("WeB.Glued.Internal.", RecordType::A, None), &t);
        assert!(matches!(o, Outcome::Answered { rcode: 0, .. }));
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.queries[0].name().to_ascii(), "WeB.Glued.Internal.");
        assert_eq!(m.answers[0].name.to_ascii(), "WeB.Glued.Internal.");
        assert_eq!(m.answers[0].ttl, 5);
        assert_eq!(addrs(&m), ["10.0.0.3"]);
    }

    #[test]
    fn single_label_under_domain_and_pinned_names() {
        let t = table();
        let (_, m) = check(&query("api.", RecordType::A, None), &t);
        assert_eq!(addrs(&m).len(), 2);
        let (_, m) = check(
            &query("api.node-b.glued.internal.", RecordType::A, None),
            &t,
        );
        assert_eq!(addrs(&m), ["10.0.0.2"]);
        let (_, m) = check(
            &query("api.node-a.glued.internal.", RecordType::AAAA, None),
            &t,
        );
        assert_eq!(addrs(&m), ["fd00::1"]);
    }

    #[test]
    fn nodata_and_nxdomain_carry_the_soa() {
        let t = table();
        let (_, m) = check(&query("web.glued.internal.", RecordType::AAAA, None), &t);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        let RData::SOA(soa) = &m.authorities[0].data else {
            panic!("no SOA")
        };
        assert_eq!((soa.serial, soa.minimum), (7, 5));
        assert_eq!(soa.mname.to_ascii(), "ns.glued.internal.");
        for name in ["nope.", "nope.glued.internal.", "a.b.glued.internal."] {
            let (o, m) = check(&query(name, RecordType::A, None), &t);
            assert!(matches!(o, Outcome::Answered { rcode: 3, .. }), "{name}");
            assert!(m.metadata.authoritative);
            assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
            assert_eq!(m.authorities[0].name.to_ascii(), "glued.internal.");
        }
    }

    #[test]
    fn apex_answers_soa_ns_and_any() {
        let t = table();
        let (_, m) = check(&query("glued.internal.", RecordType::SOA, None), &t);
        assert_eq!(addrs(&m), ["SOA ns.glued.internal. 7"]);
        let (_, m) = check(&query("glued.internal.", RecordType::NS, None), &t);
        assert_eq!(addrs(&m), ["ns.glued.internal."]);
        let (_, m) = check(&query("glued.internal.", RecordType::ANY, None), &t);
        assert_eq!(m.answers.len(), 2);
        let (_, m) = check(&query("api.", RecordType::ANY, None), &t);
        assert_eq!(addrs(&m).len(), 3);
    }

    #[test]
    fn ptr_of_table_addresses_and_forward_of_others() {
        let t = table();
        let (_, m) = check(&query("3.0.0.10.in-addr.arpa.", RecordType::PTR, None), &t);
        assert_eq!(addrs(&m), ["web.glued.internal."]);
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        let (_, m) = check(&query(v6, RecordType::PTR, None), &t);
        assert_eq!(addrs(&m), ["api.glued.internal."]);
        let mut out = Vec::new();
        for (name, rtype) in [
            ("9.0.0.10.in-addr.arpa.", RecordType::PTR),
            ("example.com.", RecordType::A),
            (".", RecordType::NS),
        ] {
            let o = answer(&query(name, rtype, None), &t, 0, Transport::Udp, &mut out);
            assert!(matches!(o, Outcome::Forward { max_len: 512, .. }), "{name}");
        }
    }

    #[test]
    fn rotation_changes_the_first_address() {
        let t = table();
        let q = query("api.glued.internal.", RecordType::A, None);
        let mut out = Vec::new();
        let mut firsts = std::collections::HashSet::new();
        for r in 0..4 {
            answer(&q, &t, r, Transport::Udp, &mut out);
            let m = Message::from_vec(&out).unwrap();
            firsts.insert(addrs(&m)[0].clone());
        }
        assert_eq!(firsts.len(), 2);
    }

    #[test]
    fn edns_size_is_honoured_and_too_big_answers_truncate() {
        let mut groups = BTreeMap::new();
        groups.insert(
            (
                Origin {
                    id: "a".into(),
                    node_name: "a".into(),
                },
                Source::Static { name: "big".into() },
            ),
            Group {
                names: vec!["big".into()],
                v4: (0..60)
                    .map(|i| std::net::Ipv4Addr::new(10, 1, 0, i))
                    .collect(),
                v6: vec![],
            },
        );
        let t = Table::build("glued.internal", 5, 1, Arc::new(groups));
        // 60 * 16 bytes: more than 512, less than 1232.
        let (o, m) = check(&query("big.", RecordType::A, None), &t);
        assert!(matches!(
            o,
            Outcome::Answered {
                truncated: true,
                ..
            }
        ));
        assert!(m.metadata.truncation && m.answers.is_empty());
        let (_, m) = check(&query("big.", RecordType::A, Some(1232)), &t);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 60);
        assert_eq!(m.edns.as_ref().unwrap().max_payload(), 1232);
        let (_, m) = check(&query("big.", RecordType::A, Some(600)), &t);
        assert!(m.metadata.truncation && m.edns.is_some());
        let mut out = Vec::new();
        answer(
            &query("big.", RecordType::A, None),
            &t,
            0,
            Transport::Tcp,
            &mut out,
        );
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 60);
    }

    #[test]
    fn malformed_queries_get_formerr_notimp_or_are_dropped() {
        let t = table();
        let mut out = Vec::new();
        let good = query("api.", RecordType::A, None);
        assert_eq!(
            answer(&good[..11], &t, 0, Transport::Udp, &mut out),
            Outcome::Drop
        );
        let mut qr = good.clone();
        qr[2] |= 0x80;
        assert_eq!(answer(&qr, &t, 0, Transport::Udp, &mut out), Outcome::Drop);
        let rcode = |q: &[u8], out: &mut Vec<u8>| match answer(q, &t, 0, Transport::Udp, out) {
            Outcome::Answered { rcode, .. } => rcode,
            o => panic!("{o:?}"),
        };
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        assert_eq!(rcode(&notify, &mut out), 4);
        let mut qd0 = good.clone();
        qd0[5] = 0;
        assert_eq!(rcode(&qd0, &mut out), 1);
        let mut loop_ = good[..12].to_vec();
        loop_.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(rcode(&loop_, &mut out), 1);
        let mut badlen = good[..12].to_vec();
        badlen.extend_from_slice(&[0x3F, b'a', 0, 0, 1, 0, 1]);
        assert_eq!(rcode(&badlen, &mut out), 1);
        let mut v1 = query("api.", RecordType::A, Some(1232));
        let n = v1.len();
        v1[n - 5] = 1; // OPT version
        let (_, m) = check(&v1, &t);
        assert_eq!(u16::from(m.metadata.response_code), RCODE_BADVERS);
    }

    /// Valid queries to mutate: local names, reverse names, forwarded
    /// names, with and without EDNS, over both transports.
    fn seeds() -> Vec<Vec<u8>> {
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        let mut seeds = Vec::new();
        for name in [
            "api.",
            "big.",
            "big.glued.internal.",
            "api.node-a.glued.internal.",
            "glued.internal.",
            "nope.glued.internal.",
            "3.0.0.10.in-addr.arpa.",
            v6,
            "example.com.",
            ".",
        ] {
            for rtype in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::ANY,
                RecordType::PTR,
            ] {
                for edns in [None, Some(0), Some(512), Some(1232), Some(65535)] {
                    seeds.push(query(name, rtype, edns));
                }
            }
        }
        seeds
    }

    /// Tens of thousands of random and mutated queries: no panic, no
    /// allocation, and every answer within its transport's limit, with the
    /// client's id, QR=1, and TC=1 when records were left out.
    #[test]
    fn random_and_mutated_queries_never_panic_or_exceed_the_limit() {
        let mut t = table();
        let mut groups = (*t.groups).clone();
        groups.insert(
            (
                Origin {
                    id: "a".into(),
                    node_name: "a".into(),
                },
                Source::Static { name: "big".into() },
            ),
            Group {
                names: vec!["big".into()],
                v4: (0..=255).map(|i| Ipv4Addr::new(10, 2, 0, i)).collect(),
                v6: (0..100)
                    .map(|i| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
                    .collect(),
            },
        );
        t = Table::build("glued.internal", 5, 9, Arc::new(groups));
        let seeds = seeds();
        let mut rng = fastrand::Rng::with_seed(0x5EED_D115);
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        let capacity = out.capacity();
        let mut q = Vec::with_capacity(MAX_MESSAGE_LEN);
        // Drops, forwards, answers, truncated answers: all must occur.
        let mut seen = [0usize; 4];
        for round in 0..60_000 {
            q.clear();
            if round % 4 == 0 {
                let n = rng.usize(..600);
                q.extend((0..n).map(|_| rng.u8(..)));
                if q.len() >= HEADER_LEN && rng.bool() {
                    q[2] &= 0x7F; // a query, not a response
                    q[4..6].copy_from_slice(&[0, 1]);
                }
            } else {
                q.extend_from_slice(&seeds[rng.usize(..seeds.len())]);
                for _ in 0..rng.usize(1..5) {
                    match rng.u8(..4) {
                        0 if !q.is_empty() => {
                            let at = rng.usize(..q.len());
                            q[at] = rng.u8(..);
                        }
                        1 if !q.is_empty() => q.truncate(rng.usize(..q.len())),
                        2 => q.extend((0..rng.usize(..40)).map(|_| rng.u8(..))),
                        _ if q.len() > 11 => q[11] = rng.u8(..3), // ARCOUNT
                        _ => {}
                    }
                }
            }
            let transport = if rng.bool() {
                Transport::Udp
            } else {
                Transport::Tcp
            };
            let outcome = answer(&q, &t, rng.usize(..), transport, &mut out);
            assert_eq!(out.capacity(), capacity, "answer allocated");
            match outcome {
                Outcome::Drop => {
                    seen[0] += 1;
                    assert!(out.is_empty());
                }
                Outcome::Forward { max_len, .. } => {
                    seen[1] += 1;
                    assert!(out.is_empty());
                    assert!((UDP_PAYLOAD_MIN..=MAX_MESSAGE_LEN).contains(&max_len));
                }
                Outcome::Answered { truncated, .. } => {
                    seen[2 + usize::from(truncated)] += 1;
                    let limit = match transport {
                        Transport::Tcp => MAX_MESSAGE_LEN,
                        Transport::Udp => {
                            let header = Header::new_checked(&q).unwrap();
                            let edns = wire::parse_question(&q)
                                .ok()
                                .and_then(|qn| wire::parse_edns(&q, header, qn.end).ok())
                                .flatten();
                            if edns.is_some() {
                                UDP_PAYLOAD_ADVERTISED as usize
                            } else {
                                UDP_PAYLOAD_MIN
                            }
                        }
                    };
                    assert!(out.len() <= limit, "{} > {limit} for {q:?}", out.len());
                    assert_eq!(out[..2], q[..2], "id");
                    assert!(out[2] & 0x80 != 0, "QR");
                    assert_eq!(truncated, out[2] & 0x02 != 0, "TC");
                    let m = Message::from_vec(&out)
                        .unwrap_or_else(|e| panic!("unparseable answer {out:?} to {q:?}: {e}"));
                    if truncated {
                        assert!(m.answers.is_empty() && m.authorities.is_empty());
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 500), "outcomes {seen:?}");
    }

    #[test]
    fn refused_and_servfail_echo_the_question() {
        let mut out = Vec::new();
        let q = query("api.", RecordType::A, None);
        error_reply(&q, RCODE_REFUSED, &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert_eq!(m.queries.len(), 1);
    }
}
