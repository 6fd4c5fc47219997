//! Answer building: a pure function of (query bytes, table snapshot,
//! [`Context`]) that writes the response into a caller-owned buffer and
//! says what happened.
//!
//! What is answered here (SPEC §3): the domain and every name below it;
//! single labels that are names of the table; special-use names (RFC 6761,
//! RFC 7686: `localhost`, `invalid`, `onion`); reverse names at and above
//! an address of the table; and, refused for every name, zone transfers
//! and CHAOS queries. Everything else (the root, other single labels, the
//! rest of the internet) is forwarded.
//!
//! Invariants: [`answer`] never allocates (the caller's buffer keeps its
//! capacity; [`MAX_MESSAGE_LEN`] is enough), never panics on input, and
//! never writes more than the transport's size limit: what does not fit is
//! replaced by an empty answer with TC=1, and building stops at the first
//! record that does not fit. Every reply to a query that carried an OPT
//! carries one (errors included). RA is set only on replies to QUERY and
//! only when forwarding is configured. A TSIG-signed query is never given a
//! local answer: it gets NOTAUTH with TSIG error BADKEY (RFC 8945).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::table::{Entry, Table, Target};

use super::wire::{
    self, CLASS_ANY, CLASS_CH, CLASS_IN, EDNS_FLAG_DO, Edns, FLAG_AA, FLAG_CD, FLAG_QR, FLAG_RA,
    FLAG_RD, FLAG_TC, HEADER_LEN, Header, MAX_NAME_LEN, Name, OPCODE_QUERY, RCODE_BADVERS,
    RCODE_FORMERR, RCODE_NOERROR, RCODE_NOTAUTH, RCODE_NOTIMP, RCODE_NXDOMAIN, RCODE_REFUSED,
    TSIG_BADKEY, TYPE_A, TYPE_AAAA, TYPE_ANY, TYPE_AXFR, TYPE_IXFR, TYPE_NS, TYPE_OPT, TYPE_PTR,
    TYPE_SOA, TYPE_SRV, TYPE_TSIG, Tsig,
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
/// The key of the apex NS target below the domain (reserved:
/// [`crate::table::RESERVED_NAMES`]).
pub const NS_KEY: &[u8] = b"ns";
/// First label of the SOA RNAME (`hostmaster.<domain>.`).
pub const HOSTMASTER_LABEL: &[u8] = b"\x0ahostmaster";

/// Length of an OPT record with no options.
const OPT_LEN: usize = 11;
/// Compression pointer to the question name.
const QNAME_PTR: [u8; 2] = [0xC0, 0x0C];
/// The reverse zones, lowercase wire format.
const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6_ARPA: &[u8] = b"\x03ip6\x04arpa\x00";
/// Special-use top-level labels (RFC 6761 §6.3, §6.4; RFC 7686).
const LOCALHOST: &[u8] = b"localhost";
const INVALID: &[u8] = b"invalid";
const ONION: &[u8] = b"onion";

/// How the query arrived: decides the size limit of the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Everything about a query that is not in its bytes or the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub transport: Transport,
    /// The address the query was sent to: the answer for `ns.<domain>.`
    /// (IPv4-mapped addresses count as IPv4; unspecified answers nothing).
    pub local: IpAddr,
    /// Picks the first address of multi-address answers; callers bump it
    /// per answer.
    pub rotation: usize,
    /// Forwarding is configured: replies to QUERY set RA.
    pub recursion: bool,
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
pub fn answer(query: &[u8], table: &Table, ctx: &Context, out: &mut Vec<u8>) -> Outcome {
    out.clear();
    let Some(header) = Header::new_checked(query) else {
        return Outcome::Drop;
    };
    if header.is_response() {
        return Outcome::Drop;
    }
    if header.opcode() != OPCODE_QUERY {
        return bare(
            header,
            RCODE_NOTIMP,
            wire::find_edns(query, header),
            false,
            out,
        );
    }
    let ra = ctx.recursion;
    if header.qdcount() != 1 {
        return bare(
            header,
            RCODE_FORMERR,
            wire::find_edns(query, header),
            ra,
            out,
        );
    }
    let Ok(question) = wire::parse_question(query) else {
        return bare(header, RCODE_FORMERR, None, ra, out);
    };
    let Ok(extra) = wire::parse_additional(query, header, question.end) else {
        return bare(header, RCODE_FORMERR, None, ra, out);
    };
    let edns = extra.edns;
    let (qtype, qclass) = (question.qtype, question.qclass);
    let (limit, forward_len) = match (ctx.transport, edns) {
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
        ra,
    );
    if let Some(e) = edns
        && e.version > 0
    {
        return w.finish(RCODE_BADVERS, false, qtype);
    }
    // Refused whatever the name: zone transfers (RFC 5936, RFC 1995) and
    // CHAOS (`version.bind`, `id.server`: nothing to tell).
    if matches!(qtype, TYPE_AXFR | TYPE_IXFR) || qclass == CLASS_CH {
        return w.finish(RCODE_REFUSED, false, qtype);
    }
    let class_ok = qclass == CLASS_IN || qclass == CLASS_ANY;
    let name = &question.name;

    // Special-use names: answered here, never forwarded.
    if let Some(top) = name.labels().last() {
        if top.eq_ignore_ascii_case(LOCALHOST) {
            if !class_ok {
                return w.finish(RCODE_REFUSED, false, qtype);
            }
            if matches!(qtype, TYPE_A | TYPE_ANY) {
                w.rr_qname(TYPE_A, &Ipv4Addr::LOCALHOST.octets());
            }
            if matches!(qtype, TYPE_AAAA | TYPE_ANY) {
                w.rr_qname(TYPE_AAAA, &Ipv6Addr::LOCALHOST.octets());
            }
            return w.finish(RCODE_NOERROR, false, qtype);
        }
        if top.eq_ignore_ascii_case(INVALID) || top.eq_ignore_ascii_case(ONION) {
            return w.finish(RCODE_NXDOMAIN, false, qtype);
        }
    }

    // The zone: the domain and every name below it.
    let below = name
        .labels_below(&table.domain_wire)
        .filter(|_| table.domain_wire.len() > 1);
    let mut key = [0; MAX_NAME_LEN];
    if let Some(k) = below {
        if !class_ok {
            return w.finish(RCODE_REFUSED, false, qtype);
        }
        if let Some(tsig) = extra.tsig {
            return w.tsig_badkey(query, tsig, qtype);
        }
        // Where the domain sits in the question, to point at it.
        let domain_at = Some(HEADER_LEN + name.wire().len() - table.domain_wire.len());
        if k == 0 {
            if matches!(qtype, TYPE_SOA | TYPE_ANY) {
                w.soa(table, Some(HEADER_LEN), false);
            }
            if matches!(qtype, TYPE_NS | TYPE_ANY) {
                w.ns(QNAME_PTR);
            }
            return w.nodata_if_empty(table, domain_at, qtype);
        }
        let Some(len) = name.dotted_key(k, &mut key) else {
            w.soa(table, domain_at, true);
            return w.finish(RCODE_NXDOMAIN, true, qtype);
        };
        let key = &key[..len];
        if key == NS_KEY {
            match ctx.local.to_canonical() {
                IpAddr::V4(ip) if !ip.is_unspecified() && matches!(qtype, TYPE_A | TYPE_ANY) => {
                    w.rr_qname(TYPE_A, &ip.octets());
                }
                IpAddr::V6(ip) if !ip.is_unspecified() && matches!(qtype, TYPE_AAAA | TYPE_ANY) => {
                    w.rr_qname(TYPE_AAAA, &ip.octets());
                }
                _ => {}
            }
            return w.nodata_if_empty(table, domain_at, qtype);
        }
        if let Some(entry) = table.lookup(key) {
            w.addresses(entry, qtype, ctx.rotation);
            w.srv(entry, table, qtype, ctx.rotation);
            return w.nodata_if_empty(table, domain_at, qtype);
        }
        if table.is_node(key) {
            // An empty non-terminal (RFC 8020): it exists, with no data.
            return w.nodata_if_empty(table, domain_at, qtype);
        }
        w.soa(table, domain_at, true);
        return w.finish(RCODE_NXDOMAIN, true, qtype);
    }

    // A single label that is a name of the table; any other goes upstream.
    if name.n_labels() == 1
        && let Some(len) = name.dotted_key(1, &mut key)
        && let Some(entry) = table.lookup(&key[..len])
    {
        if !class_ok {
            return w.finish(RCODE_REFUSED, false, qtype);
        }
        if let Some(tsig) = extra.tsig {
            return w.tsig_badkey(query, tsig, qtype);
        }
        w.addresses(entry, qtype, ctx.rotation);
        return w.nodata_if_empty(table, None, qtype);
    }

    // Reverse names at and above an address of the table.
    if let Some((prefix, bits)) = reverse_prefix(name)
        && table.has_address_in(prefix, bits)
    {
        if !class_ok {
            return w.finish(RCODE_REFUSED, false, qtype);
        }
        if let Some(tsig) = extra.tsig {
            return w.tsig_badkey(query, tsig, qtype);
        }
        if matches!(qtype, TYPE_PTR | TYPE_ANY)
            && let Some(target) = table
                .reverse(&prefix)
                .filter(|_| bits == prefix_width(prefix))
        {
            w.rr_qname_name(TYPE_PTR, target);
        }
        // No SOA: the reverse zone is not ours to describe.
        return w.finish(RCODE_NOERROR, true, qtype);
    }
    w.forward(qtype, forward_len)
}

/// A response to `query` with only `rcode` (and the question and OPT when
/// they parse): REFUSED for clients outside the allowed networks, SERVFAIL
/// when the forwarder is saturated. `recursion`: forwarding is configured
/// (RA). Drops what [`answer`] would drop.
pub fn error_reply(query: &[u8], rcode: u16, recursion: bool, out: &mut Vec<u8>) -> Outcome {
    out.clear();
    let Some(header) = Header::new_checked(query) else {
        return Outcome::Drop;
    };
    if header.is_response() {
        return Outcome::Drop;
    }
    let ra = recursion && header.opcode() == OPCODE_QUERY;
    if header.qdcount() != 1 {
        return bare(header, rcode, wire::find_edns(query, header), ra, out);
    }
    match wire::parse_question(query) {
        Ok(q) => {
            let edns = wire::parse_edns(query, header, q.end).ok().flatten();
            Writer::new(
                out,
                &query[..q.end],
                header,
                MAX_MESSAGE_LEN,
                edns.map(|e| e.dnssec_ok),
                0,
                ra,
            )
            .finish(rcode, false, q.qtype)
        }
        Err(_) => bare(header, rcode, None, ra, out),
    }
}

/// Header-only response (and the client's OPT, if found): the id, opcode
/// and RD of the query, `rcode`.
fn bare(
    header: Header<'_>,
    rcode: u16,
    edns: Option<Edns>,
    ra: bool,
    out: &mut Vec<u8>,
) -> Outcome {
    let mut flags = FLAG_QR | (header.flags() & (0x7800 | FLAG_RD)) | (rcode & 0xF);
    if ra {
        flags |= FLAG_RA;
    }
    out.extend_from_slice(&header.id().to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    if let Some(e) = edns {
        push_opt(out, rcode, e.dnssec_ok);
    }
    Outcome::Answered {
        rcode,
        qtype: None,
        truncated: false,
    }
}

/// Appends our OPT record: advertised payload, the upper bits of `rcode`,
/// the client's DO bit echoed.
fn push_opt(out: &mut Vec<u8>, rcode: u16, dnssec_ok: bool) {
    let ttl = ((rcode >> 4) as u32) << 24 | if dnssec_ok { EDNS_FLAG_DO as u32 } else { 0 };
    let [p0, p1] = UDP_PAYLOAD_ADVERTISED.to_be_bytes();
    let [o0, o1] = TYPE_OPT.to_be_bytes();
    let [l0, l1, l2, l3] = ttl.to_be_bytes();
    out.extend_from_slice(&[0, o0, o1, p0, p1, l0, l1, l2, l3, 0, 0]);
}

fn prefix_width(ip: IpAddr) -> u32 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The address prefix a reverse name stands for, with its length in bits:
/// `c.b.a.in-addr.arpa.` (1 to 4 octets) or nibbles `.ip6.arpa.` (1 to
/// 32).
fn reverse_prefix(name: &Name) -> Option<(IpAddr, u32)> {
    let mut labels = name.labels();
    if let Some(n @ 1..=4) = name.labels_below(IN_ADDR_ARPA) {
        let mut octets = [0u8; 4];
        for i in (0..n).rev() {
            octets[i] = decimal_octet(labels.next()?)?;
        }
        return Some((IpAddr::V4(Ipv4Addr::from(octets)), 8 * n as u32));
    }
    if let Some(n @ 1..=32) = name.labels_below(IP6_ARPA) {
        let mut value: u128 = 0;
        for i in 0..n {
            let &[c] = labels.next()? else { return None };
            let nibble = (c as char).to_digit(16)? as u128;
            value |= nibble << (128 - 4 * (n - i));
        }
        return Some((IpAddr::V6(Ipv6Addr::from(value)), 4 * n as u32));
    }
    None
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
    /// Set RA (forwarding is configured).
    ra: bool,
    ancount: u16,
    nscount: u16,
    /// Additional records besides the OPT.
    arcount: u16,
    truncated: bool,
}

/// `list` with its first `n_local` items (this host's) first, rotated by
/// `rotation` among themselves, then the rest rotated by `rotation`.
fn nearest_first<T>(list: &[T], n_local: u32, rotation: usize) -> impl Iterator<Item = &T> {
    fn rotated<T>(part: &[T], rotation: usize) -> impl Iterator<Item = &T> {
        let (tail, head) = part.split_at(rotation.checked_rem(part.len()).unwrap_or(0));
        head.iter().chain(tail)
    }
    let (local, rest) = list.split_at((n_local as usize).min(list.len()));
    rotated(local, rotation).chain(rotated(rest, rotation))
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
        ra: bool,
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
            ra,
            ancount: 0,
            nscount: 0,
            arcount: 0,
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

    /// An answer record owned by the question name; false when it did not
    /// fit (the answer is truncated: write nothing more).
    #[inline]
    fn rr_qname(&mut self, rtype: u16, rdata: &[u8]) -> bool {
        self.rr_qname_with(rtype, rdata.len(), |out| out.extend_from_slice(rdata))
    }

    /// [`Writer::rr_qname`] with a name as the data.
    fn rr_qname_name(&mut self, rtype: u16, name: Target<'_>) -> bool {
        self.rr_qname_with(rtype, name.wire_len(), |out| name.write_to(out))
    }

    /// [`Writer::rr_qname`] with `len` bytes of data that `write` appends.
    #[inline]
    fn rr_qname_with(&mut self, rtype: u16, len: usize, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        if !self.fits(QNAME_PTR.len() + 10 + len) {
            return false;
        }
        self.out.extend_from_slice(&QNAME_PTR);
        self.out.extend_from_slice(&rr_fields(rtype, self.ttl, len));
        write(self.out);
        self.ancount += 1;
        true
    }

    /// The A and AAAA records of `entry` that `qtype` asks for: in each
    /// list this host's addresses first, then the others, each part
    /// starting at `rotation`; stops at the first that does not fit.
    fn addresses(&mut self, entry: &Entry, qtype: u16, rotation: usize) {
        if matches!(qtype, TYPE_A | TYPE_ANY) {
            for ip in nearest_first(entry.v4(), entry.v4_local(), rotation) {
                if !self.rr_qname(TYPE_A, &ip.octets()) {
                    return;
                }
            }
        }
        if matches!(qtype, TYPE_AAAA | TYPE_ANY) {
            for ip in nearest_first(entry.v6(), entry.v6_local(), rotation) {
                if !self.rr_qname(TYPE_AAAA, &ip.octets()) {
                    return;
                }
            }
        }
    }

    /// The SRV records of `entry` when `qtype` asks for them, this host's
    /// first, each part starting at `rotation` like addresses (clients
    /// take the first of equal-weight records: RFC 2782 with weight 0),
    /// then the targets' A and AAAA records in the additional section, in
    /// the same order, as many as fit (additional data may be left out
    /// without TC).
    fn srv(&mut self, entry: &Entry, table: &Table, qtype: u16, rotation: usize) {
        if !matches!(qtype, TYPE_SRV | TYPE_ANY) || entry.srv().is_empty() {
            return;
        }
        let order = || nearest_first(entry.srv(), entry.srv_local(), rotation);
        for srv in order() {
            let [p0, p1] = srv.port.to_be_bytes();
            let rdlen = 6 + srv.target.len();
            if !self.fits(QNAME_PTR.len() + 10 + rdlen) {
                return;
            }
            self.out.extend_from_slice(&QNAME_PTR);
            self.out
                .extend_from_slice(&rr_fields(TYPE_SRV, self.ttl, rdlen));
            // Priority 0, weight 0, port; the target is never compressed.
            self.out.extend_from_slice(&[0, 0, 0, 0, p0, p1]);
            self.out.extend_from_slice(&srv.target);
            self.ancount += 1;
        }
        for (i, srv) in order().enumerate() {
            if order().take(i).any(|s| s.target_key == srv.target_key) {
                continue;
            }
            let Some(target) = table.lookup(&srv.target_key) else {
                continue;
            };
            for ip in target.v4().iter() {
                if !self.additional(&srv.target, TYPE_A, &ip.octets()) {
                    return;
                }
            }
            for ip in target.v6().iter() {
                if !self.additional(&srv.target, TYPE_AAAA, &ip.octets()) {
                    return;
                }
            }
        }
    }

    /// One record in the additional section, owned by `owner` (wire
    /// format); false, and nothing written, when it does not fit.
    fn additional(&mut self, owner: &[u8], rtype: u16, rdata: &[u8]) -> bool {
        if self.truncated || self.out.len() + owner.len() + 10 + rdata.len() > self.room {
            return false;
        }
        self.out.extend_from_slice(owner);
        self.out
            .extend_from_slice(&rr_fields(rtype, self.ttl, rdata.len()));
        self.out.extend_from_slice(rdata);
        self.arcount += 1;
        true
    }

    /// Finishes an authoritative NOERROR answer; with no record written,
    /// NODATA: the zone's SOA in the authority section (`domain_at`: where
    /// the domain already is in the message).
    fn nodata_if_empty(mut self, table: &Table, domain_at: Option<usize>, qtype: u16) -> Outcome {
        if self.ancount == 0 && !self.truncated {
            self.soa(table, domain_at, true);
        }
        self.finish(RCODE_NOERROR, true, qtype)
    }

    /// NOTAUTH to a TSIG-signed query (we hold no key), unsigned, with the
    /// query's TSIG echoed with error BADKEY (RFC 8945 §5.2.1, §5.3.2) when
    /// it fits and can be echoed.
    fn tsig_badkey(mut self, query: &[u8], tsig: Tsig, qtype: u16) -> Outcome {
        let limit = self.room + if self.opt.is_some() { OPT_LEN } else { 0 };
        let outcome = self.close(RCODE_NOTAUTH, false, qtype);
        append_tsig_error(self.out, query, tsig, limit);
        outcome
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
        self.close(rcode, authoritative, qtype)
    }

    fn close(&mut self, rcode: u16, authoritative: bool, qtype: u16) -> Outcome {
        if self.truncated {
            self.out.truncate(self.qend);
            self.ancount = 0;
            self.nscount = 0;
            self.arcount = 0;
        }
        let q = self.query_flags;
        let mut flags = FLAG_QR | (q & (0x7800 | FLAG_RD | FLAG_CD)) | (rcode & 0xF);
        if self.ra {
            flags |= FLAG_RA;
        }
        if authoritative {
            flags |= FLAG_AA;
        }
        if self.truncated {
            flags |= FLAG_TC;
        }
        let [f0, f1] = flags.to_be_bytes();
        let [a0, a1] = self.ancount.to_be_bytes();
        let [n0, n1] = self.nscount.to_be_bytes();
        let [r0, r1] = (self.arcount + u16::from(self.opt.is_some())).to_be_bytes();
        // Everything after the id: flags, QDCOUNT = 1 and the counts.
        self.out[2..HEADER_LEN].copy_from_slice(&[f0, f1, 0, 1, a0, a1, n0, n1, r0, r1]);
        if let Some(dnssec_ok) = self.opt {
            push_opt(self.out, rcode, dnssec_ok);
        }
        Outcome::Answered {
            rcode,
            qtype: Some(qtype),
            truncated: self.truncated,
        }
    }
}

/// Appends to a finished reply the TSIG record of an unsigned error with
/// TSIG error BADKEY (RFC 8945 §5.3.2): the query's key name, algorithm,
/// time signed, fudge and original id, no MAC. Nothing when it would pass
/// `limit` or the query's TSIG is compressed or malformed.
fn append_tsig_error(out: &mut Vec<u8>, query: &[u8], tsig: Tsig, limit: usize) {
    let Some(owner_end) = wire::uncompressed_name_end(query, tsig.owner) else {
        return;
    };
    let Some(algorithm_end) = wire::uncompressed_name_end(query, tsig.rdata) else {
        return;
    };
    // Time signed (6), fudge (2), MAC size (2), MAC, original id (2),
    // error (2), other length (2).
    let rdata = query.get(tsig.rdata..tsig.end).unwrap_or_default();
    let fixed = algorithm_end - tsig.rdata;
    let Some(mac_len) = rdata.get(fixed + 8..fixed + 10) else {
        return;
    };
    let mac_len = u16::from_be_bytes([mac_len[0], mac_len[1]]) as usize;
    let Some(original_id) = rdata.get(fixed + 10 + mac_len..fixed + 12 + mac_len) else {
        return;
    };
    let rdlen = fixed + 8 + 2 + 2 + 2 + 2;
    let owner = &query[tsig.owner..owner_end];
    if owner_end > tsig.rdata || out.len() + owner.len() + 10 + rdlen > limit {
        return;
    }
    out.extend_from_slice(owner);
    let [t0, t1] = TYPE_TSIG.to_be_bytes();
    let [c0, c1] = CLASS_ANY.to_be_bytes();
    let [r0, r1] = (rdlen as u16).to_be_bytes();
    out.extend_from_slice(&[t0, t1, c0, c1, 0, 0, 0, 0, r0, r1]);
    out.extend_from_slice(&rdata[..fixed + 8]);
    let [e0, e1] = TSIG_BADKEY.to_be_bytes();
    out.extend_from_slice(&[0, 0, original_id[0], original_id[1], e0, e1, 0, 0]);
    let arcount = u16::from_be_bytes([out[10], out[11]]) + 1;
    out[10..12].copy_from_slice(&arcount.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name as HName, RData, RecordType};

    use super::*;
    use crate::table::{Group, Health, Origin, Scope, Source};
    use smallvec::smallvec;

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
                    names: smallvec![name.into()],
                    v4: v4.iter().map(|a| a.parse().unwrap()).collect(),
                    v6: v6.iter().map(|a| a.parse().unwrap()).collect(),
                    ..Default::default()
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

    /// A UDP query that arrived at 192.0.2.53, forwarding configured.
    fn udp(rotation: usize) -> Context {
        Context {
            transport: Transport::Udp,
            local: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)),
            rotation,
            recursion: true,
        }
    }

    /// Answers `q` over UDP and parses the response.
    fn check(q: &[u8], t: &Table) -> (Outcome, Message) {
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        let outcome = answer(q, t, &udp(0), &mut out);
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

    /// Containers of two Compose projects on two nodes; node `a` is this
    /// host. (node, project, service, health, address, srv label)
    fn scoped_table(containers: &[(&str, &str, &str, Health, &str, &str)]) -> Table {
        let mut groups = BTreeMap::new();
        for (i, (node, project, service, health, ip, srv)) in containers.iter().enumerate() {
            let scope = (!project.is_empty()).then(|| Scope {
                project: (*project).into(),
                service: (*service).into(),
            });
            let name = if project.is_empty() {
                (*service).to_string()
            } else {
                format!("{project}-{service}-{i}")
            };
            groups.insert(
                (
                    Origin {
                        id: (*node).into(),
                        node_name: format!("node-{node}").into(),
                    },
                    Source::Container {
                        id: format!("c{i}").into(),
                        network: "net".into(),
                    },
                ),
                Group {
                    names: smallvec![name.into(), (*service).into()],
                    v4: smallvec![ip.parse().unwrap()],
                    scope: scope.map(Box::new),
                    health: *health,
                    srv: srv.split(',').filter_map(crate::table::parse_srv).collect(),
                    ..Default::default()
                },
            );
        }
        Table::build_for("glued.internal", 5, 7, Arc::new(groups), "a")
    }

    fn a_of(t: &Table, name: &str, rotation: usize) -> Vec<String> {
        let (_, out) = outcome(&query(name, RecordType::A, None), t, &udp(rotation));
        addrs(&Message::from_vec(&out).unwrap())
    }

    #[test]
    fn compose_scopes_answer_their_own_project_and_the_project_is_an_ent() {
        use Health::None as N;
        let t = scoped_table(&[
            ("a", "p1", "db", N, "10.0.1.1", ""),
            ("b", "p2", "db", N, "10.0.2.1", ""),
        ]);
        assert_eq!(a_of(&t, "db.p1.glued.internal.", 0), ["10.0.1.1"]);
        assert_eq!(a_of(&t, "DB.P2.glued.internal.", 0), ["10.0.2.1"]);
        assert_eq!(a_of(&t, "db.p2.node-b.glued.internal.", 0), ["10.0.2.1"]);
        let mut both = a_of(&t, "db.", 0);
        both.sort();
        assert_eq!(both, ["10.0.1.1", "10.0.2.1"]);
        assert_eq!(a_of(&t, "db.glued.internal.", 0).len(), 2);
        for ent in ["p1.glued.internal.", "p2.node-b.glued.internal."] {
            let (o, m) = check(&query(ent, RecordType::A, None), &t);
            assert!(matches!(o, Outcome::Answered { rcode: 0, .. }), "{ent}");
            assert!(m.answers.is_empty() && m.authorities.len() == 1, "{ent}");
        }
        for nx in ["db.p3.glued.internal.", "db.p2.node-a.glued.internal."] {
            let (o, _) = check(&query(nx, RecordType::A, None), &t);
            assert!(matches!(o, Outcome::Answered { rcode: 3, .. }), "{nx}");
        }
        // `db` is published by two projects: a conflict; the scoped names
        // are not.
        assert_eq!(t.conflicts.iter().collect::<Vec<_>>(), ["db"]);
    }

    #[test]
    fn static_and_container_holders_of_a_name_conflict() {
        let mut groups = scoped_table(&[("a", "", "db", Health::None, "10.0.1.1", "")])
            .groups
            .iter()
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect::<BTreeMap<_, _>>();
        assert!(
            Table::build("d", 5, 1, Arc::new(groups.clone()))
                .conflicts
                .is_empty()
        );
        groups.insert(
            (
                Origin {
                    id: "b".into(),
                    node_name: "node-b".into(),
                },
                Source::Static { name: "db".into() },
            ),
            Group {
                names: smallvec!["db".into()],
                v4: smallvec!["10.0.9.9".parse().unwrap()],
                ..Default::default()
            },
        );
        let t = Table::build("d", 5, 1, Arc::new(groups));
        assert_eq!(t.conflicts.iter().collect::<Vec<_>>(), ["db"]);
    }

    #[test]
    fn unhealthy_and_starting_holders_are_left_out_unless_none_is_good() {
        use Health::{Healthy, Starting, Unhealthy};
        let t = scoped_table(&[
            ("a", "p", "web", Unhealthy, "10.0.0.1", ""),
            ("b", "p", "web", Healthy, "10.0.0.2", ""),
            ("b", "p", "web", Starting, "10.0.0.3", ""),
        ]);
        for rotation in 0..3 {
            assert_eq!(a_of(&t, "web.glued.internal.", rotation), ["10.0.0.2"]);
            assert_eq!(a_of(&t, "web.p.glued.internal.", rotation), ["10.0.0.2"]);
        }
        // Pinned to node a: its only holder is unhealthy, answered anyway.
        assert_eq!(a_of(&t, "web.node-a.glued.internal.", 0), ["10.0.0.1"]);
        // A holder without a health check counts as good.
        let t = scoped_table(&[
            ("a", "p", "web", Unhealthy, "10.0.0.1", ""),
            ("b", "p", "web", Health::None, "10.0.0.2", ""),
        ]);
        assert_eq!(a_of(&t, "web.", 0), ["10.0.0.2"]);
        // Fail open: no good holder, every holder answered.
        let t = scoped_table(&[
            ("a", "p", "web", Unhealthy, "10.0.0.1", ""),
            ("b", "p", "web", Starting, "10.0.0.2", ""),
        ]);
        let mut all = a_of(&t, "web.", 0);
        all.sort();
        assert_eq!(all, ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn this_hosts_holders_come_first_each_part_rotated() {
        use Health::None as N;
        let t = scoped_table(&[
            ("a", "", "web", N, "10.0.0.1", ""),
            ("b", "", "web", N, "10.0.0.2", ""),
            ("a", "", "web", N, "10.0.0.3", ""),
            ("c", "", "web", N, "10.0.0.4", ""),
            ("b", "", "web", N, "10.0.0.5", ""),
        ]);
        let mut firsts = std::collections::BTreeSet::new();
        let mut thirds = std::collections::BTreeSet::new();
        for rotation in 0..12 {
            let got = a_of(&t, "web.glued.internal.", rotation);
            assert_eq!(got.len(), 5);
            let mut local = got[..2].to_vec();
            local.sort();
            assert_eq!(local, ["10.0.0.1", "10.0.0.3"], "rotation {rotation}");
            firsts.insert(got[0].clone());
            thirds.insert(got[2].clone());
        }
        assert_eq!(firsts.len(), 2, "local part rotates");
        assert_eq!(thirds.len(), 3, "remote part rotates");
        // Without a local holder, plain rotation.
        let t = Table::build("glued.internal", 5, 7, t.groups.clone());
        let firsts: std::collections::BTreeSet<_> =
            (0..10).map(|r| a_of(&t, "web.", r)[0].clone()).collect();
        assert_eq!(firsts.len(), 5);
    }

    /// SRV targets of `name` in answer order, and the owner of the first
    /// additional record.
    fn srv_of(t: &Table, name: &str, rotation: usize) -> (Vec<String>, String) {
        let q = query(name, RecordType::SRV, Some(1232));
        let (_, out) = outcome(&q, t, &udp(rotation));
        let m = Message::from_vec(&out).unwrap();
        let targets = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        let first_extra = m.additionals.first().map(|r| r.name.to_string());
        (targets, first_extra.unwrap_or_default())
    }

    /// Clients take the first of equal-weight SRV records (RFC 2782 with
    /// weight 0; Go's resolver does not even shuffle them): a fixed order
    /// sent every client to one holder. SRV records are ordered like
    /// addresses: this host's first, each part rotated.
    #[test]
    fn srv_records_come_this_hosts_first_each_part_rotated() {
        use Health::None as N;
        let t = scoped_table(&[
            ("a", "p", "web", N, "10.0.0.1", "http=8080"),
            ("b", "p", "web", N, "10.0.0.2", "http=8080"),
            ("c", "p", "web", N, "10.0.0.3", "http=8080"),
            ("a", "p", "web", N, "10.0.0.4", "http=8080"),
        ]);
        let local = [
            "p-web-0.node-a.glued.internal.",
            "p-web-3.node-a.glued.internal.",
        ];
        let (mut firsts, mut thirds) = (BTreeSet::new(), BTreeSet::new());
        for rotation in 0..12 {
            let (got, extra) = srv_of(&t, "_http._tcp.web.glued.internal.", rotation);
            assert_eq!(got.len(), 4, "rotation {rotation}");
            let mut head = got[..2].to_vec();
            head.sort();
            assert_eq!(head, local, "rotation {rotation}");
            // The first target's address leads the additional section.
            assert_eq!(extra, got[0], "rotation {rotation}");
            firsts.insert(got[0].clone());
            thirds.insert(got[2].clone());
        }
        assert_eq!(firsts.len(), 2, "local part rotates");
        assert_eq!(thirds.len(), 2, "remote part rotates");
        // Without a local holder, plain rotation over every target.
        let t = Table::build("glued.internal", 5, 7, t.groups.clone());
        let firsts: BTreeSet<_> = (0..12)
            .map(|r| srv_of(&t, "_http._tcp.web.glued.internal.", r).0[0].clone())
            .collect();
        assert_eq!(firsts.len(), 4);
    }

    /// Many SRV holders: over UDP without EDNS the answer does not fit
    /// (TC, nothing but the question); with EDNS the SRV records fit and
    /// the additional addresses stop where the room ends, without TC, the
    /// OPT last and counted; over TCP everything.
    #[test]
    fn many_srv_records_truncate_or_drop_additional_data_as_they_must() {
        let holders: Vec<(String, String)> = (0..15)
            .map(|i| (["a", "b", "c"][i % 3].to_string(), format!("10.0.2.{i}")))
            .collect();
        let containers: Vec<_> = holders
            .iter()
            .map(|(node, ip)| {
                (
                    node.as_str(),
                    "p",
                    "web",
                    Health::None,
                    ip.as_str(),
                    "http=80",
                )
            })
            .collect();
        let t = scoped_table(&containers);
        let name = "_HTTP._tcp.web.glued.internal.";
        let (o, out) = outcome(&query(name, RecordType::SRV, None), &t, &udp(3));
        assert!(
            matches!(
                o,
                Outcome::Answered {
                    truncated: true,
                    ..
                }
            ),
            "{o:?}"
        );
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty() && m.additionals.is_empty());
        assert!(out.len() <= 512);

        let (o, out) = outcome(&query(name, RecordType::SRV, Some(1232)), &t, &udp(3));
        assert!(
            matches!(
                o,
                Outcome::Answered {
                    truncated: false,
                    rcode: 0,
                    ..
                }
            ),
            "{o:?}"
        );
        assert!(out.len() <= 1232, "{}", out.len());
        let m = Message::from_vec(&out).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 15);
        assert!(m.answers.iter().all(|r| r.name.to_string() == name));
        assert!(
            !m.additionals.is_empty() && m.additionals.len() < 15,
            "{}",
            m.additionals.len()
        );
        assert!(m.edns.is_some());
        // The OPT is the last record, counted in ARCOUNT.
        let arcount = u16::from_be_bytes([out[10], out[11]]) as usize;
        assert_eq!(arcount, m.additionals.len() + 1);
        assert_eq!(&out[out.len() - 11..out.len() - 8], &[0, 0, 41]);
        // Every additional record is the address of an answered target.
        let targets: BTreeSet<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(
            m.additionals
                .iter()
                .all(|r| targets.contains(&r.name.to_string()))
        );

        let tcp = Context {
            transport: Transport::Tcp,
            ..udp(3)
        };
        let (_, out) = outcome(&query(name, RecordType::SRV, None), &t, &tcp);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!((m.answers.len(), m.additionals.len()), (15, 15));
    }

    /// Under a long domain, a long container name on a long node name
    /// makes an SRV target longer than 255 bytes: that record is left out
    /// (the answer stays a valid message), the others are answered.
    #[test]
    fn srv_targets_longer_than_a_dns_name_are_left_out() {
        let domain = format!("{}.{}.{}", "d".repeat(63), "e".repeat(63), "f".repeat(40));
        let long = "n".repeat(60);
        let mut groups = BTreeMap::new();
        for (node, name, ip) in [
            (long.as_str(), long.as_str(), "10.0.3.1"),
            ("b", "short", "10.0.3.2"),
        ] {
            groups.insert(
                (
                    Origin {
                        id: node.into(),
                        node_name: node.into(),
                    },
                    Source::Container {
                        id: name.into(),
                        network: "net".into(),
                    },
                ),
                Group {
                    names: smallvec![name.into(), "web".into()],
                    v4: smallvec![ip.parse().unwrap()],
                    srv: crate::table::parse_srv("http=80").into_iter().collect(),
                    ..Default::default()
                },
            );
        }
        let t = Table::build_for(&domain, 5, 1, Arc::new(groups), "b");
        let name = format!("_http._tcp.web.{domain}.");
        let (o, out) = outcome(&query(&name, RecordType::SRV, Some(1232)), &t, &udp(0));
        assert!(matches!(o, Outcome::Answered { rcode: 0, .. }), "{o:?}");
        let m = Message::from_vec(&out).expect("a valid message");
        let targets: Vec<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(targets, [format!("short.b.{domain}.")]);
        // Alone, the long one's SRV name is NODATA.
        let name = format!("_http._tcp.web.{long}.{domain}.");
        let (o, out) = outcome(&query(&name, RecordType::SRV, None), &t, &udp(0));
        assert!(matches!(o, Outcome::Answered { rcode: 0, .. }), "{o:?}");
        assert!(Message::from_vec(&out).unwrap().answers.is_empty());
    }

    #[test]
    fn srv_names_answer_srv_with_the_targets_addresses_and_nodata_otherwise() {
        use Health::{Healthy, Unhealthy};
        let t = scoped_table(&[
            ("a", "p", "web", Healthy, "10.0.0.1", "http=8080,dns=53/udp"),
            ("b", "p", "web", Unhealthy, "10.0.0.2", "http=8080"),
            ("b", "p", "api", Health::None, "10.0.0.3", "http=9000"),
        ]);
        let q = query(
            "_http._tcp.web.glued.internal.",
            RecordType::SRV,
            Some(1232),
        );
        let (o, out) = outcome(&q, &t, &udp(0));
        assert!(matches!(
            o,
            Outcome::Answered {
                rcode: 0,
                truncated: false,
                ..
            }
        ));
        let m = Message::from_vec(&out).unwrap();
        let srv: Vec<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => format!("{} {} {} {}", s.priority, s.weight, s.port, s.target),
                other => format!("{other:?}"),
            })
            .collect();
        // The unhealthy holder is left out, like in A answers.
        assert_eq!(srv, ["0 0 8080 p-web-0.node-a.glued.internal."]);
        let extra: Vec<String> = m
            .additionals
            .iter()
            .map(|r| format!("{} {:?}", r.name, r.data))
            .collect();
        assert_eq!(extra.len(), 1, "{extra:?}");
        assert!(
            extra[0].starts_with("p-web-0.node-a.glued.internal. A(A(10.0.0.1))"),
            "{extra:?}"
        );
        assert!(m.edns.is_some());
        // Pinned, scoped and udp names.
        for (name, want) in [
            ("_http._tcp.api.node-b.glued.internal.", 1),
            ("_http._tcp.web.p.glued.internal.", 1),
            ("_dns._udp.web.glued.internal.", 1),
            ("_dns._tcp.web.glued.internal.", 0),
        ] {
            let (o, m) = check(&query(name, RecordType::SRV, None), &t);
            let rcode = if want == 0 { 3 } else { 0 };
            assert!(
                matches!(o, Outcome::Answered { rcode: r, .. } if r == rcode),
                "{name}: {o:?}"
            );
            assert_eq!(m.answers.len(), want, "{name}");
        }
        // Other types at an SRV name: NODATA; `_tcp.web` is an ENT.
        for (name, rtype) in [
            ("_http._tcp.web.glued.internal.", RecordType::A),
            ("_http._tcp.web.glued.internal.", RecordType::TXT),
            ("_tcp.web.glued.internal.", RecordType::SRV),
        ] {
            let (o, m) = check(&query(name, rtype, None), &t);
            assert!(
                matches!(o, Outcome::Answered { rcode: 0, .. }),
                "{name} {rtype}"
            );
            assert!(
                m.answers.is_empty() && m.authorities.len() == 1,
                "{name} {rtype}"
            );
        }
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
        for name in ["nope.glued.internal.", "a.b.glued.internal."] {
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
            let o = answer(&query(name, rtype, None), &t, &udp(0), &mut out);
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
            answer(&q, &t, &udp(r), &mut out);
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
                names: smallvec!["big".into()],
                v4: (0..60)
                    .map(|i| std::net::Ipv4Addr::new(10, 1, 0, i))
                    .collect(),
                v6: smallvec![],
                ..Default::default()
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
        let tcp = Context {
            transport: Transport::Tcp,
            ..udp(0)
        };
        answer(&query("big.", RecordType::A, None), &t, &tcp, &mut out);
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 60);
    }

    #[test]
    fn malformed_queries_get_formerr_notimp_or_are_dropped() {
        let t = table();
        let mut out = Vec::new();
        let good = query("api.", RecordType::A, None);
        assert_eq!(answer(&good[..11], &t, &udp(0), &mut out), Outcome::Drop);
        let mut qr = good.clone();
        qr[2] |= 0x80;
        assert_eq!(answer(&qr, &t, &udp(0), &mut out), Outcome::Drop);
        let rcode = |q: &[u8], out: &mut Vec<u8>| match answer(q, &t, &udp(0), out) {
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
        let mut groups: BTreeMap<_, _> = t
            .groups
            .iter()
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect();
        groups.insert(
            (
                Origin {
                    id: "a".into(),
                    node_name: "a".into(),
                },
                Source::Static { name: "big".into() },
            ),
            Group {
                names: smallvec!["big".into()],
                v4: (0..=255).map(|i| Ipv4Addr::new(10, 2, 0, i)).collect(),
                v6: (0..100)
                    .map(|i| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
                    .collect(),
                ..Default::default()
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
            let context = Context {
                transport,
                rotation: rng.usize(..),
                ..udp(0)
            };
            let outcome = answer(&q, &t, &context, &mut out);
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

    /// `query` with `class` instead of IN.
    fn with_class(mut q: Vec<u8>, class: u16) -> Vec<u8> {
        let end = wire::parse_question(&q).unwrap().end;
        q[end - 2..end].copy_from_slice(&class.to_be_bytes());
        q
    }

    fn outcome(q: &[u8], t: &Table, ctx: &Context) -> (Outcome, Vec<u8>) {
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        (answer(q, t, ctx, &mut out), out)
    }

    fn is_forward(o: Outcome) -> bool {
        matches!(o, Outcome::Forward { .. })
    }

    #[test]
    fn single_labels_that_are_not_names_are_forwarded() {
        let t = table();
        for (name, rtype) in [
            ("com.", RecordType::DS),
            ("org.", RecordType::DNSKEY),
            ("internal.", RecordType::SOA),
            ("foo.", RecordType::A),
        ] {
            let (o, _) = outcome(&query(name, rtype, None), &t, &udp(0));
            assert!(is_forward(o), "{name} {rtype}: {o:?}");
        }
        let (o, m) = check(&query("api.", RecordType::DS, None), &t);
        assert!(matches!(o, Outcome::Answered { rcode: 0, .. }));
        assert!(m.answers.is_empty() && m.metadata.authoritative);
    }

    #[test]
    fn special_use_names_are_answered_here() {
        let t = table();
        let (_, m) = check(&query("localhost.", RecordType::A, None), &t);
        assert_eq!(addrs(&m), ["127.0.0.1"]);
        let (_, m) = check(&query("db.LocalHost.", RecordType::ANY, None), &t);
        assert_eq!(addrs(&m), ["127.0.0.1", "::1"]);
        let (_, m) = check(&query("localhost.", RecordType::MX, None), &t);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        for name in ["x.invalid.", "invalid.", "a.b.onion.", "onion."] {
            let (o, m) = check(&query(name, RecordType::A, None), &t);
            assert!(matches!(o, Outcome::Answered { rcode: 3, .. }), "{name}");
            assert!(!m.metadata.authoritative);
        }
        for name in ["version.bind.", "id.server."] {
            let q = with_class(query(name, RecordType::TXT, None), 3);
            let (o, _) = outcome(&q, &t, &udp(0));
            assert!(matches!(o, Outcome::Answered { rcode: 5, .. }), "{name}");
        }
    }

    #[test]
    fn node_names_are_empty_non_terminals() {
        let t = table();
        let (o, m) = check(&query("Node-A.glued.internal.", RecordType::A, None), &t);
        assert!(matches!(o, Outcome::Answered { rcode: 0, .. }));
        assert!(m.answers.is_empty() && m.authorities.len() == 1);
        let (o, _) = check(&query("node-c.glued.internal.", RecordType::A, None), &t);
        assert!(matches!(o, Outcome::Answered { rcode: 3, .. }));
        let (o, _) = check(&query("x.node-a.glued.internal.", RecordType::A, None), &t);
        assert!(matches!(o, Outcome::Answered { rcode: 3, .. }));
    }

    #[test]
    fn the_ns_target_is_the_address_the_query_arrived_on() {
        let t = table();
        let (_, m) = check(&query("ns.glued.internal.", RecordType::A, None), &t);
        assert_eq!(addrs(&m), ["192.0.2.53"]);
        let (_, m) = check(&query("ns.glued.internal.", RecordType::AAAA, None), &t);
        assert!(m.answers.is_empty() && m.authorities.len() == 1);
        let v6 = Context {
            local: "::ffff:10.1.2.3".parse().unwrap(),
            ..udp(0)
        };
        let (_, out) = outcome(&query("NS.glued.internal.", RecordType::A, None), &t, &v6);
        assert_eq!(addrs(&Message::from_vec(&out).unwrap()), ["10.1.2.3"]);
        assert!(!crate::table::is_valid_name("ns") && crate::table::is_valid_label("ns"));
    }

    #[test]
    fn every_type_at_and_above_a_known_reverse_name_is_local() {
        let t = table();
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        for (name, rtype) in [
            ("3.0.0.10.in-addr.arpa.", RecordType::TXT),
            ("0.0.10.in-addr.arpa.", RecordType::PTR),
            ("10.in-addr.arpa.", RecordType::NS),
            (v6, RecordType::TXT),
            (&v6[2..], RecordType::PTR),
            ("d.f.ip6.arpa.", RecordType::SOA),
        ] {
            let (o, m) = check(&query(name, rtype, None), &t);
            assert!(matches!(o, Outcome::Answered { rcode: 0, .. }), "{name}");
            assert!(m.answers.is_empty() && m.metadata.authoritative, "{name}");
        }
        for name in [
            "4.0.0.10.in-addr.arpa.",
            "1.0.10.in-addr.arpa.",
            "11.in-addr.arpa.",
            "in-addr.arpa.",
            "x.3.0.0.10.in-addr.arpa.",
            "e.f.ip6.arpa.",
        ] {
            let (o, _) = outcome(&query(name, RecordType::PTR, None), &t, &udp(0));
            assert!(is_forward(o), "{name}: {o:?}");
        }
        let (_, m) = check(&query("3.0.0.10.in-addr.arpa.", RecordType::ANY, None), &t);
        assert_eq!(addrs(&m), ["web.glued.internal."]);
    }

    #[test]
    fn every_error_reply_to_a_query_with_opt_carries_one() {
        let t = table();
        let mut notify = query("api.", RecordType::A, Some(1232));
        notify[2] |= 4 << 3;
        let mut qd2 = query("api.", RecordType::A, Some(1232));
        let end = wire::parse_question(&qd2).unwrap().end;
        qd2.splice(end..end, *b"\x03web\x00\x00\x01\x00\x01");
        qd2[5] = 2;
        let edns = |out: &[u8]| Message::from_vec(out).ok().and_then(|m| m.edns.clone());
        let (o, out) = outcome(&notify, &t, &udp(0));
        assert!(matches!(o, Outcome::Answered { rcode: 4, .. }));
        assert!(edns(&out).is_some(), "NOTIMP");
        // Two questions cannot be parsed as a message; look at ARCOUNT.
        let (o, out) = outcome(&qd2, &t, &udp(0));
        assert!(matches!(o, Outcome::Answered { rcode: 1, .. }));
        assert_eq!(out[11], 1, "FORMERR without OPT");
        let axfr = query("example.com.", RecordType::AXFR, Some(1232));
        let (o, out) = outcome(&axfr, &t, &udp(0));
        assert!(matches!(o, Outcome::Answered { rcode: 5, .. }));
        assert!(edns(&out).is_some(), "REFUSED");
        let mut out = Vec::new();
        error_reply(&query("api.", RecordType::A, Some(1232)), 2, true, &mut out);
        assert!(edns(&out).is_some(), "SERVFAIL");
    }

    #[test]
    fn ra_only_on_query_replies_when_forwarding() {
        let t = table();
        let q = query("api.", RecordType::A, None);
        let (_, out) = outcome(&q, &t, &udp(0));
        assert!(
            Message::from_vec(&out)
                .unwrap()
                .metadata
                .recursion_available
        );
        let local = Context {
            recursion: false,
            ..udp(0)
        };
        let (_, out) = outcome(&q, &t, &local);
        assert!(
            !Message::from_vec(&out)
                .unwrap()
                .metadata
                .recursion_available
        );
        let mut notify = q.clone();
        notify[2] |= 4 << 3;
        let (_, out) = outcome(&notify, &t, &udp(0));
        assert_eq!(out[3] & 0x80, 0, "RA on NOTIMP");
    }

    /// `q` signed with a TSIG record (key `k.`, hmac-sha256, a 32-byte MAC).
    pub(crate) fn signed(mut q: Vec<u8>) -> Vec<u8> {
        let ar = u16::from_be_bytes([q[10], q[11]]) + 1;
        q[10..12].copy_from_slice(&ar.to_be_bytes());
        let mut rdata = b"\x0bhmac-sha256\x00".to_vec();
        rdata.extend_from_slice(&[0, 0, 0x65, 0x43, 0x21, 0x00, 1, 44, 0, 32]);
        rdata.extend_from_slice(&[0xAB; 32]);
        rdata.extend_from_slice(&[q[0], q[1], 0, 0, 0, 0]);
        q.extend_from_slice(b"\x01k\x00\x00\xfa\x00\xff\x00\x00\x00\x00");
        q.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        q.extend_from_slice(&rdata);
        q
    }

    #[test]
    fn a_tsig_signed_query_for_the_zone_gets_notauth_badkey() {
        let t = table();
        for name in ["api.glued.internal.", "api.", "3.0.0.10.in-addr.arpa."] {
            let q = signed(query(name, RecordType::A, Some(1232)));
            let (o, out) = outcome(&q, &t, &udp(0));
            assert!(
                matches!(o, Outcome::Answered { rcode: 9, .. }),
                "{name}: {o:?}"
            );
            let m = Message::from_vec(&out).unwrap();
            assert!(m.answers.is_empty() && m.edns.is_some());
            // The TSIG record comes last: MAC size 0, error BADKEY.
            let tail = &out[out.len() - 8..];
            assert_eq!(tail, &[0, 0, q[0], q[1], 0, 17, 0, 0], "{name}");
            assert_eq!(u16::from_be_bytes([out[10], out[11]]), 2);
        }
        // Not ours: relayed as it is.
        let q = signed(query("example.com.", RecordType::A, None));
        assert!(is_forward(outcome(&q, &t, &udp(0)).0));
    }

    #[test]
    fn refused_and_servfail_echo_the_question() {
        let mut out = Vec::new();
        let q = query("api.", RecordType::A, None);
        error_reply(&q, RCODE_REFUSED, true, &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert_eq!(m.queries.len(), 1);
    }
}
