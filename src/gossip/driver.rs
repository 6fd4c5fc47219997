//! How the gossip loop carries out the replication core's outputs over
//! iroh (protocol v4): the core's direct messages (`core::Direct`: probes,
//! digests) and its transfers (a pull names the origins it wants; the
//! holder answers with the signed messages it holds of them) travel on
//! [`CORE_ALPN`] streams between admitted peers (the endpoint hooks gate
//! the ALPN on admission, like gossip's).
//!
//! One bidirectional stream per request, on a connection kept per peer
//! ([`Conns`], closed by QUIC's idle timeout or by an admission's end): a
//! kind byte, the postcard body, the end of the stream; a direct message is
//! answered by a one-byte receipt, a pull by frames (`u32` big-endian length ‖ sealed message) up to
//! [`wire::MAX_STREAM_BYTES`]. Nothing received here reaches the core
//! before the loop verified it: a direct message is taken as said by the
//! connection's authenticated peer; every frame of a transfer is opened
//! (`wire::open`: HMAC, origin's signature) by the loop.

use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr, EndpointId};

use super::auth::CORE_ALPN;
use super::core::{Direct, NodeId, RegistryOp, Signed};
use super::transfer::Want;
use super::wire::{self, Change, Opened, Payload};
use crate::registry::RegistryMsg;
use crate::table::Origin;

/// First byte of a request: a `core::Direct` follows.
pub const KIND_DIRECT: u8 = 1;
/// First byte of a request: a `transfer::Want` follows.
pub const KIND_PULL: u8 = 2;
/// Largest direct message accepted (a full digest of a large fleet).
pub const MAX_DIRECT_BYTES: usize = 1024 * 1024;
/// Largest pull request accepted (`transfer::MAX_PULL_ORIGINS` ids).
pub const MAX_WANT_BYTES: usize = 256 * 1024;
/// Longest a peer may take to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a direct message may take, connection included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a transfer may take (below `transfer::PULL_DEADLINE`, so the
/// core always hears how it ended).
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest the loop may take to gather what a pull asks for.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Direct messages in flight at once; more are dropped (the core retries
/// probes and digests on its own timers).
pub const MAX_SENDS: usize = 64;
/// Inbox of direct messages received, and of pulls to serve.
pub const DIRECT_INBOX: usize = 256;
pub const SERVE_INBOX: usize = 16;
/// QUIC close code of a request that was too slow or malformed.
pub const BAD_REQUEST_CODE: u32 = 400;
/// QUIC close code of a pull the loop could not serve in time.
pub const BUSY_CODE: u32 = 503;

/// Most requests served at once on one connection.
pub const MAX_STREAMS_PER_CONN: usize = 8;

/// Open connections to peers on [`CORE_ALPN`], reused by every request.
#[derive(Clone, Default)]
pub struct Conns(Arc<std::sync::Mutex<std::collections::HashMap<EndpointId, Connection>>>);

impl Conns {
    /// A live connection to `to`, dialled when there is none.
    pub async fn get(&self, endpoint: &Endpoint, to: EndpointId) -> Result<Connection, String> {
        if let Some(c) = self.0.lock().expect("conns lock").get(&to)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = endpoint
            .connect(EndpointAddr::new(to), CORE_ALPN)
            .await
            .map_err(|e| e.to_string())?;
        let mut map = self.0.lock().expect("conns lock");
        map.retain(|_, c| c.close_reason().is_none());
        map.insert(to, conn.clone());
        Ok(conn)
    }

    /// Forgets a connection that failed.
    pub fn failed(&self, to: &EndpointId) {
        if let Some(c) = self.0.lock().expect("conns lock").remove(to) {
            c.close(0u32.into(), b"failed");
        }
    }
}

/// A pull to serve: what is wanted, and where the loop puts the answer.
pub type ServeRequest = (Want, tokio::sync::oneshot::Sender<Vec<Arc<[u8]>>>);

/// Server side of [`CORE_ALPN`].
#[derive(Clone)]
pub struct CoreHandler {
    pub direct: tokio::sync::mpsc::Sender<(EndpointId, Direct)>,
    pub serve: tokio::sync::mpsc::Sender<ServeRequest>,
}

impl std::fmt::Debug for CoreHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreHandler")
    }
}

impl ProtocolHandler for CoreHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        // One request per stream, several at once, until the peer closes
        // the connection or QUIC's idle timeout does.
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS_PER_CONN));
        while let Ok((send, recv)) = conn.accept_bi().await {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            let from = conn.remote_id();
            tokio::spawn(async move {
                let _permit = permit;
                this.serve_stream(from, send, recv).await;
            });
        }
        Ok(())
    }
}

impl CoreHandler {
    async fn serve_stream(
        &self,
        from: EndpointId,
        mut send: iroh::endpoint::SendStream,
        mut recv: iroh::endpoint::RecvStream,
    ) {
        let request = async {
            let mut kind = [0u8; 1];
            recv.read_exact(&mut kind).await.ok()?;
            let limit = if kind[0] == KIND_PULL {
                MAX_WANT_BYTES
            } else {
                MAX_DIRECT_BYTES
            };
            let body = recv.read_to_end(limit).await.ok()?;
            Some((kind[0], body))
        };
        let Ok(Some((kind, body))) = tokio::time::timeout(REQUEST_TIMEOUT, request).await else {
            let _ = send.reset(BAD_REQUEST_CODE.into());
            return;
        };
        match kind {
            KIND_DIRECT => {
                if let Ok(msg) = postcard::from_bytes::<Direct>(&body) {
                    let _ = self.direct.try_send((from, msg));
                }
                let _ = tokio::time::timeout(SEND_TIMEOUT, send.write_all(&[1])).await;
                let _ = send.finish();
            }
            KIND_PULL => {
                let Ok(want) = postcard::from_bytes::<Want>(&body) else {
                    let _ = send.reset(BAD_REQUEST_CODE.into());
                    return;
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                if self.serve.try_send((want, tx)).is_err() {
                    let _ = send.reset(BUSY_CODE.into());
                    return;
                }
                let Ok(Ok(msgs)) = tokio::time::timeout(SERVE_TIMEOUT, rx).await else {
                    let _ = send.reset(BUSY_CODE.into());
                    return;
                };
                let bytes = frame(&msgs, wire::MAX_STREAM_BYTES);
                match tokio::time::timeout(TRANSFER_TIMEOUT, send.write_all(&bytes)).await {
                    Ok(Ok(())) => {
                        let _ = send.finish();
                    }
                    _ => {
                        let _ = send.reset(BAD_REQUEST_CODE.into());
                    }
                }
            }
            _ => {
                let _ = send.reset(BAD_REQUEST_CODE.into());
            }
        }
    }
}

/// Frames sealed messages for a transfer, stopping before `limit` bytes.
pub fn frame(msgs: &[Arc<[u8]>], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(msgs.iter().map(|m| m.len() + 4).sum::<usize>().min(limit));
    for m in msgs {
        if out.len() + 4 + m.len() > limit {
            break;
        }
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// Splits a transfer into its frames; `None` when a frame is cut short.
pub fn unframe(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let frame = bytes.get(4..4usize.checked_add(len)?)?;
        out.push(frame);
        bytes = &bytes[4 + len..];
    }
    Some(out)
}

/// One request on a stream of a kept connection; the whole answer.
async fn request(
    conns: &Conns,
    endpoint: &Endpoint,
    to: EndpointId,
    kind: u8,
    body: &[u8],
    max_answer: usize,
) -> Result<Vec<u8>, String> {
    let conn = conns.get(endpoint, to).await?;
    let go = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&[kind]).await.map_err(|e| e.to_string())?;
        send.write_all(body).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        recv.read_to_end(max_answer)
            .await
            .map_err(|e| e.to_string())
    };
    let result = go.await;
    if result.is_err() {
        conns.failed(&to);
    }
    result
}

/// Sends one direct message to `to` and waits for its receipt.
pub async fn send_direct(
    conns: &Conns,
    endpoint: &Endpoint,
    to: EndpointId,
    msg: &Direct,
) -> Result<(), String> {
    let bytes = postcard::to_allocvec(msg).map_err(|e| e.to_string())?;
    match request(conns, endpoint, to, KIND_DIRECT, &bytes, 1).await?[..] {
        [1] => Ok(()),
        _ => Err("no receipt".into()),
    }
}

/// Asks `from` for what `want` names; returns the raw transfer.
pub async fn pull(
    conns: &Conns,
    endpoint: &Endpoint,
    from: EndpointId,
    want: &Want,
) -> Result<Vec<u8>, String> {
    let bytes = postcard::to_allocvec(want).map_err(|e| e.to_string())?;
    request(
        conns,
        endpoint,
        from,
        KIND_PULL,
        &bytes,
        wire::MAX_STREAM_BYTES,
    )
    .await
}

/// A verified v4 message as the core takes it; `None` for anything that is
/// not a core message.
pub fn signed(opened: Opened, raw: &[u8]) -> Option<Signed> {
    let Payload::Core(body) = opened.header.payload else {
        return None;
    };
    Some(Signed {
        origin: opened.header.origin,
        node_name: opened.header.node_name.into(),
        incarnation: opened.header.incarnation,
        body,
        raw: raw.into(),
    })
}

/// The registry's name for an origin: its endpoint id as iroh prints it.
pub fn origin_id(id: &NodeId) -> String {
    match EndpointId::from_bytes(id) {
        Ok(id) => id.to_string(),
        Err(_) => super::core::hex(id),
    }
}

/// The registry messages that carry out one registry operation.
pub fn registry_msgs(op: RegistryOp, mut out: impl FnMut(RegistryMsg)) {
    match op {
        RegistryOp::Replace {
            origin,
            node_name,
            groups,
        } => out(RegistryMsg::Replace {
            origin: Origin {
                id: origin_id(&origin).into(),
                node_name,
            },
            kind: None,
            groups: groups
                .into_iter()
                .map(|(s, g)| (s.into(), g.into()))
                .collect(),
        }),
        RegistryOp::Apply {
            origin,
            node_name,
            changes,
        } => {
            let origin = Origin {
                id: origin_id(&origin).into(),
                node_name,
            };
            for c in changes {
                out(match c {
                    Change::Upsert(s, g) => RegistryMsg::Upsert {
                        origin: origin.clone(),
                        source: s.into(),
                        group: g.into(),
                    },
                    Change::Remove(s) => RegistryMsg::Remove {
                        origin: origin.clone(),
                        source: s.into(),
                    },
                });
            }
        }
        RegistryOp::Drop { origin } => out(RegistryMsg::DropOrigin {
            id: origin_id(&origin),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_stop_at_the_limit() {
        let msgs: Vec<Arc<[u8]>> = vec![vec![1u8; 10].into(), vec![2u8; 3].into()];
        let bytes = frame(&msgs, 1024);
        let back = unframe(&bytes).unwrap();
        assert_eq!(back, vec![&[1u8; 10][..], &[2u8; 3][..]]);
        // The second frame does not fit: only the first is sent.
        assert_eq!(unframe(&frame(&msgs, 16)).unwrap().len(), 1);
    }

    #[test]
    fn a_cut_transfer_is_refused_whole() {
        let msgs: Vec<Arc<[u8]>> = vec![vec![1u8; 10].into()];
        let bytes = frame(&msgs, 1024);
        for cut in 1..bytes.len() {
            assert_eq!(unframe(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(unframe(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(unframe(&[]), Some(vec![]));
    }
}
