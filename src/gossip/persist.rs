//! The last verified states of remote origins, kept in the data dir so that
//! a restarted node serves the cluster's records at once (SPEC §7) instead
//! of NXDOMAIN until its first pulls finish.
//!
//! What is stored are the sealed messages exactly as received (each
//! origin's signed `Alive`, `FullState` and the deltas after it, what
//! [`super::core::Core::serve`] hands to a pulling peer). Nothing in the
//! file is trusted: at start every message goes through [`super::wire::open`]
//! (version, HMAC under the current keyring, the origin's signature) like
//! one from the network, so a file written under a removed key, edited, or
//! cut short by a crash yields fewer messages, never wrong records.
//!
//! Format: [`MAGIC`] then, per message, its length (u32, little endian) and
//! its bytes. Written to a temporary file (mode 0600), synced, then renamed
//! over [`STATES_FILE`], so a reader sees the old file or the new one.
//! Bounded: at most [`MAX_STATES_BYTES`] in all and [`MAX_MESSAGE_BYTES`]
//! per message; a longer file is read up to the bound.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// File name under the data dir.
pub const STATES_FILE: &str = "remote-states";
/// First bytes of the file (format version 1).
pub const MAGIC: &[u8; 8] = b"GLUEDRS1";
/// Most bytes read from or written to the file.
pub const MAX_STATES_BYTES: usize = 64 * 1024 * 1024;
/// Longest single message kept (a full state over a direct stream).
pub const MAX_MESSAGE_BYTES: usize = super::wire::MAX_STREAM_BYTES;
/// Least time between two writes of the file (the driver's timer).
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// Path of the states file in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATES_FILE)
}

/// Encodes `msgs` in the file format, stopping before the message that
/// would take the whole past [`MAX_STATES_BYTES`] (the caller lists the
/// most useful first). Returns the bytes and how many messages they hold.
pub fn encode<'a>(msgs: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(MAGIC);
    let mut n = 0;
    for m in msgs {
        if m.is_empty() || m.len() > MAX_MESSAGE_BYTES {
            continue;
        }
        if out.len() + 4 + m.len() > MAX_STATES_BYTES {
            break;
        }
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
        n += 1;
    }
    (out, n)
}

/// Decodes the file format: every whole message before the first
/// malformed or cut one. Never panics; a wrong magic gives nothing.
pub fn decode(bytes: &[u8]) -> Vec<Arc<[u8]>> {
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        if len == 0 || len > MAX_MESSAGE_BYTES || len > tail.len() {
            break;
        }
        out.push(Arc::from(&tail[..len]));
        rest = &tail[len..];
    }
    out
}

/// Writes `msgs` to the states file of `data_dir` atomically (temporary
/// file, sync, rename). Returns how many messages were written.
pub fn save<'a>(data_dir: &Path, msgs: impl IntoIterator<Item = &'a [u8]>) -> io::Result<usize> {
    use std::os::unix::fs::OpenOptionsExt;
    let (bytes, n) = encode(msgs);
    let target = path(data_dir);
    let tmp = target.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = f.write_all(&bytes).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, &target)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(n)
}

/// Reads the states file of `data_dir` (at most [`MAX_STATES_BYTES`]):
/// the messages still to be verified. A missing or unreadable file gives
/// none.
pub fn load(data_dir: &Path) -> Vec<Arc<[u8]>> {
    let Ok(f) = std::fs::File::open(path(data_dir)) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if f.take(MAX_STATES_BYTES as u64)
        .read_to_end(&mut bytes)
        .is_err()
    {
        return Vec::new();
    }
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Vec<u8>> {
        vec![vec![1; 10], vec![2; 3000], vec![3; 1]]
    }

    #[test]
    fn saved_messages_load_back_in_order_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = msgs();
        assert_eq!(save(dir.path(), m.iter().map(|v| v.as_slice())).unwrap(), 3);
        let back: Vec<Vec<u8>> = load(dir.path()).iter().map(|v| v.to_vec()).collect();
        assert_eq!(back, m);
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second save replaces the first and leaves no temporary file.
        save(dir.path(), [[9u8; 4].as_slice()]).unwrap();
        assert_eq!(load(dir.path()).len(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_file_loads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
    }

    #[test]
    fn a_cut_or_corrupt_file_yields_the_whole_messages_before_the_damage() {
        let m = msgs();
        let (bytes, _) = encode(m.iter().map(|v| v.as_slice()));
        // Cut inside the second message: only the first survives.
        let cut = MAGIC.len() + 4 + 10 + 4 + 100;
        assert_eq!(decode(&bytes[..cut]).len(), 1);
        // Every prefix and every single flipped byte decodes without panic
        // to at most the three messages.
        for n in 0..bytes.len().min(64) {
            assert!(decode(&bytes[..n]).len() <= 3);
        }
        for i in 0..bytes.len().min(64) {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            assert!(decode(&b).len() <= 3);
        }
        // Another file format: nothing.
        assert!(decode(b"not a states file").is_empty());
        let mut zero = MAGIC.to_vec();
        zero.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode(&zero).is_empty());
    }

    #[test]
    fn empty_and_oversized_messages_are_not_written() {
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        let (bytes, n) = encode([[].as_slice(), huge.as_slice(), [7u8].as_slice()]);
        assert_eq!(n, 1);
        assert_eq!(decode(&bytes).len(), 1);
    }
}
