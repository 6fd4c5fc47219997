//! The forward cache: upstream answers kept as wire bytes and replayed by
//! the serving threads, with prefetch and serve-stale (RFC 8767).
//!
//! An entry is keyed by (question name case-folded, type, class, DO bit,
//! CD bit, whether the query had an OPT) and holds the upstream's reply
//! bytes with every TTL already capped, the store time, and the byte offset
//! of every TTL in the reply. A hit copies the bytes into the caller's
//! buffer, writes the client's id and question (same length as the stored
//! one, so compression pointers stay valid), lowers each TTL by the age in
//! whole seconds (stale answers: [`STALE_TTL_SECS`]), and cuts the answer to
//! the client's UDP payload size with TC=1 like a local answer. A hit
//! allocates nothing; only the one hit that asks for a refresh hands a copy
//! of the query to the forwarder.
//!
//! Lifetimes: a positive answer lives for its smallest TTL, a negative one
//! (NXDOMAIN, NODATA) for min(SOA TTL, SOA MINIMUM) (RFC 2308 §5), both
//! capped by `max_ttl_secs`; SERVFAIL for at most [`SERVFAIL_TTL_SECS`]
//! (RFC 9520). Never stored: truncated replies, replies to queries with an
//! EDNS Client Subnet option or without RD, other rcodes, a negative answer
//! without SOA, anything that does not parse to the end of its records.
//!
//! # Layout: why slots of `ArcSwapOption`
//!
//! One structure is shared by every serving thread: a fixed array of
//! `slots`, grouped in sets of [`WAYS`], each slot an
//! `ArcSwapOption<Entry>` with a 64-bit tag (the key's seeded hash) beside
//! it. A key lives in one set (its hash's low bits). A reader scans the
//! set's tags, `load()`s the slot whose tag matches and checks the entry's
//! own key. `ArcSwap::load` takes no lock and does not wait for a writer (it
//! borrows a per-thread debt slot, no allocation after the first use on a
//! thread), and an entry is immutable once published except for three
//! relaxed atomics (its CLOCK bit, its refresh time and its serve-stale
//! time). A seqlock would spare the pointer but make readers retry while
//! the writer copies a reply, and needs a fixed-size reply slot; a lock per
//! set would let a writer hold readers. The array never grows: its size is
//! set once from `size` (at least twice as many slots as entries, so sets
//! rarely overflow).
//!
//! # Writing and eviction
//!
//! There is one writer, [`CacheWriter`], owned by the forwarding thread (a
//! value, not shared, so the type system keeps it single). It bounds the
//! number of entries by `size` with CLOCK: readers set an entry's
//! `referenced` bit on each hit; when the cache is full the writer's hand
//! sweeps the slots, clearing set bits and evicting the first entry whose
//! bit was clear (or that is expired). When a key's set is full, the set's
//! first expired, else unreferenced, else soonest-expiring entry makes
//! room. A flush from any thread bumps `generation`: readers ignore older
//! entries at once and the writer drops them on its next turn.
//!
//! # Prefetch and serve-stale
//!
//! `refresh_at_ms` is first the moment 90 % of the lifetime has passed. A
//! hit at or after it moves it [`REFRESH_RETRY`] ahead with one
//! compare-exchange; the one reader that wins asks for one background
//! refresh. An expired entry is a miss, unless an upstream failure put it
//! in serve-stale mode: when every upstream fails (or the client-response
//! timer, [`CLIENT_RESPONSE_TIMER`], runs out) the forwarder answers from
//! [`Cache::answer_stale`], which also lets the serving threads answer that
//! entry stale for [`STALE_REFRESH`] while refreshes keep trying. Nothing
//! is answered stale more than `stale_secs` after it expired.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::answer::{MAX_MESSAGE_LEN, Transport, UDP_PAYLOAD_ADVERTISED, UDP_PAYLOAD_MIN};
use super::wire::{
    self, CLASS_IN, FLAG_CD, FLAG_QR, FLAG_RD, FLAG_TC, HEADER_LEN, Header, MAX_NAME_LEN,
    OPCODE_QUERY, RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_SERVFAIL, TYPE_OPT, TYPE_SOA,
};

/// Default number of entries (`GLUED_CACHE_SIZE`); 0 turns the cache off.
pub const DEFAULT_CACHE_SIZE: usize = 10_000;
/// Largest accepted `GLUED_CACHE_SIZE` (the slots, 16 bytes each, at
/// most 4 per entry, are allocated at start: 64 MB at this size).
pub const MAX_CACHE_SIZE: usize = 1_000_000;
/// Default cap on any cached lifetime (`GLUED_CACHE_MAX_TTL`), one day.
pub const DEFAULT_CACHE_MAX_TTL_SECS: u32 = 86_400;
/// Largest accepted `GLUED_CACHE_MAX_TTL` and `GLUED_CACHE_STALE_SECS`:
/// one week.
pub const MAX_CACHE_SECS: u32 = 604_800;
/// How long after expiry an entry may still be answered stale
/// (`GLUED_CACHE_STALE_SECS`, RFC 8767 §5 suggests 1 to 3 days).
pub const DEFAULT_CACHE_STALE_SECS: u32 = 86_400;
/// Longest life of a cached SERVFAIL (RFC 9520 §3.2: at most 5 minutes;
/// we keep it short so a recovered upstream is used soon).
pub const SERVFAIL_TTL_SECS: u32 = 5;
/// TTL of every record of a stale answer (RFC 8767 §4).
pub const STALE_TTL_SECS: u32 = 30;
/// After an upstream failure the serving threads answer an expired entry
/// stale for this long without asking upstream first (RFC 8767 §5,
/// "failure recheck"); refreshes go on behind.
pub const STALE_REFRESH: Duration = Duration::from_secs(30);
/// The client-response timer (RFC 8767 §5): a query that has an expired
/// entry and no upstream answer after this long gets the stale answer.
pub const CLIENT_RESPONSE_TIMER: Duration = Duration::from_millis(1800);
/// Share of an entry's lifetime after which a hit asks for a refresh.
pub const PREFETCH_AFTER_PERCENT: u64 = 90;
/// Least time between two refreshes of one entry (longer than a query's
/// whole budget upstream, so one refresh is in flight at a time).
pub const REFRESH_RETRY: Duration = Duration::from_secs(3);
/// Slots per set: a key may live in any slot of its set.
pub const WAYS: usize = 8;
/// Slots per entry of capacity (before rounding the sets to a power of 2).
const SLOTS_PER_ENTRY: usize = 2;
/// Key: the lowercased name, type, class and a flags byte.
const MAX_KEY_LEN: usize = MAX_NAME_LEN + 5;
/// EDNS Client Subnet option code (RFC 7871).
const OPTION_ECS: u16 = 8;
/// Key flag bits.
const KEY_DO: u8 = 1;
const KEY_CD: u8 = 2;
const KEY_EDNS: u8 = 4;
/// DNSSEC OK in the OPT TTL field (RFC 3225).
const OPT_TTL_DO: u32 = 0x8000;
/// TTLs with the top bit set count as 0 (RFC 2181 §8).
const MAX_TTL_VALUE: u32 = 0x7FFF_FFFF;

/// The cache's configuration (`GLUED_CACHE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most entries; 0 turns the cache off.
    pub size: usize,
    /// Cap on every lifetime and TTL.
    pub max_ttl_secs: u32,
    /// How long after expiry an entry may be answered stale; 0: never.
    pub stale_secs: u32,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            size: DEFAULT_CACHE_SIZE,
            max_ttl_secs: DEFAULT_CACHE_MAX_TTL_SECS,
            stale_secs: DEFAULT_CACHE_STALE_SECS,
        }
    }
}

/// One cached answer. Immutable once published but for the atomics.
struct Entry {
    hash: u64,
    key: Box<[u8]>,
    /// The upstream reply, every TTL capped.
    reply: Box<[u8]>,
    question_end: usize,
    /// Offset of each record's TTL in `reply` (the OPT's is not a TTL).
    ttl_offsets: Box<[u16]>,
    stored_ms: u64,
    expires_ms: u64,
    /// Never answered stale from this moment on.
    stale_end_ms: u64,
    generation: u32,
    /// CLOCK bit: set by hits, cleared by the writer's hand.
    referenced: AtomicBool,
    /// A hit from this moment on asks for a refresh.
    refresh_at_ms: AtomicU64,
    /// Until this moment the serving threads answer it stale once expired.
    serve_stale_until_ms: AtomicU64,
}

impl Entry {
    fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }
    fn may_serve_stale(&self, now_ms: u64) -> bool {
        now_ms < self.stale_end_ms
    }
}

/// What a lookup did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// `out` holds the answer. `refresh`: this hit asks for one background
    /// refresh (the caller sends the query upstream without a client).
    Hit { refresh: bool, stale: bool },
    /// Not answered: forward the query.
    Miss,
}

/// The parts of a query the cache looks at, parsed on the stack.
struct Parsed {
    key: [u8; MAX_KEY_LEN],
    key_len: usize,
    hash: u64,
    question_end: usize,
    /// Largest UDP answer, like a local answer's: 512 without EDNS, else the
    /// client's size between 512 and 1232.
    udp_limit: usize,
}

impl Parsed {
    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// Counters of one serving thread (written by it only).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ReaderCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
}

/// The cache's counters, rendered for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheStats {
    readers: Mutex<Vec<Arc<ReaderCounters>>>,
    /// Entries held now (the writer's count).
    pub entries: AtomicU64,
    /// Entries removed to make room.
    pub evictions: AtomicU64,
    /// Refreshes sent upstream ahead of expiry or behind a stale answer.
    pub prefetches: AtomicU64,
    /// Stale answers sent by the forwarder (serving threads count theirs).
    pub stale_answers: AtomicU64,
}

/// Sums of the cache counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheTotals {
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub stale_answers: u64,
    pub evictions: u64,
    pub prefetches: u64,
}

impl CacheStats {
    fn register(&self) -> Arc<ReaderCounters> {
        let c = Arc::new(ReaderCounters::default());
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }

    pub fn totals(&self) -> CacheTotals {
        let mut t = CacheTotals {
            entries: self.entries.load(Relaxed),
            stale_answers: self.stale_answers.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            prefetches: self.prefetches.load(Relaxed),
            ..CacheTotals::default()
        };
        for r in self
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            t.hits += r.hits.load(Relaxed);
            t.misses += r.misses.load(Relaxed);
            t.stale_answers += r.stale.load(Relaxed);
        }
        t
    }

    /// Prometheus text with HELP and TYPE.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let t = self.totals();
        for (name, kind, help, value) in [
            (
                "glued_cache_entries",
                "gauge",
                "Answers held in the forward cache.",
                t.entries,
            ),
            (
                "glued_cache_hits_total",
                "counter",
                "Forwardable queries answered from the cache while fresh.",
                t.hits,
            ),
            (
                "glued_cache_misses_total",
                "counter",
                "Forwardable queries the cache could not answer (sent upstream).",
                t.misses,
            ),
            (
                "glued_cache_stale_answers_total",
                "counter",
                "Expired answers served with TTL 30 while the upstreams failed (RFC 8767).",
                t.stale_answers,
            ),
            (
                "glued_cache_evictions_total",
                "counter",
                "Entries removed from the cache to make room.",
                t.evictions,
            ),
            (
                "glued_cache_prefetches_total",
                "counter",
                "Background refreshes of cached answers sent upstream.",
                t.prefetches,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// The shared cache: readers on every serving thread, one [`CacheWriter`].
pub struct Cache {
    config: CacheConfig,
    slots: Box<[ArcSwapOption<Entry>]>,
    /// Beside each slot, the hash of its entry's key (0: empty). A hint:
    /// the entry's own key decides.
    tags: Box<[AtomicU64]>,
    set_mask: usize,
    hasher: foldhash::fast::RandomState,
    epoch: Instant,
    /// Bumped by [`Cache::flush`]; older entries are not answered.
    generation: AtomicU32,
    /// Run after each flush: the writer's thread sets it to be woken.
    flush_hook: OnceLock<FlushHook>,
    stats: Arc<CacheStats>,
}

type FlushHook = Box<dyn Fn() + Send + Sync>;

impl Cache {
    /// A cache for `config.size` entries and its single writer; `None` when
    /// the size is 0 (cache off).
    pub fn new(config: CacheConfig, stats: Arc<CacheStats>) -> Option<(Arc<Cache>, CacheWriter)> {
        if config.size == 0 {
            return None;
        }
        let size = config.size.min(MAX_CACHE_SIZE);
        let n_sets = (size * SLOTS_PER_ENTRY).div_ceil(WAYS).next_power_of_two();
        let n_slots = n_sets * WAYS;
        let cache = Arc::new(Cache {
            config: CacheConfig { size, ..config },
            slots: (0..n_slots).map(|_| ArcSwapOption::empty()).collect(),
            tags: (0..n_slots).map(|_| AtomicU64::new(0)).collect(),
            set_mask: n_sets - 1,
            hasher: foldhash::fast::RandomState::default(),
            epoch: Instant::now(),
            generation: AtomicU32::new(0),
            flush_hook: OnceLock::new(),
            stats,
        });
        let writer = CacheWriter {
            cache: cache.clone(),
            hand: 0,
            n_entries: 0,
            generation: 0,
        };
        Some((cache, writer))
    }

    pub fn config(&self) -> CacheConfig {
        self.config
    }

    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// A reader for one serving thread (registers its counters).
    pub fn reader(self: &Arc<Cache>) -> CacheReader {
        CacheReader {
            cache: self.clone(),
            counters: self.stats.register(),
        }
    }

    /// Forgets every entry at once, from any thread: readers stop answering
    /// them now, the writer frees them on its next turn.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Relaxed);
        if let Some(hook) = self.flush_hook.get() {
            hook();
        }
    }

    /// Sets what [`Cache::flush`] runs afterwards (once; later calls are
    /// ignored): the writer's thread wakes itself up to call
    /// [`CacheWriter::maintain`].
    pub fn set_flush_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.flush_hook.set(Box::new(hook));
    }

    /// Counts a refresh sent upstream (prefetch or behind a stale answer).
    pub fn count_prefetch(&self) {
        self.stats.prefetches.fetch_add(1, Relaxed);
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn set_range(&self, hash: u64) -> std::ops::Range<usize> {
        let set = (hash as usize) & self.set_mask;
        set * WAYS..set * WAYS + WAYS
    }

    /// Parses `query` into its key; `None` when it may not be cached.
    fn parse(&self, query: &[u8]) -> Option<Parsed> {
        let mut p = parse_query(query)?;
        let hash = self.hasher.hash_one(p.key());
        // 0 marks an empty slot's tag.
        p.hash = hash.max(1);
        Some(p)
    }

    /// The slot holding `p`'s key, and its entry, if any.
    fn find(&self, p: &Parsed) -> Option<(usize, arc_swap::Guard<Option<Arc<Entry>>>)> {
        let generation = self.generation.load(Relaxed);
        for i in self.set_range(p.hash) {
            if self.tags[i].load(Relaxed) != p.hash {
                continue;
            }
            let guard = self.slots[i].load();
            if let Some(e) = guard.as_ref()
                && e.hash == p.hash
                && e.generation == generation
                && *e.key == *p.key()
            {
                return Some((i, guard));
            }
        }
        None
    }

    /// Answers `query` from the cache into `out` when a fresh entry (or
    /// one in serve-stale mode) holds it. No allocation (the answer is cut
    /// to `out`'s capacity), no lock.
    fn lookup(
        &self,
        query: &[u8],
        transport: Transport,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Lookup {
        let Some(p) = self.parse(query) else {
            return Lookup::Miss;
        };
        let Some((_, guard)) = self.find(&p) else {
            return Lookup::Miss;
        };
        let Some(e) = guard.as_ref() else {
            return Lookup::Miss;
        };
        let now_ms = self.now_ms(now);
        let stale = if e.is_fresh(now_ms) {
            false
        } else if e.may_serve_stale(now_ms) && now_ms < e.serve_stale_until_ms.load(Relaxed) {
            true
        } else {
            return Lookup::Miss;
        };
        if !e.referenced.load(Relaxed) {
            e.referenced.store(true, Relaxed);
        }
        let limit = match transport {
            Transport::Udp => p.udp_limit,
            Transport::Tcp => MAX_MESSAGE_LEN,
        };
        // Within the caller's buffer: a hit never allocates.
        let limit = limit.min(out.capacity().max(UDP_PAYLOAD_MIN));
        write_answer(e, query, p.question_end, limit, now_ms, stale, out);
        Lookup::Hit {
            refresh: claim_refresh(e, now_ms),
            stale,
        }
    }

    /// The forwarder's fallback when every upstream failed or the client
    /// waited [`CLIENT_RESPONSE_TIMER`]: writes an expired (or fresh)
    /// entry's answer for `query` with TTL [`STALE_TTL_SECS`] into `out`,
    /// uncut (the sender cuts it to the client's size), and lets the
    /// serving threads answer it stale for [`STALE_REFRESH`]. False when no
    /// entry may be answered.
    pub fn answer_stale(&self, query: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
        let Some(p) = self.parse(query) else {
            return false;
        };
        let Some((_, guard)) = self.find(&p) else {
            return false;
        };
        let Some(e) = guard.as_ref() else {
            return false;
        };
        let now_ms = self.now_ms(now);
        if !e.may_serve_stale(now_ms) {
            return false;
        }
        // Refreshed meanwhile: the fresh answer.
        let stale = !e.is_fresh(now_ms);
        if stale {
            let until = now_ms + STALE_REFRESH.as_millis() as u64;
            e.serve_stale_until_ms.fetch_max(until, Relaxed);
            bump(&self.stats.stale_answers);
        }
        write_answer(
            e,
            query,
            p.question_end,
            MAX_MESSAGE_LEN,
            now_ms,
            stale,
            out,
        );
        true
    }

    /// Whether [`Cache::answer_stale`] would answer `query` now (the
    /// forwarder then arms the client-response timer).
    pub fn has_stale(&self, query: &[u8], now: Instant) -> bool {
        let now_ms = self.now_ms(now);
        self.parse(query)
            .and_then(|p| self.find(&p))
            .is_some_and(|(_, g)| g.as_ref().is_some_and(|e| e.may_serve_stale(now_ms)))
    }
}

/// Whether this hit is the one that asks for the refresh (one per
/// [`REFRESH_RETRY`]).
#[inline]
fn claim_refresh(e: &Entry, now_ms: u64) -> bool {
    let at = e.refresh_at_ms.load(Relaxed);
    now_ms >= at
        && e.refresh_at_ms
            .compare_exchange(
                at,
                now_ms + REFRESH_RETRY.as_millis() as u64,
                Relaxed,
                Relaxed,
            )
            .is_ok()
}

/// Writes `e`'s answer to `query` into `out`: the client's id and question,
/// TTLs lowered by the age (or [`STALE_TTL_SECS`]), cut to `limit` with
/// TC=1 when larger.
fn write_answer(
    e: &Entry,
    query: &[u8],
    question_end: usize,
    limit: usize,
    now_ms: u64,
    stale: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    let whole = e.reply.len() <= limit;
    if whole {
        out.extend_from_slice(&e.reply);
    } else if !super::forward::wire::truncate(&e.reply, limit, out) {
        // Unreachable: a stored reply has a question.
        out.extend_from_slice(&e.reply[..HEADER_LEN]);
    }
    // Same key: the question has the same length as the stored one.
    if e.question_end == question_end && out.len() >= question_end {
        out[..2].copy_from_slice(&query[..2]);
        out[HEADER_LEN..question_end].copy_from_slice(&query[HEADER_LEN..question_end]);
    }
    if !whole {
        return;
    }
    let age_secs = (now_ms.saturating_sub(e.stored_ms) / 1000).min(u64::from(u32::MAX)) as u32;
    for &at in e.ttl_offsets.iter() {
        let at = at as usize;
        let Some(field) = out.get_mut(at..at + 4) else {
            continue;
        };
        let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
        let ttl = if stale {
            STALE_TTL_SECS
        } else {
            ttl.saturating_sub(age_secs)
        };
        field.copy_from_slice(&ttl.to_be_bytes());
    }
}

/// One serving thread's handle: lookups plus its own counters.
pub struct CacheReader {
    cache: Arc<Cache>,
    counters: Arc<ReaderCounters>,
}

impl CacheReader {
    /// Answers a forwardable `query` from the cache into `out` (see
    /// [`Lookup`]). Counts the hit, stale answer or miss.
    #[inline]
    pub fn answer(
        &self,
        query: &[u8],
        transport: Transport,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Lookup {
        let lookup = self.cache.lookup(query, transport, now, out);
        match lookup {
            Lookup::Hit { stale: false, .. } => bump(&self.counters.hits),
            Lookup::Hit { stale: true, .. } => bump(&self.counters.stale),
            Lookup::Miss => bump(&self.counters.misses),
        }
        lookup
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }
}

/// The one writer: stores answers and evicts. Owned by the forwarding
/// thread.
pub struct CacheWriter {
    cache: Arc<Cache>,
    /// CLOCK hand over `slots`.
    hand: usize,
    /// Slots holding an entry of `generation`.
    n_entries: usize,
    /// The flush generation the slots belong to.
    generation: u32,
}

impl CacheWriter {
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Drops every entry after a [`Cache::flush`]; cheap otherwise. Call
    /// once per loop turn.
    pub fn maintain(&mut self) {
        let generation = self.cache.generation.load(Relaxed);
        if generation == self.generation {
            return;
        }
        for i in 0..self.cache.slots.len() {
            self.cache.tags[i].store(0, Relaxed);
            self.cache.slots[i].store(None);
        }
        self.n_entries = 0;
        self.generation = generation;
        self.cache.stats.entries.store(0, Relaxed);
    }

    /// Stores `reply`, the upstream's accepted answer to `query` (the
    /// client's query as relayed). Returns false when it may not be cached.
    pub fn insert(&mut self, query: &[u8], reply: &[u8], now: Instant) -> bool {
        let cache = self.cache.clone();
        let Some(p) = cache.parse(query) else {
            return false;
        };
        let Some(shape) = analyse_reply(reply, &p, cache.config.max_ttl_secs) else {
            return false;
        };
        self.maintain();
        let now_ms = cache.now_ms(now);
        let life_ms = u64::from(shape.lifetime_secs) * 1000;
        let expires_ms = now_ms + life_ms;
        let (refresh_at_ms, stale_ms) = if shape.servfail {
            (u64::MAX, 0)
        } else {
            (
                now_ms + life_ms * PREFETCH_AFTER_PERCENT / 100,
                u64::from(cache.config.stale_secs) * 1000,
            )
        };
        let mut stored = reply.to_vec().into_boxed_slice();
        for &at in &shape.ttl_offsets {
            let at = at as usize;
            let field = &mut stored[at..at + 4];
            let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
            let ttl = if ttl > MAX_TTL_VALUE { 0 } else { ttl };
            field.copy_from_slice(&ttl.min(shape.record_cap_secs).to_be_bytes());
        }
        let entry = Arc::new(Entry {
            hash: p.hash,
            key: p.key().into(),
            reply: stored,
            question_end: p.question_end,
            ttl_offsets: shape.ttl_offsets.into_boxed_slice(),
            stored_ms: now_ms,
            expires_ms,
            stale_end_ms: expires_ms + stale_ms,
            generation: self.generation,
            referenced: AtomicBool::new(false),
            refresh_at_ms: AtomicU64::new(refresh_at_ms),
            serve_stale_until_ms: AtomicU64::new(0),
        });
        let set = cache.set_range(p.hash);
        // The same key: replaced in place.
        if let Some((i, _)) = cache.find(&p) {
            cache.slots[i].store(Some(entry));
            return true;
        }
        if self.n_entries >= cache.config.size {
            self.evict_one(now_ms);
        }
        let free = set.clone().find(|&i| cache.slots[i].load().is_none());
        let i = match free {
            Some(i) => i,
            None => {
                let victim = self.victim_in_set(set, now_ms);
                self.remove(victim);
                victim
            }
        };
        cache.slots[i].store(Some(entry));
        cache.tags[i].store(p.hash, Relaxed);
        self.n_entries += 1;
        cache.stats.entries.store(self.n_entries as u64, Relaxed);
        true
    }

    /// Removes slot `i`'s entry (counted as an eviction).
    fn remove(&mut self, i: usize) {
        let cache = &self.cache;
        cache.tags[i].store(0, Relaxed);
        if cache.slots[i].swap(None).is_some() {
            self.n_entries -= 1;
            bump(&cache.stats.evictions);
            cache.stats.entries.store(self.n_entries as u64, Relaxed);
        }
    }

    /// CLOCK: sweeps from the hand, giving referenced fresh entries a second
    /// chance, and removes the first other one.
    fn evict_one(&mut self, now_ms: u64) {
        let n = self.cache.slots.len();
        for _ in 0..2 * n {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let second_chance = match self.cache.slots[i].load().as_ref() {
                None => continue,
                Some(e) => e.is_fresh(now_ms) && e.referenced.swap(false, Relaxed),
            };
            if !second_chance {
                self.remove(i);
                return;
            }
        }
    }

    /// The slot of a full set to reuse: its first expired entry, else its
    /// first unreferenced one, else the one expiring soonest.
    fn victim_in_set(&self, set: std::ops::Range<usize>, now_ms: u64) -> usize {
        let mut expired = None;
        let mut unreferenced = None;
        let mut soonest = (u64::MAX, set.start);
        for i in set {
            let guard = self.cache.slots[i].load();
            let Some(e) = guard.as_ref() else {
                return i;
            };
            if !e.is_fresh(now_ms) {
                expired.get_or_insert(i);
            } else if !e.referenced.load(Relaxed) {
                unreferenced.get_or_insert(i);
            }
            if e.expires_ms < soonest.0 {
                soonest = (e.expires_ms, i);
            }
        }
        expired.or(unreferenced).unwrap_or(soonest.1)
    }

    /// Entries held (for tests).
    pub fn len(&self) -> usize {
        self.n_entries
    }

    pub fn is_empty(&self) -> bool {
        self.n_entries == 0
    }
}

// ---------------------------------------------------------------------------
// Parsing (bounds-checked, never panics)

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    let b = msg.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The offset just past a name (pointers end it).
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => at += 1 + len as usize,
            0xC0 => return (at + 2 <= msg.len()).then_some(at + 2),
            _ => return None,
        }
    }
}

/// One resource record's place in a message.
struct Rr {
    rtype: u16,
    class: u16,
    ttl_at: usize,
    rdata: std::ops::Range<usize>,
}

/// Reads the record at `at`; returns it and the offset past it.
fn read_rr(msg: &[u8], at: usize) -> Option<(Rr, usize)> {
    let fixed = skip_name(msg, at)?;
    let rtype = u16_at(msg, fixed)?;
    let class = u16_at(msg, fixed + 2)?;
    let rdlen = u16_at(msg, fixed + 8)? as usize;
    let start = fixed + 10;
    let end = start + rdlen;
    (end <= msg.len()).then_some((
        Rr {
            rtype,
            class,
            ttl_at: fixed + 4,
            rdata: start..end,
        },
        end,
    ))
}

/// The key of a query that may be cached: QR=0, opcode QUERY, RD=1, one
/// question, at most one OPT and no Client Subnet option; records parse.
fn parse_query(query: &[u8]) -> Option<Parsed> {
    let header = Header::new_checked(query)?;
    let flags = header.flags();
    if flags & FLAG_QR != 0
        || header.opcode() != OPCODE_QUERY
        || header.qdcount() != 1
        || flags & FLAG_RD == 0
    {
        return None;
    }
    let question = wire::parse_question(query).ok()?;
    let name = question.name.wire();
    let mut p = Parsed {
        key: [0; MAX_KEY_LEN],
        key_len: name.len() + 5,
        hash: 0,
        question_end: question.end,
        udp_limit: UDP_PAYLOAD_MIN,
    };
    for (k, b) in p.key.iter_mut().zip(name) {
        *k = b.to_ascii_lowercase();
    }
    let n = name.len();
    p.key[n..n + 2].copy_from_slice(&question.qtype.to_be_bytes());
    p.key[n + 2..n + 4].copy_from_slice(&question.qclass.to_be_bytes());
    let mut key_flags = if flags & FLAG_CD != 0 { KEY_CD } else { 0 };
    let n_records =
        header.ancount() as usize + header.nscount() as usize + header.arcount() as usize;
    let mut at = question.end;
    for _ in 0..n_records {
        let (rr, next) = read_rr(query, at)?;
        if rr.rtype == TYPE_OPT {
            if key_flags & KEY_EDNS != 0 {
                return None;
            }
            key_flags |= KEY_EDNS;
            if u32_at(query, rr.ttl_at)? & OPT_TTL_DO != 0 {
                key_flags |= KEY_DO;
            }
            p.udp_limit = (rr.class as usize)
                .max(UDP_PAYLOAD_MIN)
                .min(UDP_PAYLOAD_ADVERTISED as usize);
            let mut o = rr.rdata.start;
            while o < rr.rdata.end {
                let code = u16_at(query, o)?;
                let len = u16_at(query, o + 2)? as usize;
                if code == OPTION_ECS {
                    return None;
                }
                o += 4 + len;
            }
            if o != rr.rdata.end {
                return None;
            }
        }
        at = next;
    }
    p.key[n + 4] = key_flags;
    Some(p)
}

/// How a reply is stored.
struct Shape {
    ttl_offsets: Vec<u16>,
    lifetime_secs: u32,
    /// Every record's TTL is capped at this.
    record_cap_secs: u32,
    /// A SERVFAIL: never prefetched, never answered stale.
    servfail: bool,
}

/// Reads a TTL field (RFC 2181 §8: top bit set counts as 0).
fn ttl_at(msg: &[u8], at: usize) -> Option<u32> {
    u32_at(msg, at).map(|t| if t > MAX_TTL_VALUE { 0 } else { t })
}

/// Decides whether `reply` (to the query parsed as `p`) may be cached, and
/// for how long. `None`: never stored.
fn analyse_reply(reply: &[u8], p: &Parsed, max_ttl_secs: u32) -> Option<Shape> {
    let header = Header::new_checked(reply)?;
    let flags = header.flags();
    if flags & FLAG_QR == 0 || flags & FLAG_TC != 0 || header.qdcount() != 1 {
        return None;
    }
    let question = wire::parse_question(reply).ok()?;
    let name_len = question.name.wire().len();
    // The reply's question is the query's (the forwarder checked it; kept
    // here so the cache stands on its own).
    if question.end != p.question_end
        || !question
            .name
            .wire()
            .eq_ignore_ascii_case(&p.key()[..name_len])
        || p.key()[name_len..name_len + 4] != reply[question.end - 4..question.end]
    {
        return None;
    }
    let rcode = flags & 0x000F;
    let n_answers = header.ancount() as usize;
    let n_authority = header.nscount() as usize;
    let n_records = n_answers + n_authority + header.arcount() as usize;
    let mut ttl_offsets = Vec::with_capacity(n_records);
    let mut min_ttl = u32::MAX;
    let mut negative_ttl = None;
    let mut at = question.end;
    for i in 0..n_records {
        let (rr, next) = read_rr(reply, at)?;
        if rr.rtype != TYPE_OPT {
            let ttl = ttl_at(reply, rr.ttl_at)?;
            min_ttl = min_ttl.min(ttl);
            ttl_offsets.push(u16::try_from(rr.ttl_at).ok()?);
            let in_authority = i >= n_answers && i < n_answers + n_authority;
            if in_authority && rr.rtype == TYPE_SOA && rr.class == CLASS_IN {
                // MINIMUM is the last field of the SOA RDATA.
                let minimum = (rr.rdata.len() >= 22)
                    .then(|| ttl_at(reply, rr.rdata.end - 4))
                    .flatten()?;
                negative_ttl = Some(ttl.min(minimum));
            }
        }
        at = next;
    }
    let (lifetime, record_cap) = match rcode {
        RCODE_SERVFAIL => {
            let life = SERVFAIL_TTL_SECS.min(max_ttl_secs);
            (life, life)
        }
        RCODE_NXDOMAIN => {
            let life = negative_ttl?.min(max_ttl_secs);
            (life, life)
        }
        RCODE_NOERROR if n_answers == 0 => {
            let life = negative_ttl?.min(max_ttl_secs);
            (life, life)
        }
        RCODE_NOERROR => (min_ttl.min(max_ttl_secs), max_ttl_secs),
        _ => return None,
    };
    (lifetime > 0).then_some(Shape {
        ttl_offsets,
        lifetime_secs: lifetime,
        record_cap_secs: record_cap,
        servfail: rcode == RCODE_SERVFAIL,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn cache(size: usize) -> (Arc<Cache>, CacheWriter) {
        let config = CacheConfig {
            size,
            max_ttl_secs: 3600,
            stale_secs: 60,
        };
        Cache::new(config, Arc::new(CacheStats::default())).unwrap()
    }

    /// A query for `name`/`rtype` with RD; `edns`: (DO bit, options).
    fn query(id: u16, name: &str, rtype: RecordType, edns: Option<(bool, Vec<u8>)>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        let mut bytes = m.to_vec().unwrap();
        if let Some((dnssec_ok, options)) = edns {
            bytes[11] = 1;
            bytes.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0]);
            bytes.push(if dnssec_ok { 0x80 } else { 0 });
            bytes.push(0);
            bytes.extend_from_slice(&(options.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&options);
        }
        bytes
    }

    /// An upstream answer to `q` with one A record per TTL in `ttls`.
    fn answer(q: &[u8], ttls: &[u32]) -> Vec<u8> {
        let m = Message::from_vec(q).unwrap();
        let mut r = Message::response(m.metadata.id, OpCode::Query);
        r.metadata.recursion_desired = true;
        r.metadata.recursion_available = true;
        r.add_query(m.queries[0].clone());
        for (i, ttl) in ttls.iter().enumerate() {
            r.add_answer(Record::from_rdata(
                m.queries[0].name().clone(),
                *ttl,
                RData::A(A::new(192, 0, 2, i as u8 + 1)),
            ));
        }
        if let Some(e) = m.edns {
            let mut edns = Edns::new();
            edns.set_dnssec_ok(e.flags().dnssec_ok);
            r.set_edns(edns);
        }
        r.to_vec().unwrap()
    }

    /// A negative answer (`rcode`) with an SOA of TTL `ttl` and MINIMUM
    /// `minimum` in the authority section.
    fn negative(q: &[u8], rcode: ResponseCode, soa: Option<(u32, u32)>) -> Vec<u8> {
        let m = Message::from_vec(q).unwrap();
        let mut r = Message::response(m.metadata.id, OpCode::Query);
        r.metadata.recursion_desired = true;
        r.metadata.response_code = rcode;
        r.add_query(m.queries[0].clone());
        if let Some((ttl, minimum)) = soa {
            let zone = Name::from_ascii("example.").unwrap();
            r.add_authority(Record::from_rdata(
                zone.clone(),
                ttl,
                RData::SOA(SOA::new(zone.clone(), zone, 1, 2, 3, 4, minimum)),
            ));
        }
        r.to_vec().unwrap()
    }

    fn lookup(c: &Cache, q: &[u8], now: Instant) -> (Lookup, Vec<u8>) {
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        let l = c.lookup(q, Transport::Udp, now, &mut out);
        (l, out)
    }

    fn ttls(bytes: &[u8]) -> Vec<u32> {
        let m = Message::from_vec(bytes).unwrap();
        m.answers
            .iter()
            .chain(&m.authorities)
            .map(|r| r.ttl)
            .collect()
    }

    const FRESH: Lookup = Lookup::Hit {
        refresh: false,
        stale: false,
    };

    #[test]
    fn a_hit_has_the_clients_id_and_case_and_ttls_lowered_by_the_age() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "Www.Example.com.", RecordType::A, None);
        assert!(w.insert(&q, &answer(&q, &[300, 60]), t0));
        let q2 = query(0xBEEF, "wWW.eXAMPLE.COM.", RecordType::A, None);
        let (l, out) = lookup(&c, &q2, t0 + Duration::from_millis(7_500));
        assert_eq!(l, FRESH);
        assert_eq!(out[..2], [0xBE, 0xEF]);
        assert_eq!(out[12..q2.len()], q2[12..]);
        assert_eq!(ttls(&out), [293, 53]);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.answers.len(), 2);
        // Another type, class or name is a miss.
        let other = query(2, "www.example.com.", RecordType::AAAA, None);
        assert_eq!(lookup(&c, &other, t0).0, Lookup::Miss);
        let other = query(2, "ww.example.com.", RecordType::A, None);
        assert_eq!(lookup(&c, &other, t0).0, Lookup::Miss);
        // Expired after the smallest TTL.
        assert_eq!(
            lookup(&c, &q2, t0 + Duration::from_secs(60)).0,
            Lookup::Miss
        );
    }

    #[test]
    fn do_cd_and_edns_make_separate_entries_and_ecs_is_never_cached() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let plain = query(1, "a.example.", RecordType::A, None);
        let edns = query(1, "a.example.", RecordType::A, Some((false, vec![])));
        let dnssec = query(1, "a.example.", RecordType::A, Some((true, vec![])));
        let mut cd = plain.clone();
        cd[3] |= 0x10;
        assert!(w.insert(&dnssec, &answer(&dnssec, &[100]), t0));
        for q in [&plain, &edns, &cd] {
            assert_eq!(lookup(&c, q, t0).0, Lookup::Miss);
        }
        assert_eq!(lookup(&c, &dnssec, t0).0, FRESH);
        assert!(w.insert(&edns, &answer(&edns, &[100]), t0));
        let (l, out) = lookup(&c, &edns, t0);
        assert_eq!(l, FRESH);
        assert!(
            !Message::from_vec(&out)
                .unwrap()
                .edns
                .unwrap()
                .flags()
                .dnssec_ok
        );
        // Client subnet (option 8): neither stored nor answered.
        let ecs_option = vec![0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2];
        let ecs = query(1, "b.example.", RecordType::A, Some((false, ecs_option)));
        assert!(!w.insert(&ecs, &answer(&ecs, &[100]), t0));
        let no_ecs = query(1, "b.example.", RecordType::A, Some((false, vec![])));
        assert!(w.insert(&no_ecs, &answer(&no_ecs, &[100]), t0));
        assert_eq!(lookup(&c, &ecs, t0).0, Lookup::Miss);
        // No recursion desired: not ours to cache.
        let mut no_rd = plain.clone();
        no_rd[2] &= !0x01;
        assert!(!w.insert(&no_rd, &answer(&no_rd, &[100]), t0));
    }

    #[test]
    fn negative_answers_live_for_the_soa_minimum_and_servfail_at_most_5s() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "nx.example.", RecordType::A, None);
        assert!(w.insert(
            &q,
            &negative(&q, ResponseCode::NXDomain, Some((900, 20))),
            t0
        ));
        let (l, out) = lookup(&c, &q, t0 + Duration::from_secs(5));
        assert_eq!(l, FRESH);
        assert_eq!(
            ttls(&out),
            [15],
            "SOA TTL capped at the negative TTL, minus age"
        );
        assert_eq!(lookup(&c, &q, t0 + Duration::from_secs(20)).0, Lookup::Miss);
        // NODATA: the SOA TTL when it is the smaller.
        let q = query(1, "nodata.example.", RecordType::AAAA, None);
        assert!(w.insert(&q, &negative(&q, ResponseCode::NoError, Some((4, 20))), t0));
        let near_expiry = lookup(&c, &q, t0 + Duration::from_millis(3_900)).0;
        assert!(matches!(near_expiry, Lookup::Hit { stale: false, .. }));
        assert_eq!(lookup(&c, &q, t0 + Duration::from_secs(4)).0, Lookup::Miss);
        // Without an SOA: not cached.
        let q = query(1, "nosoa.example.", RecordType::A, None);
        assert!(!w.insert(&q, &negative(&q, ResponseCode::NXDomain, None), t0));
        // SERVFAIL: 5 s.
        let q = query(1, "fail.example.", RecordType::A, None);
        assert!(w.insert(&q, &negative(&q, ResponseCode::ServFail, None), t0));
        assert_eq!(lookup(&c, &q, t0 + Duration::from_millis(4_999)).0, FRESH);
        assert_eq!(lookup(&c, &q, t0 + Duration::from_secs(5)).0, Lookup::Miss);
        assert!(
            !c.has_stale(&q, t0 + Duration::from_secs(5)),
            "a failure is not stale data"
        );
        // REFUSED and friends: never.
        let q = query(1, "refused.example.", RecordType::A, None);
        assert!(!w.insert(&q, &negative(&q, ResponseCode::Refused, None), t0));
    }

    #[test]
    fn ttls_are_capped_truncated_and_zero_ttl_replies_are_not_stored() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "long.example.", RecordType::A, None);
        assert!(w.insert(&q, &answer(&q, &[86_400 * 7]), t0));
        assert_eq!(ttls(&lookup(&c, &q, t0).1), [3600]);
        assert_eq!(
            lookup(&c, &q, t0 + Duration::from_secs(3600)).0,
            Lookup::Miss
        );
        let q = query(1, "zero.example.", RecordType::A, None);
        assert!(!w.insert(&q, &answer(&q, &[0, 100]), t0));
        // The top bit set counts as 0 (RFC 2181 §8).
        assert!(!w.insert(&q, &answer(&q, &[0x8000_0000]), t0));
        let q = query(1, "tc.example.", RecordType::A, None);
        let mut tc = answer(&q, &[100]);
        tc[2] |= 0x02;
        assert!(!w.insert(&q, &tc, t0));
    }

    #[test]
    fn a_hit_larger_than_the_clients_payload_is_truncated() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "big.example.", RecordType::A, Some((false, vec![])));
        let ttls: Vec<u32> = vec![100; 100];
        let reply = answer(&q, &ttls);
        assert!(reply.len() > 1232);
        assert!(w.insert(&q, &reply, t0));
        let (l, out) = lookup(&c, &q, t0);
        assert_eq!(l, FRESH);
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty() && m.edns.is_some());
        // Over TCP the whole answer.
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        c.lookup(&q, Transport::Tcp, t0, &mut out);
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 100);
        // The forwarder's fallback is whole whatever its buffer (the reply
        // path cuts it to the client's size).
        let mut out = Vec::new();
        assert!(c.answer_stale(&q, t0 + Duration::from_secs(101), &mut out));
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 100);
    }

    #[test]
    fn one_hit_near_expiry_asks_for_one_refresh() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "pre.example.", RecordType::A, None);
        assert!(w.insert(&q, &answer(&q, &[100]), t0));
        assert_eq!(lookup(&c, &q, t0 + Duration::from_secs(89)).0, FRESH);
        let refresh = Lookup::Hit {
            refresh: true,
            stale: false,
        };
        let at_90 = t0 + Duration::from_secs(90);
        assert_eq!(lookup(&c, &q, at_90).0, refresh);
        assert_eq!(lookup(&c, &q, at_90 + Duration::from_secs(1)).0, FRESH);
        assert_eq!(lookup(&c, &q, at_90 + REFRESH_RETRY).0, refresh);
        // The refreshed answer starts over.
        let t1 = at_90 + REFRESH_RETRY;
        assert!(w.insert(&q, &answer(&q, &[100]), t1));
        assert_eq!(w.len(), 1);
        assert_eq!(lookup(&c, &q, t1 + Duration::from_secs(50)).0, FRESH);
    }

    #[test]
    fn expired_entries_are_answered_stale_only_after_a_failure_and_within_the_window() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "stale.example.", RecordType::A, None);
        assert!(w.insert(&q, &answer(&q, &[10]), t0));
        let expired = t0 + Duration::from_secs(11);
        assert_eq!(lookup(&c, &q, expired).0, Lookup::Miss);
        assert!(c.has_stale(&q, expired));
        let q2 = query(77, "STALE.example.", RecordType::A, None);
        let mut out = Vec::with_capacity(MAX_MESSAGE_LEN);
        assert!(c.answer_stale(&q2, expired, &mut out));
        assert_eq!(out[..2], [0, 77]);
        assert_eq!(ttls(&out), [STALE_TTL_SECS]);
        // Now the serving threads answer it stale, asking for a refresh.
        let (l, out) = lookup(&c, &q, expired + Duration::from_secs(1));
        assert_eq!(
            l,
            Lookup::Hit {
                refresh: true,
                stale: true
            }
        );
        assert_eq!(ttls(&out), [STALE_TTL_SECS]);
        assert_eq!(
            lookup(&c, &q, expired + STALE_REFRESH).0,
            Lookup::Miss,
            "stale mode ends unless another failure renews it"
        );
        // Beyond the window: nothing.
        let late = t0 + Duration::from_secs(10 + 60);
        assert!(!c.has_stale(&q, late));
        assert!(!c.answer_stale(&q, late, &mut Vec::new()));
        assert_eq!(c.stats.totals().stale_answers, 1);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_size_and_keeps_popular_names() {
        let (c, mut w) = cache(100);
        let t0 = Instant::now();
        let popular: Vec<Vec<u8>> = (0..20)
            .map(|i| query(1, &format!("hot{i}.example."), RecordType::A, None))
            .collect();
        for q in &popular {
            assert!(w.insert(q, &answer(q, &[3000]), t0));
        }
        let mut evicted_popular = 0;
        for i in 0..1000 {
            let q = query(1, &format!("n{i}.example."), RecordType::A, None);
            assert!(w.insert(&q, &answer(&q, &[3000]), t0));
            assert!(w.len() <= 100);
            assert_eq!(c.stats.entries.load(Relaxed), w.len() as u64);
            for q in &popular {
                if lookup(&c, q, t0).0 == Lookup::Miss {
                    evicted_popular += 1;
                    w.insert(q, &answer(q, &[3000]), t0);
                }
            }
        }
        let held = (0..c.slots.len())
            .filter(|&i| c.slots[i].load().is_some())
            .count();
        assert_eq!(held, w.len());
        assert!(held >= 90, "{held}: the cache fills up");
        assert!(c.stats.evictions.load(Relaxed) >= 900);
        // CLOCK keeps what is hit between insertions (set conflicts may
        // cost a few).
        assert!(evicted_popular < 50, "{evicted_popular} popular evictions");
    }

    #[test]
    fn a_flush_forgets_everything_at_once() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "f.example.", RecordType::A, None);
        assert!(w.insert(&q, &answer(&q, &[100]), t0));
        c.flush();
        assert_eq!(lookup(&c, &q, t0).0, Lookup::Miss);
        assert!(!c.has_stale(&q, t0));
        w.maintain();
        assert!(w.is_empty());
        assert_eq!(c.stats.entries.load(Relaxed), 0);
        assert!(w.insert(&q, &answer(&q, &[100]), t0));
        assert_eq!(lookup(&c, &q, t0).0, FRESH);
    }

    #[test]
    fn no_cut_or_corrupted_reply_is_stored_and_nothing_panics() {
        let (c, mut w) = cache(10);
        let t0 = Instant::now();
        let q = query(1, "cut.example.", RecordType::A, Some((true, vec![])));
        let full = answer(&q, &[100, 200]);
        for len in 0..full.len() {
            assert!(!w.insert(&q, &full[..len], t0), "cut at {len}");
        }
        let mut rng = fastrand::Rng::with_seed(13);
        for _ in 0..2000 {
            let mut bad = full.clone();
            for _ in 0..3 {
                let i = rng.usize(..bad.len());
                bad[i] = rng.u8(..);
            }
            w.insert(&q, &bad, t0);
            let mut junk = q.clone();
            let i = rng.usize(..junk.len());
            junk[i] = rng.u8(..);
            lookup(&c, &junk, t0);
        }
    }

    #[test]
    fn stats_render_every_metric_with_help_and_type() {
        let (c, _w) = cache(10);
        let mut out = String::new();
        c.stats.render(&mut out);
        for name in [
            "glued_cache_entries",
            "glued_cache_hits_total",
            "glued_cache_misses_total",
            "glued_cache_stale_answers_total",
            "glued_cache_evictions_total",
            "glued_cache_prefetches_total",
        ] {
            assert!(out.contains(&format!("# HELP {name} ")), "{name}");
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(out.contains(&format!("\n{name} 0\n")), "{name}");
        }
    }

    #[test]
    fn size_zero_is_no_cache() {
        let config = CacheConfig {
            size: 0,
            ..CacheConfig::default()
        };
        assert!(Cache::new(config, Arc::default()).is_none());
    }
}
