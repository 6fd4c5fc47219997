//! TCP retries: a small fixed pool of worker threads that re-ask an upstream
//! over TCP when its UDP answer came back truncated.
//!
//! Invariant: the forwarding thread only ever `try_send`s to this pool, so
//! a slow TCP upstream cannot stall UDP forwarding; every exchange is bounded
//! by [`TCP_EXCHANGE_TIMEOUT`], and a worker notices a stop within
//! [`TCP_IO_SLICE`] (or [`TCP_CONNECT_TIMEOUT`] while connecting).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use super::stats::{ForwardStats, UpstreamStats};
use super::{Waiter, deliver_answer, wire};

/// Worker threads doing TCP retries.
pub const TCP_WORKERS: usize = 4;
/// Retries waiting for a worker; beyond, the truncated answer is passed on.
pub const TCP_QUEUE_CAPACITY: usize = 64;
/// Longest wait for a TCP connection to an upstream.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest whole exchange (connect, write, read) with an upstream.
pub const TCP_EXCHANGE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Reads wait at most this long before checking for a stop.
pub const TCP_IO_SLICE: Duration = Duration::from_millis(100);

/// One truncated answer to retry over TCP.
pub struct TcpJob {
    pub upstream: Arc<UpstreamStats>,
    /// The relayed query, carrying the forwarder's id.
    pub query: Vec<u8>,
    /// The clients waiting for the answer (several when identical queries
    /// were merged).
    pub(super) waiters: Vec<Waiter>,
    /// The truncated UDP answer (forwarder's id), the fallback.
    pub truncated: Vec<u8>,
}

/// Starts the workers; they exit when every sender is dropped or `stopping`
/// is set.
pub fn spawn(
    stats: Arc<ForwardStats>,
    stopping: Arc<AtomicBool>,
) -> io::Result<(Sender<TcpJob>, Vec<JoinHandle<()>>)> {
    let (tx, rx) = bounded(TCP_QUEUE_CAPACITY);
    let mut handles = Vec::with_capacity(TCP_WORKERS);
    for n in 0..TCP_WORKERS {
        let (rx, stats, stopping) = (rx.clone(), stats.clone(), stopping.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("glued-fwd-tcp-{n}"))
                .spawn(move || worker(rx, stats, stopping))?,
        );
    }
    Ok((tx, handles))
}

/// Hands a job to the pool; gives it back when the pool is saturated.
pub fn try_submit(tx: &Sender<TcpJob>, job: TcpJob) -> Option<TcpJob> {
    match tx.try_send(job) {
        Ok(()) => None,
        Err(TrySendError::Full(j) | TrySendError::Disconnected(j)) => Some(j),
    }
}

fn worker(rx: Receiver<TcpJob>, stats: Arc<ForwardStats>, stopping: Arc<AtomicBool>) {
    let mut scratch = Vec::new();
    while let Ok(job) = rx.recv() {
        if stopping.load(Relaxed) {
            return;
        }
        job.upstream.tcp_queries.fetch_add(1, Relaxed);
        let mut answer = match exchange(job.upstream.addr, &job.query, &stopping) {
            Ok(answer) => answer,
            Err(e) => {
                log::debug!("TCP retry to upstream {} failed: {e}", job.upstream.addr);
                job.upstream.tcp_failures.fetch_add(1, Relaxed);
                job.truncated
            }
        };
        deliver_answer(&stats, &mut answer, &job.waiters, &mut scratch);
    }
}

/// Asks `query` over TCP and returns the answer, checked to match it (id,
/// QR, question byte for byte).
pub fn exchange(upstream: SocketAddr, query: &[u8], stopping: &AtomicBool) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + TCP_EXCHANGE_TIMEOUT;
    let mut stream = TcpStream::connect_timeout(&upstream, TCP_CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    let len = u16::try_from(query.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut framed = Vec::with_capacity(2 + query.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    read_exact(&mut stream, &mut len, deadline, stopping)?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    read_exact(&mut stream, &mut answer, deadline, stopping)?;
    if wire::id(&answer) != wire::id(query)
        || !wire::is_response(&answer)
        || !wire::same_question(query, &answer)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "answer does not match the query",
        ));
    }
    Ok(answer)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

/// `read_exact` in slices of [`TCP_IO_SLICE`], giving up at `deadline` or
/// when `stopping` is set.
fn read_exact(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    stopping: &AtomicBool,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        if stopping.load(Relaxed) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        stream.set_read_timeout(Some(remaining(deadline)?.min(TCP_IO_SLICE)))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
