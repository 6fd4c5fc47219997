//! The kernel's floor for a UDP DNS server: receive a batch of datagrams
//! with one `recvmmsg`, flip the QR bit of each, and send them all back to
//! their senders with one `sendmmsg`. No parsing, no table, no allocation
//! in the loop: whatever CPU this costs per query is the cost of the
//! system calls and the loopback path, which no real server can beat.
//!
//! With `N` > 1, `N` processes (forked) each bind their own `SO_REUSEPORT`
//! socket to the address, as a server with `N` serving threads would.
//!
//! Usage: `dns-echo 127.0.0.1:5300 [N]`

use std::mem::{MaybeUninit, size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};

/// Datagrams per system call.
const BATCH: usize = 64;
/// Largest datagram kept; longer ones are echoed truncated.
const BUF_LEN: usize = 1500;
/// Flags byte of the DNS header holding QR.
const FLAGS_BYTE: usize = 2;
/// The QR ("this is a response") bit in that byte.
const QR_BIT: u8 = 0x80;

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5300".to_string())
        .parse()
        .expect("usage: dns-echo IP:PORT [N]");
    let n_procs: usize = std::env::args()
        .nth(2)
        .map_or(1, |n| n.parse().expect("usage: dns-echo IP:PORT [N]"));
    // The children share nothing with the parent but the port.
    for _ in 1..n_procs {
        // SAFETY: no thread has been started yet; the child goes on alone.
        match unsafe { libc::fork() } {
            0 => break,
            -1 => panic!("fork failed"),
            _ => {}
        }
    }
    serve(addr);
}

/// Binds a `SO_REUSEPORT` socket to `addr` and echoes forever.
fn serve(addr: SocketAddr) {
    let sock = bind_reuseport(addr);
    let fd = sock.as_raw_fd();
    eprintln!(
        "dns-echo listening on {} (pid {})",
        sock.local_addr().unwrap(),
        std::process::id()
    );

    let mut bufs = vec![[0u8; BUF_LEN]; BATCH];
    // SAFETY: all-zero sockaddr_storage / iovec / mmsghdr are valid values.
    let mut addrs: Vec<libc::sockaddr_storage> = (0..BATCH).map(|_| unsafe { zeroed() }).collect();
    let mut iovs: Vec<libc::iovec> = (0..BATCH).map(|_| unsafe { zeroed() }).collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { zeroed() }).collect();

    loop {
        for i in 0..BATCH {
            iovs[i].iov_base = bufs[i].as_mut_ptr().cast();
            iovs[i].iov_len = BUF_LEN;
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            msgs[i].msg_len = 0;
        }
        // SAFETY: msgs points at BATCH initialised headers whose buffers live
        // as long as this loop iteration.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut::<MaybeUninit<libc::timespec>>().cast(),
            )
        };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            let len = msgs[i].msg_len as usize;
            if len > FLAGS_BYTE {
                bufs[i][FLAGS_BYTE] |= QR_BIT;
            }
            // Send back exactly what was received; the address and its
            // length were filled in by recvmmsg.
            iovs[i].iov_len = len;
        }
        let mut sent = 0usize;
        while sent < n {
            // SAFETY: same buffers as above, first `n` entries filled.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr().add(sent),
                    (n - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                break; // drop the rest of the batch, like a full socket would
            }
            sent += r as usize;
        }
    }
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT` set before the bind.
fn bind_reuseport(addr: SocketAddr) -> UdpSocket {
    let SocketAddr::V4(v4) = addr else {
        panic!("dns-echo: IPv4 addresses only");
    };
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // sockaddr_in is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket");
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut sin: libc::sockaddr_in = zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = v4.port().to_be();
        sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        let r = libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert!(r == 0, "bind {addr}: {}", std::io::Error::last_os_error());
        UdpSocket::from_raw_fd(fd)
    }
}
