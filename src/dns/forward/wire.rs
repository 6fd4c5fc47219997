//! Bounds-checked views over raw DNS messages, just enough to relay them:
//! read and rewrite the id, find and compare the question, judge an
//! upstream's reply ([`judge_reply`]), tell which queries may share one
//! upstream query ([`merge_key`]), find the OPT record, and build SERVFAIL
//! and truncated (TC=1) answers.
//!
//! Invariant: every function here is pure, never panics on any input, and
//! leaves the bytes it does not have to touch exactly as they were.

use std::ops::Range;

/// Length of the fixed DNS header (RFC 1035 §4.1.1).
pub const HEADER_LEN: usize = 12;
/// The OPT pseudo-record type (RFC 6891).
const TYPE_OPT: u16 = 41;
/// Largest label length; 0xC0 marks a compression pointer.
const MAX_LABEL_LEN: u8 = 63;
/// UDP payload size advertised in the OPT of answers built here
/// (RFC 9715 / DNS flag day 2020).
pub const ADVERTISED_UDP_PAYLOAD: u16 = 1232;

/// RCODE values the forwarder acts on.
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;
/// NOTAUTH, also the header rcode of a TSIG BADKEY/BADSIG/BADTIME error
/// (RFC 8945 §5.3).
pub const RCODE_NOTAUTH: u8 = 9;

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// The transaction id, if the message is long enough to have a header.
pub fn id(msg: &[u8]) -> Option<u16> {
    if msg.len() < HEADER_LEN {
        return None;
    }
    u16_at(msg, 0)
}

/// Overwrites the transaction id (no-op on a message shorter than 2 bytes).
pub fn set_id(msg: &mut [u8], id: u16) {
    if let Some(head) = msg.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// QR bit: the message is a response.
pub fn is_response(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & 0x80 != 0)
}

/// TC bit: the message was truncated.
pub fn is_truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// The low 4 bits of RCODE from the header.
pub fn rcode(msg: &[u8]) -> u8 {
    msg.get(3).map_or(0, |b| b & 0x0F)
}

/// The byte range of the single question (name, type, class), starting at
/// the end of the header. `None` unless QDCOUNT is 1 and the name is a
/// plain sequence of labels (the first name of a message cannot be
/// compressed).
pub fn question(msg: &[u8]) -> Option<Range<usize>> {
    if u16_at(msg, 4)? != 1 || msg.len() < HEADER_LEN {
        return None;
    }
    let mut at = HEADER_LEN;
    loop {
        let len = *msg.get(at)?;
        if len == 0 {
            at += 1;
            break;
        }
        if len > MAX_LABEL_LEN {
            return None;
        }
        at += 1 + len as usize;
    }
    let end = at + 4;
    (end <= msg.len()).then_some(HEADER_LEN..end)
}

/// True when both messages ask the same single question, byte for byte:
/// the name's letter case included (RFC 5452 §9.3, "0x20"), so a reply
/// whose question differs only in case is not an answer to the query.
pub fn same_question(a: &[u8], b: &[u8]) -> bool {
    match (question(a), question(b)) {
        (Some(qa), Some(qb)) => a[qa] == b[qb],
        _ => false,
    }
}

/// QDCOUNT, if the message has a header.
fn question_count(msg: &[u8]) -> Option<u16> {
    id(msg)?;
    u16_at(msg, 4)
}

/// What a reply from the right upstream address and port, carrying the
/// query's id, is for the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An answer to relay: the same question, any rcode but SERVFAIL and
    /// REFUSED; or a question-less FORMERR, NOTIMP or NOTAUTH (what a
    /// server sends to a query it cannot parse or authenticate).
    Answer,
    /// SERVFAIL or REFUSED (with or without the question): that query moves
    /// to the next upstream; the upstream answered, so it stays healthy.
    TryNext,
    /// Not an answer to this query (not a response, or another question,
    /// letter case included): dropped as a spoofing attempt.
    Foreign,
    /// A response that cannot be read (several questions, a cut question,
    /// no question with another rcode): counts against the upstream.
    Malformed,
}

/// Judges `reply` (already matched by id and source) against `query`.
pub fn judge_reply(query: &[u8], reply: &[u8]) -> Verdict {
    if !is_response(reply) {
        return Verdict::Foreign;
    }
    let rcode = rcode(reply);
    let try_next = rcode == RCODE_SERVFAIL || rcode == RCODE_REFUSED;
    match question_count(reply) {
        Some(1) if question(reply).is_some() => {
            if !same_question(query, reply) {
                Verdict::Foreign
            } else if try_next {
                Verdict::TryNext
            } else {
                Verdict::Answer
            }
        }
        Some(0) if try_next => Verdict::TryNext,
        Some(0) if matches!(rcode, RCODE_FORMERR | RCODE_NOTIMP | RCODE_NOTAUTH) => Verdict::Answer,
        _ => Verdict::Malformed,
    }
}

/// What two queries must share to be sent upstream once and answered
/// with the same reply: the question (byte for byte), opcode, RD, AD and
/// CD, and the EDNS version, flags (DO) and options; only the id and the
/// advertised UDP payload size may differ. A query with any record but
/// one OPT (a TSIG signature, for one) has no key: it is never merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MergeKey<'a> {
    /// Opcode and RD (byte 2), AD and CD (byte 3).
    flags: [u8; 2],
    question: &'a [u8],
    /// EDNS version and flags (DO), then the options.
    edns: Option<([u8; 3], &'a [u8])>,
}

/// The [`MergeKey`] of `query`, if it may be merged.
pub fn merge_key(query: &[u8]) -> Option<MergeKey<'_>> {
    let q = question(query)?;
    // Nothing in the answer and authority sections, at most the OPT in the
    // additional one.
    if u16_at(query, 6)? != 0 || u16_at(query, 8)? != 0 || u16_at(query, 10)? > 1 {
        return None;
    }
    let edns = if u16_at(query, 10)? == 1 {
        let opt = opt_record(query)?;
        let record = &query[opt];
        // Root name (one byte), type, payload size, ext-rcode, then
        // version and the two flag bytes, then RDLENGTH and the options.
        if record.first() != Some(&0) || record.len() < 11 {
            return None;
        }
        Some(([record[6], record[7], record[8]], &record[11..]))
    } else {
        None
    };
    Some(MergeKey {
        flags: [query[2] & 0x79, query[3] & 0x30],
        question: &query[q],
        edns,
    })
}

/// The offset just past a (possibly compressed) name starting at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            1..=MAX_LABEL_LEN => at += 1 + len as usize,
            0xC0..=0xFF => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// The byte range of the OPT record in the additional section, if any.
/// `None` also when the message cannot be walked.
pub fn opt_record(msg: &[u8]) -> Option<Range<usize>> {
    let q = question(msg)?;
    let n_before = u16_at(msg, 6)? as usize + u16_at(msg, 8)? as usize;
    let n_additional = u16_at(msg, 10)? as usize;
    let mut at = q.end;
    for i in 0..n_before + n_additional {
        let start = at;
        let fixed = skip_name(msg, at)?;
        let rtype = u16_at(msg, fixed)?;
        let rdlen = u16_at(msg, fixed + 8)? as usize;
        at = fixed + 10 + rdlen;
        if at > msg.len() {
            return None;
        }
        if i >= n_before && rtype == TYPE_OPT {
            return Some(start..at);
        }
    }
    None
}

/// Writes into `out` the answer `msg` cut down to header, question and
/// OPT (when present and it fits `max_len`, else OPT without options), with
/// TC=1. Returns false when `msg` has no parseable question (nothing is
/// written then).
pub fn truncate(msg: &[u8], max_len: usize, out: &mut Vec<u8>) -> bool {
    let Some(q) = question(msg) else {
        return false;
    };
    out.clear();
    out.extend_from_slice(&msg[..q.end]);
    out[2] |= 0x02;
    out[6..10].fill(0);
    out[10..12].copy_from_slice(&0u16.to_be_bytes());
    if let Some(opt) = opt_record(msg) {
        let record = &msg[opt];
        if out.len() + record.len() <= max_len {
            out.extend_from_slice(record);
        } else {
            // OPT keeps its name (root), type, payload size, extended rcode
            // and flags; its options are dropped.
            let fixed = skip_name(record, 0).map_or(1, |n| n + 8);
            out.extend_from_slice(&record[..fixed]);
            out.extend_from_slice(&[0, 0]);
        }
        out[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    true
}

/// Writes into `out` a SERVFAIL answer to `query`: same id, opcode, RD and
/// CD, the question, and an OPT (no options, DO bit kept) when the query
/// had one. A query without a parseable question gets a bare header.
/// Returns false only when `query` is shorter than a header.
pub fn servfail(query: &[u8], out: &mut Vec<u8>) -> bool {
    if query.len() < HEADER_LEN {
        return false;
    }
    out.clear();
    let q = question(query);
    let end = q.as_ref().map_or(HEADER_LEN, |q| q.end);
    out.extend_from_slice(&query[..end]);
    // QR=1, keep opcode and RD; AA=0, TC=0.
    out[2] = 0x80 | (query[2] & 0x79);
    // RA=1, keep CD (0x10), AD=0, rcode SERVFAIL.
    out[3] = 0x80 | (query[3] & 0x10) | RCODE_SERVFAIL;
    out[4..6].copy_from_slice(&u16::from(q.is_some()).to_be_bytes());
    out[6..12].fill(0);
    if let Some(opt) = opt_record(query) {
        let record = &query[opt];
        // The flags follow name, type, class, ext-rcode and version.
        let flags_at = skip_name(record, 0).map_or(0, |n| n + 6);
        let dnssec_ok = record.get(flags_at).map_or(0, |b| b & 0x80);
        // Root name, TYPE=OPT, payload, ext-rcode 0, version 0, DO kept.
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&ADVERTISED_UDP_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[0, 0, dnssec_ok, 0, 0, 0]);
        out[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    true
}

/// The health probe sent to a down upstream: `. IN NS`, recursion desired.
/// Encoded once, by hickory-proto; the caller sets a fresh id per probe.
pub fn probe_query() -> Vec<u8> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::root(), RecordType::NS));
    msg.to_vec().expect("a one-question query always encodes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_is_root_ns_with_recursion_desired() {
        let probe = super::probe_query();
        assert_eq!(
            probe[2..],
            [0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1],
            "flags (RD), one question: root, NS, IN"
        );
    }

    use super::*;

    /// A query for `name` (dotted, no trailing dot) type `qtype`, with an
    /// optional OPT carrying `opt_options` bytes.
    fn query(id: u16, name: &str, qtype: u16, opt_options: Option<&[u8]>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x10, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some(options) = opt_options {
            m[11] = 1;
            m.push(0);
            m.extend_from_slice(&TYPE_OPT.to_be_bytes());
            m.extend_from_slice(&4096u16.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0x80, 0]);
            m.extend_from_slice(&(options.len() as u16).to_be_bytes());
            m.extend_from_slice(options);
        }
        m
    }

    /// `query` turned into an answer with one A record (compressed name).
    fn answer(query: &[u8]) -> Vec<u8> {
        let q = question(query).unwrap();
        let mut m = query[..q.end].to_vec();
        m[2] |= 0x80;
        m[7] = 1;
        m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
        if let Some(opt) = opt_record(query) {
            m.extend_from_slice(&query[opt]);
        }
        m
    }

    #[test]
    fn id_is_read_and_rewritten_without_touching_the_rest() {
        let q = query(0x1234, "example.com", 15, Some(&[0, 10, 0, 2, 0xAB, 0xCD]));
        assert_eq!(id(&q), Some(0x1234));
        let mut r = q.clone();
        set_id(&mut r, 0xBEEF);
        assert_eq!(id(&r), Some(0xBEEF));
        assert_eq!(r[2..], q[2..]);
        assert_eq!(id(&q[..11]), None);
        set_id(&mut [0u8; 1], 7); // no panic
    }

    #[test]
    fn questions_match_byte_for_byte_letter_case_included() {
        let a = query(1, "Example.COM", 1, None);
        let b = query(2, "Example.COM", 1, Some(&[]));
        assert!(same_question(&a, &b));
        assert!(!same_question(&a, &query(1, "example.com", 1, None)));
        assert!(!same_question(&a, &query(1, "Example.COm", 1, None)));
        assert!(!same_question(&a, &query(1, "example.org", 1, None)));
        assert!(!same_question(&a, &query(1, "example.com", 28, None)));
        assert!(!same_question(&a, &query(1, "example.com.x", 1, None)));
        let mut chaos = query(1, "example.com", 1, None);
        let end = chaos.len();
        chaos[end - 1] = 3;
        assert!(!same_question(&a, &chaos));
        // Two questions, or none: no match.
        let mut two = a.clone();
        two[5] = 2;
        assert!(!same_question(&two, &two));
        assert!(!same_question(&a[..12], &a[..12]));
    }

    #[test]
    fn types_and_classes_that_differ_only_by_ascii_case_do_not_match() {
        // HTTPS (65 = b'A') and type 97 (b'a'); class 0x0041 and 0x0061.
        let a = query(1, "example.com", 65, None);
        assert!(!same_question(&a, &query(1, "example.com", 97, None)));
        let mut class_a = a.clone();
        let n = class_a.len();
        class_a[n - 2..].copy_from_slice(&[0, b'A']);
        let mut class_b = class_a.clone();
        class_b[n - 1] = b'a';
        assert!(!same_question(&class_a, &class_b));
        assert!(same_question(&a, &query(2, "example.com", 65, None)));
    }

    /// `query` turned into a header-only response with `rcode`.
    fn questionless(query: &[u8], rcode: u8) -> Vec<u8> {
        let mut m = query[..HEADER_LEN].to_vec();
        m[2] |= 0x80;
        m[3] = (m[3] & 0xF0) | rcode;
        m[4..12].fill(0);
        m
    }

    #[test]
    fn replies_are_judged_by_question_bytes_and_rcode() {
        let q = query(3, "www.Example.com", 1, Some(&[]));
        let a = answer(&q);
        assert_eq!(judge_reply(&q, &a), Verdict::Answer);
        let mut nx = a.clone();
        nx[3] = (nx[3] & 0xF0) | 3;
        assert_eq!(
            judge_reply(&q, &nx),
            Verdict::Answer,
            "NXDOMAIN is an answer"
        );
        for rcode in [RCODE_SERVFAIL, RCODE_REFUSED] {
            let mut failed = a.clone();
            failed[3] = (failed[3] & 0xF0) | rcode;
            assert_eq!(judge_reply(&q, &failed), Verdict::TryNext);
            assert_eq!(judge_reply(&q, &questionless(&q, rcode)), Verdict::TryNext);
        }
        for rcode in [RCODE_FORMERR, RCODE_NOTIMP, RCODE_NOTAUTH] {
            assert_eq!(
                judge_reply(&q, &questionless(&q, rcode)),
                Verdict::Answer,
                "question-less rcode {rcode} is relayed"
            );
        }
        assert_eq!(judge_reply(&q, &questionless(&q, 0)), Verdict::Malformed);
        assert_eq!(judge_reply(&q, &questionless(&q, 3)), Verdict::Malformed);
        // The same name in another letter case: a spoofing attempt.
        let flipped = answer(&query(3, "www.example.com", 1, Some(&[])));
        assert_eq!(judge_reply(&q, &flipped), Verdict::Foreign);
        assert_eq!(judge_reply(&q, &q), Verdict::Foreign, "QR=0");
        let mut two = a.clone();
        two[5] = 2;
        assert_eq!(judge_reply(&q, &two), Verdict::Malformed);
        let cut = &a[..HEADER_LEN + 3];
        assert_eq!(judge_reply(&q, cut), Verdict::Malformed);
        assert_eq!(judge_reply(&q, &a[..5]), Verdict::Malformed);
    }

    #[test]
    fn merge_keys_differ_by_question_bytes_flags_and_edns_not_by_id_or_payload() {
        let base = query(1, "Example.com", 1, Some(&[]));
        fn key(m: &[u8]) -> MergeKey<'_> {
            merge_key(m).unwrap()
        }
        assert_eq!(key(&base), key(&query(2, "Example.com", 1, Some(&[]))));
        let mut bigger = base.clone();
        let opt = opt_record(&bigger).unwrap();
        bigger[opt.start + 3..opt.start + 5].copy_from_slice(&512u16.to_be_bytes());
        assert_eq!(key(&base), key(&bigger), "payload size may differ");
        assert_ne!(key(&base), key(&query(1, "example.com", 1, Some(&[]))));
        assert_ne!(key(&base), key(&query(1, "Example.com", 28, Some(&[]))));
        assert_ne!(key(&base), key(&query(1, "Example.com", 1, None)));
        let mut no_do = base.clone();
        no_do[opt.start + 7] = 0;
        assert_ne!(key(&base), key(&no_do), "DO bit");
        let mut cd = base.clone();
        cd[3] ^= 0x10;
        assert_ne!(key(&base), key(&cd), "CD bit");
        let mut rd = base.clone();
        rd[2] ^= 0x01;
        assert_ne!(key(&base), key(&rd), "RD bit");
        let cookie = query(
            1,
            "Example.com",
            1,
            Some(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]),
        );
        assert_ne!(key(&base), key(&cookie), "EDNS options (a cookie, ECS)");
        // A second additional record (a TSIG signature, say): never merged.
        let mut signed = base.clone();
        signed[11] = 2;
        signed.extend_from_slice(&[0, 0, 250, 0, 255, 0, 0, 0, 0, 0, 0]);
        assert_eq!(merge_key(&signed), None);
        assert_eq!(merge_key(&base[..base.len() - 1]), None);
    }

    #[test]
    fn question_rejects_compression_and_short_input() {
        let mut q = query(1, "a.b", 1, None);
        assert_eq!(question(&q), Some(12..12 + 5 + 4));
        q[12] = 0xC0;
        assert_eq!(question(&q), None);
        let q = query(1, "a.b", 1, None);
        for n in 0..q.len() {
            assert_eq!(question(&q[..n]), None, "prefix of {n} bytes");
        }
    }

    #[test]
    fn opt_is_found_after_compressed_answers() {
        let q = query(1, "example.com", 1, Some(&[0, 10, 0, 2, 1, 2]));
        let a = answer(&q);
        let opt = opt_record(&a).unwrap();
        assert_eq!(a[opt.start], 0);
        assert_eq!(opt.end, a.len());
        assert_eq!(opt_record(&answer(&query(1, "x", 1, None))), None);
        // Counts that promise more records than present: no OPT, no panic.
        let mut bad = a.clone();
        bad[7] = 9;
        assert_eq!(opt_record(&bad), None);
    }

    #[test]
    fn truncate_keeps_header_question_and_opt() {
        let q = query(7, "example.com", 16, Some(&[0, 10, 0, 2, 1, 2]));
        let a = answer(&q);
        let mut out = Vec::new();
        assert!(truncate(&a, 512, &mut out));
        let qr = question(&a).unwrap();
        assert_eq!(out[..2], a[..2]);
        assert!(is_truncated(&out) && is_response(&out));
        assert_eq!(&out[4..12], &[0, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!(out[qr.clone()], a[qr.clone()]);
        assert_eq!(out[qr.end..], a[opt_record(&a).unwrap()]);
        // Too small for the options: OPT kept, options dropped.
        assert!(truncate(&a, qr.end + 12, &mut out));
        assert_eq!(out.len(), qr.end + 11);
        assert_eq!(&out[out.len() - 2..], &[0, 0]);
        // No OPT: header and question only.
        let plain = answer(&query(7, "example.com", 16, None));
        assert!(truncate(&plain, 512, &mut out));
        assert_eq!(out.len(), question(&plain).unwrap().end);
        assert!(!truncate(&plain[..12], 512, &mut out));
    }

    #[test]
    fn servfail_echoes_id_question_and_do_bit() {
        let q = query(0xABCD, "Example.com", 1, Some(&[0, 10, 0, 2, 1, 2]));
        let mut out = Vec::new();
        assert!(servfail(&q, &mut out));
        assert_eq!(id(&out), Some(0xABCD));
        assert!(is_response(&out));
        assert_eq!(rcode(&out), RCODE_SERVFAIL);
        assert!(same_question(&q, &out));
        assert_eq!(out[2] & 0x01, 0x01, "RD copied");
        let opt = opt_record(&out).unwrap();
        assert_eq!(out[opt.clone()].len(), 11);
        assert_eq!(out[opt.start + 7] & 0x80, 0x80, "DO kept");
        let plain = query(1, "x", 1, None);
        assert!(servfail(&plain, &mut out));
        assert_eq!(opt_record(&out), None);
        assert_eq!(out.len(), plain.len());
        assert!(!servfail(&plain[..5], &mut out));
    }

    /// Tens of thousands of mutated queries and answers: nothing panics,
    /// a cut answer never exceeds the client's limit (but for header,
    /// question and a bare OPT) and carries TC=1, and SERVFAIL is a
    /// response with the query's id.
    #[test]
    fn mutated_messages_never_panic_and_cuts_stay_within_limits() {
        let mut seeds = Vec::new();
        for opt in [
            None,
            Some(&[][..]),
            Some(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8][..]),
        ] {
            for name in ["example.com", "a", "x.y.z.example.org"] {
                let q = query(0x4242, name, 1, opt);
                let mut big = answer(&q);
                // Many answers, then the OPT again at the end.
                let opt_range = opt_record(&big);
                for _ in 0..40 {
                    let at = question(&big).unwrap().end;
                    big.splice(
                        at..at,
                        [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 2],
                    );
                    big[7] = big[7].wrapping_add(1);
                }
                if opt_range.is_some() {
                    assert!(opt_record(&big).is_some());
                }
                seeds.extend([q, answer(&query(7, name, 28, opt)), big]);
            }
        }
        let mut rng = fastrand::Rng::with_seed(0xF0_4A4D);
        let mut out = Vec::new();
        let mut m = Vec::new();
        for _ in 0..40_000 {
            m.clear();
            m.extend_from_slice(&seeds[rng.usize(..seeds.len())]);
            for _ in 0..rng.usize(1..4) {
                match rng.u8(..4) {
                    0 if !m.is_empty() => {
                        let at = rng.usize(..m.len());
                        m[at] = rng.u8(..);
                    }
                    1 if !m.is_empty() => m.truncate(rng.usize(..m.len())),
                    2 => m.extend((0..rng.usize(..20)).map(|_| rng.u8(..))),
                    _ if m.len() > 11 => m[6 + 2 * rng.usize(..3) + 1] = rng.u8(..),
                    _ => {}
                }
            }
            let _ = (id(&m), opt_record(&m), same_question(&m, &m), rcode(&m));
            let _ = (
                merge_key(&m),
                judge_reply(&m, &m),
                judge_reply(&seeds[0], &m),
            );
            let max_len = 12 + rng.usize(..600);
            if truncate(&m, max_len, &mut out) {
                let q = question(&m).unwrap();
                assert!(
                    out.len() <= max_len.max(q.end + 12),
                    "{} > {max_len}",
                    out.len()
                );
                assert!(is_truncated(&out));
                assert_eq!(out[..2], m[..2]);
                assert_eq!(&out[6..10], &[0, 0, 0, 0]);
            }
            if servfail(&m, &mut out) {
                assert_eq!(id(&out), id(&m));
                assert!(is_response(&out) && rcode(&out) == RCODE_SERVFAIL);
                assert!(out.len() <= m.len().max(HEADER_LEN) + 11);
            }
        }
    }

    #[test]
    fn nothing_panics_on_garbage() {
        let mut out = Vec::new();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..2000 {
            let mut m = vec![0u8; n % 80];
            for b in &mut m {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            if m.len() > 5 {
                m[4] = 0;
                m[5] = 1;
            }
            let _ = (question(&m), opt_record(&m), same_question(&m, &m));
            let _ = (merge_key(&m), judge_reply(&m, &m));
            let _ = truncate(&m, 100, &mut out);
            let _ = servfail(&m, &mut out);
        }
    }
}
