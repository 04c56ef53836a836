//! The UDP sockets under QUIC endpoints, with socket buffers large enough for bursts.
//!
//! Linux gives a UDP socket 208 KiB of receive buffer by default (`net.core.rmem_default`).
//! A QUIC connection that carries a burst larger than that (a peer's replies to a wave of
//! inbox reads, a replication batch) loses datagrams at the receiving socket, and QUIC's loss
//! recovery then slows the whole connection, replication included. The kernel caps what a
//! process may ask for at `net.core.rmem_max` / `wmem_max`; [`bind`] asks for
//! [`SOCKET_BUFFER`] and says when it got less.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// The send and receive buffer each QUIC socket asks for: a few milliseconds of a busy
/// node's traffic, and what QUIC stacks commonly recommend.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// The buffer sizes a socket got, as the kernel reports them (Linux reports twice what it
/// grants for its own bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    pub recv: usize,
    pub send: usize,
}

/// Binds a UDP socket at `addr` with [`SOCKET_BUFFER`] of send and receive buffer (or what the
/// kernel allows; see the module docs). `what` names the socket in the warning when the
/// kernel granted less.
pub fn bind(addr: SocketAddr, what: &str) -> io::Result<(std::net::UdpSocket, Buffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As std's bind does: an IPv6 address takes IPv6 only unless it says otherwise.
        socket.set_only_v6(true)?;
    }
    // Failing to enlarge a buffer is not fatal: the default still works, more slowly.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    let buffers = Buffers {
        recv: socket.recv_buffer_size()?,
        send: socket.send_buffer_size()?,
    };
    if buffers.recv < SOCKET_BUFFER || buffers.send < SOCKET_BUFFER {
        tracing::warn!(
            socket = what,
            recv_bytes = buffers.recv,
            send_bytes = buffers.send,
            wanted_bytes = SOCKET_BUFFER,
            "the kernel granted smaller UDP buffers than asked for (raise net.core.rmem_max and \
             net.core.wmem_max): bursts may lose datagrams and slow QUIC down"
        );
    }
    Ok((socket.into(), buffers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_asks_for_large_buffers_and_reports_what_it_got() {
        let (socket, buffers) = bind("127.0.0.1:0".parse().unwrap(), "test").unwrap();
        assert!(socket.local_addr().unwrap().port() > 0);
        // The kernel grants what was asked for up to its cap (and reports twice that); the
        // default (208 KiB, reported doubled) is below the cap on any host that raised it.
        let cap = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
        };
        if let (Some(rmem), Some(wmem)) = (cap("rmem_max"), cap("wmem_max")) {
            assert!(
                buffers.recv >= SOCKET_BUFFER.min(rmem),
                "{buffers:?}, cap {rmem}"
            );
            assert!(
                buffers.send >= SOCKET_BUFFER.min(wmem),
                "{buffers:?}, cap {wmem}"
            );
        }
        assert!(buffers.recv >= 200 << 10, "{buffers:?}");
        assert!(buffers.send >= 200 << 10, "{buffers:?}");
        // It sends and receives.
        let (peer, _) = bind("127.0.0.1:0".parse().unwrap(), "test").unwrap();
        socket.send_to(b"hi", peer.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
    }
}
