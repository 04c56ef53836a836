//! One chaos run at a time on this machine: every run uses the same node addresses
//! (127.0.0.10 and up) and the same iptables chain name, so runs, whether test threads of one
//! process or separate processes, take turns.
//!
//! The lock is a bound abstract Unix socket: the kernel frees it when the holder exits,
//! however it exits, so a crashed run never leaves a stale lock behind.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const NAME: &[u8] = b"chatnode-chaos-run-lock";
/// How long to wait for another run to finish.
const WAIT: Duration = Duration::from_secs(3600);

/// Held for the length of a run.
pub struct RunLock {
    _socket: UnixListener,
}

impl RunLock {
    /// Waits until no other run holds the lock, then takes it.
    pub async fn acquire() -> Result<RunLock> {
        let addr = SocketAddr::from_abstract_name(NAME).context("name the run lock")?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match UnixListener::bind_addr(&addr) {
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
