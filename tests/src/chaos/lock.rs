//! One chaos run at a time on this machine: every run uses the same node addresses
//! (127.0.0.10 and up), and a partition's iptables rules between them would cut another
//! run's cluster too; so runs, whether test threads of one process or separate processes,
//! take turns. Holding the lock also makes every `CHAOS*` chain found at start a leftover.
//!
//! The lock is a bound abstract Unix socket: the kernel frees it when the holder exits,
//! however it exits, so a crashed run never leaves a stale lock behind.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const NAME: &[u8] = b"chatnode-chaos-run-lock";
/// How long to wait for another run to finish.
const WAIT: Duration = Duration::from_secs(3600);

/// Held for the length of a run.
pub struct RunLock {
    _socket: Socket,
}

#[cfg(target_os = "linux")]
type Socket = std::os::unix::net::UnixListener;
#[cfg(not(target_os = "linux"))]
type Socket = std::net::TcpListener;

/// Binds the lock's address: an abstract socket on Linux; elsewhere (where chaos runs are
/// skipped anyway) a fixed loopback port.
fn bind() -> std::io::Result<Socket> {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME)?;
        std::os::unix::net::UnixListener::bind_addr(&addr)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = NAME;
        std::net::TcpListener::bind(("127.0.0.1", 39_217))
    }
}

impl RunLock {
    /// Waits until no other run holds the lock, then takes it.
    pub async fn acquire() -> Result<RunLock> {
        let started = Instant::now();
        let mut told = false;
        loop {
            match bind() {
                Ok(socket) => return Ok(RunLock { _socket: socket }),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if !told {
                        eprintln!("chaos: waiting for another chaos run to finish");
                        told = true;
                    }
                    if started.elapsed() > WAIT {
                        bail!("another chaos run held the lock for over {WAIT:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).context("bind the run lock"),
            }
        }
    }
}
