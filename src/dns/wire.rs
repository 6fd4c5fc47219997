//! A bounds-checked view over untrusted DNS message bytes (RFC 1035 §4,
//! RFC 6891 for OPT, RFC 8945 for TSIG): the header, the one question, the
//! client's EDNS OPT record and where its TSIG record sits.
//!
//! Invariant: nothing here allocates, panics or loops on any input; every
//! read is bounds-checked and every parse moves strictly forward through the
//! buffer. Malformed input is an `Err(Malformed)`, never a panic.

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest name in wire format (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels a name of [`MAX_NAME_LEN`] bytes can hold.
pub const MAX_LABELS: usize = 127;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
/// CHAOS class (`version.bind`, `id.server`).
pub const CLASS_CH: u16 = 3;
pub const CLASS_ANY: u16 = 255;

pub const OPCODE_QUERY: u8 = 0;

pub const RCODE_NOERROR: u16 = 0;
pub const RCODE_FORMERR: u16 = 1;
pub const RCODE_SERVFAIL: u16 = 2;
pub const RCODE_NXDOMAIN: u16 = 3;
pub const RCODE_NOTIMP: u16 = 4;
pub const RCODE_REFUSED: u16 = 5;
pub const RCODE_NOTAUTH: u16 = 9;
/// Extended rcode (RFC 6891 §6.1.3): upper 8 bits go in the OPT TTL.
pub const RCODE_BADVERS: u16 = 16;

pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_CD: u16 = 0x0010;
/// DNSSEC OK bit in the OPT TTL's flags (RFC 3225).
pub const EDNS_FLAG_DO: u16 = 0x8000;
/// TSIG error: the key is not known (RFC 8945 §5.2.1).
pub const TSIG_BADKEY: u16 = 17;

/// The input is not a well-formed DNS query (answer FORMERR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

#[inline]
fn be16(buf: &[u8], at: usize) -> Result<u16, Malformed> {
    match buf.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(Malformed),
    }
}

#[inline]
fn be32(buf: &[u8], at: usize) -> Result<u32, Malformed> {
    match buf.get(at..at + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(Malformed),
    }
}

/// The fixed 12-byte header of a message at least [`HEADER_LEN`] long.
#[derive(Clone, Copy)]
pub struct Header<'a> {
    buf: &'a [u8],
}

impl<'a> Header<'a> {
    /// `None` when the buffer is shorter than a header.
    #[inline]
    pub fn new_checked(buf: &'a [u8]) -> Option<Header<'a>> {
        (buf.len() >= HEADER_LEN).then_some(Header { buf })
    }
    #[inline]
    fn word(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.buf[at], self.buf[at + 1]])
    }
    pub fn id(&self) -> u16 {
        self.word(0)
    }
    pub fn flags(&self) -> u16 {
        self.word(2)
    }
    pub fn is_response(&self) -> bool {
        self.flags() & FLAG_QR != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags() >> 11) & 0xF) as u8
    }
    pub fn qdcount(&self) -> u16 {
        self.word(4)
    }
    pub fn ancount(&self) -> u16 {
        self.word(6)
    }
    pub fn nscount(&self) -> u16 {
        self.word(8)
    }
    pub fn arcount(&self) -> u16 {
        self.word(10)
    }
}

/// The question name, viewed in place in the message (as the client wrote
/// it: case is kept, comparisons ignore it). Validated by
/// [`parse_question`]: uncompressed labels of at most [`MAX_LABEL_LEN`]
/// bytes, at most [`MAX_NAME_LEN`] bytes in all, ending with the root label.
#[derive(Clone, Copy)]
pub struct Name<'a> {
    /// The name in wire format, root label included.
    wire: &'a [u8],
    n_labels: usize,
}

impl<'a> Name<'a> {
    /// The name in wire format, as sent (mixed case).
    pub fn wire(&self) -> &'a [u8] {
        self.wire
    }
    pub fn n_labels(&self) -> usize {
        self.n_labels
    }
    /// The labels, first to last, without their length bytes (as sent).
    pub fn labels(&self) -> Labels<'a> {
        Labels { rest: self.wire }
    }
    /// If the name is `domain` or below it (`domain` in lowercase wire
    /// format), the number of labels before the domain.
    pub fn labels_below(&self, domain_wire: &[u8]) -> Option<usize> {
        let at = self.wire.len().checked_sub(domain_wire.len())?;
        // Most queries spell the domain in lowercase: one `memcmp` first
        // (the case-folding compare is an out-of-line call in some builds).
        let tail = &self.wire[at..];
        if tail != domain_wire && !tail.eq_ignore_ascii_case(domain_wire) {
            return None;
        }
        // `at` must fall on a label boundary (`xglued.internal` is not
        // below `glued.internal`).
        let (mut pos, mut n) = (0, 0);
        while pos < at {
            pos += 1 + self.wire[pos] as usize;
            n += 1;
        }
        (pos == at).then_some(n)
    }
    /// Writes labels `0..n`, lowercased and joined by dots (`api.node-a`),
    /// into `out` and returns its length; `None` when one of them holds a
    /// `.` byte (such a name cannot be a table key).
    pub fn dotted_key(&self, n: usize, out: &mut [u8; MAX_NAME_LEN]) -> Option<usize> {
        let mut len = 0;
        for (i, label) in self.labels().take(n).enumerate() {
            if i > 0 {
                out[len] = b'.';
                len += 1;
            }
            let dst = &mut out[len..len + label.len()];
            for (d, s) in dst.iter_mut().zip(label) {
                if *s == b'.' {
                    return None;
                }
                *d = s.to_ascii_lowercase();
            }
            len += label.len();
        }
        Some(len)
    }
}

/// The labels of a [`Name`], first to last.
pub struct Labels<'a> {
    /// Wire format from the next label on (validated by [`parse_question`]).
    rest: &'a [u8],
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.rest.split_first()?;
        if len == 0 {
            return None;
        }
        let (label, rest) = rest.split_at_checked(len as usize)?;
        self.rest = rest;
        Some(label)
    }
}

/// The one question of a query.
pub struct Question<'a> {
    pub name: Name<'a>,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past the question in the message.
    pub end: usize,
}

/// Parses the question at [`HEADER_LEN`]. Compression pointers are refused:
/// in the first name of a message a pointer can only point into the header
/// or back into the name itself (a loop).
pub fn parse_question(msg: &[u8]) -> Result<Question<'_>, Malformed> {
    let mut pos = HEADER_LEN;
    let mut n_labels = 0;
    loop {
        let len = *msg.get(pos).ok_or(Malformed)? as usize;
        if len == 0 {
            pos += 1;
            break;
        }
        if len > MAX_LABEL_LEN {
            // 0xC0 pointers, 0x40/0x80 extended label types, or garbage.
            return Err(Malformed);
        }
        // The label, its length byte and the final root byte must fit.
        pos += 1 + len;
        if pos + 1 - HEADER_LEN > MAX_NAME_LEN {
            return Err(Malformed);
        }
        n_labels += 1;
    }
    // Also checks that every label read above lies within the message.
    let qtype = be16(msg, pos)?;
    let qclass = be16(msg, pos + 2)?;
    Ok(Question {
        name: Name {
            wire: &msg[HEADER_LEN..pos],
            n_labels,
        },
        qtype,
        qclass,
        end: pos + 4,
    })
}

/// Skips a name anywhere in a message (pointers allowed: a pointer ends the
/// name). Returns the offset just past it.
fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, Malformed> {
    loop {
        let len = *msg.get(pos).ok_or(Malformed)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Ok(pos + 1),
            0x00 => pos += 1 + len as usize,
            0xC0 => {
                return if pos + 2 <= msg.len() {
                    Ok(pos + 2)
                } else {
                    Err(Malformed)
                };
            }
            _ => return Err(Malformed),
        }
    }
}

/// The client's EDNS(0) OPT record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    /// Requester's UDP payload size (RFC 6891 §6.2.3), as sent.
    pub payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// Where a TSIG record sits in a message (offsets into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tsig {
    /// Start of the owner name (the key name).
    pub owner: usize,
    /// Start and end of the RDATA.
    pub rdata: usize,
    pub end: usize,
}

/// What the sections after the question hold that a server must heed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Additional {
    pub edns: Option<Edns>,
    pub tsig: Option<Tsig>,
}

/// Walks the answer, authority and additional sections after the question
/// and returns the OPT record if there is one. Two OPT records, an OPT
/// whose owner is not the root, or a record running past the end are
/// malformed (RFC 6891 §6.1.1).
pub fn parse_edns(msg: &[u8], header: Header<'_>, pos: usize) -> Result<Option<Edns>, Malformed> {
    parse_additional(msg, header, pos).map(|a| a.edns)
}

/// [`parse_edns`], and the TSIG record if there is one; a TSIG that is not
/// the last record of the additional section is malformed (RFC 8945 §5.1).
pub fn parse_additional(
    msg: &[u8],
    header: Header<'_>,
    mut pos: usize,
) -> Result<Additional, Malformed> {
    let mut found = Additional::default();
    if header.ancount() | header.nscount() | header.arcount() == 0 {
        return Ok(found);
    }
    let before = header.ancount() as usize + header.nscount() as usize;
    let total = before + header.arcount() as usize;
    for i in 0..total {
        let owner = pos;
        pos = skip_name(msg, pos)?;
        let rtype = be16(msg, pos)?;
        let class = be16(msg, pos + 2)?;
        let ttl = be32(msg, pos + 4)?;
        let rdlen = be16(msg, pos + 8)? as usize;
        pos += 10;
        if pos + rdlen > msg.len() {
            return Err(Malformed);
        }
        let rdata = pos;
        pos += rdlen;
        if rtype == TYPE_OPT {
            if i < before || found.edns.is_some() || msg[owner] != 0 {
                return Err(Malformed);
            }
            found.edns = Some(Edns {
                payload: class,
                version: (ttl >> 16) as u8,
                dnssec_ok: ttl as u16 & EDNS_FLAG_DO != 0,
            });
        } else if rtype == TYPE_TSIG {
            if i + 1 != total || i < before {
                return Err(Malformed);
            }
            found.tsig = Some(Tsig {
                owner,
                rdata,
                end: pos,
            });
        }
    }
    Ok(found)
}

/// The client's OPT record in a message whose question section may not be
/// one well-formed question (`QDCOUNT` ≠ 1): `None` when it cannot be
/// found.
pub fn find_edns(msg: &[u8], header: Header<'_>) -> Option<Edns> {
    let mut pos = HEADER_LEN;
    for _ in 0..header.qdcount() {
        pos = skip_name(msg, pos).ok()? + 4;
    }
    if pos > msg.len() {
        return None;
    }
    parse_edns(msg, header, pos).ok().flatten()
}

/// The end of the name at `pos` when it is written without compression.
pub fn uncompressed_name_end(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)? as usize;
        if len == 0 {
            return Some(pos + 1);
        }
        if len > MAX_LABEL_LEN {
            return None;
        }
        pos += 1 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8]) -> Vec<u8> {
        let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
        q
    }

    #[test]
    fn question_is_split_into_labels_and_keyed_in_lowercase() {
        let msg = query(b"\x03API\x06node-a\x05Glued\x08internal\x00");
        let q = parse_question(&msg).unwrap();
        assert_eq!(q.name.n_labels(), 4);
        assert_eq!(q.name.labels().nth(1).unwrap(), b"node-a");
        assert_eq!(q.name.labels().count(), 4);
        let below = q.name.labels_below(b"\x05glued\x08internal\x00").unwrap();
        assert_eq!(below, 2);
        let mut key = [0; MAX_NAME_LEN];
        let n = q.name.dotted_key(below, &mut key).unwrap();
        assert_eq!(&key[..n], b"api.node-a");
        assert_eq!(q.qtype, TYPE_A);
        assert_eq!(q.end, msg.len());
        let dotted = query(b"\x03a.b\x05glued\x08internal\x00");
        let q = parse_question(&dotted).unwrap();
        assert_eq!(q.name.dotted_key(1, &mut key), None);
    }

    #[test]
    fn a_name_is_not_below_a_domain_it_only_ends_like() {
        let msg = query(b"\x06xglued\x08internal\x00");
        let q = parse_question(&msg).unwrap();
        assert_eq!(q.name.labels_below(b"\x05glued\x08internal\x00"), None);
        let msg = query(b"\x00");
        let root = parse_question(&msg).unwrap();
        assert_eq!(root.name.n_labels(), 0);
    }

    #[test]
    fn pointers_bad_lengths_and_truncation_are_malformed() {
        assert!(parse_question(&query(b"\xC0\x0C")).is_err());
        assert!(parse_question(&query(b"\x40abc\x00")).is_err());
        assert!(parse_question(&query(b"\x3Fabc")).is_err());
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        assert!(parse_question(&query(&long)).is_err());
        let q = query(b"\x03api\x00");
        assert!(parse_question(&q[..q.len() - 1]).is_err());
    }

    #[test]
    fn tsig_must_be_the_last_record() {
        let mut q = query(b"\x03api\x00");
        let end = q.len();
        q[11] = 2;
        let tsig = [3, b'k', b'e', b'y', 0, 0, 250, 0, 255, 0, 0, 0, 0, 0, 0];
        let opt = [0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0];
        let mut last = q.clone();
        last.extend_from_slice(&opt);
        last.extend_from_slice(&tsig);
        let h = Header::new_checked(&last).unwrap();
        let a = parse_additional(&last, h, end).unwrap();
        assert!(a.edns.is_some());
        assert_eq!(a.tsig.unwrap().owner, end + opt.len());
        q.extend_from_slice(&tsig);
        q.extend_from_slice(&opt);
        let h = Header::new_checked(&q).unwrap();
        assert!(parse_additional(&q, h, end).is_err());
    }

    #[test]
    fn the_opt_is_found_behind_any_number_of_questions() {
        let mut q = query(b"\x03api\x00");
        q.extend_from_slice(b"\x03web\x00\x00\x01\x00\x01");
        q[5] = 2;
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0x80, 0, 0, 0]);
        let h = Header::new_checked(&q).unwrap();
        assert!(find_edns(&q, h).unwrap().dnssec_ok);
        q[5] = 0;
        let h = Header::new_checked(&q).unwrap();
        assert_eq!(find_edns(&q, h), None);
    }

    #[test]
    fn edns_is_found_in_the_additional_section() {
        let mut q = query(b"\x03api\x00");
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0x80, 0, 0, 0]);
        let h = Header::new_checked(&q).unwrap();
        let end = parse_question(&q).unwrap().end;
        let e = parse_edns(&q, h, end).unwrap().unwrap();
        assert_eq!((e.payload, e.version, e.dnssec_ok), (1232, 0, true));
        // A second OPT is malformed.
        q[11] = 2;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
        let h = Header::new_checked(&q).unwrap();
        assert!(parse_edns(&q, h, end).is_err());
    }
}
