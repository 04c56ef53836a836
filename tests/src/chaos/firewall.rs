//! Partitions with iptables, between the nodes' loopback addresses only.
//!
//! Every rule lives in one chain named after the runner's pid (`CHAOS<pid>`), jumped to from
//! `INPUT`: every loopback packet passes there on its way in, and a packet dropped there
//! vanishes silently as on a real network (dropped in `OUTPUT`, the sender's `sendmsg` would
//! fail at once with EPERM, which no real partition does). [`Firewall::isolate`] makes the chain and
//! the jump; the returned [`Partition`] guard removes both when healed, dropped or unwound
//! by a panic. [`Firewall::probe`] first removes `CHAOS*` chains left by runs that died
//! without cleaning up, and tells why partitions cannot run when iptables is missing or not
//! permitted. Nothing else of the host's firewall is touched.

use std::net::Ipv4Addr;
use std::process::Command;

/// iptables, known to work here.
#[derive(Debug)]
pub struct Firewall {
    chain: String,
}

/// An active partition; healing (or dropping) it removes its rules.
#[derive(Debug)]
pub struct Partition {
    chain: String,
    active: bool,
}

/// Runs `iptables -w <args>`; the error says what failed.
fn iptables(args: &[&str]) -> Result<String, String> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes the jumps to `chain` from the built-in chains, then the chain itself.
fn remove_chain(chain: &str) -> Result<(), String> {
    for parent in ["OUTPUT", "INPUT"] {
        // Bounded: each round removes one jump.
        for _ in 0..100 {
            if iptables(&["-D", parent, "-j", chain]).is_err() {
                break;
            }
        }
    }
    iptables(&["-F", chain])?;
    iptables(&["-X", chain])?;
    Ok(())
}

/// Whether `pid` is a live chaos runner (a process whose command line mentions chaos).
fn live_runner(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("chaos"))
}

impl Firewall {
    /// Checks that iptables can make and remove a chain here, after removing the `CHAOS*`
    /// chains of dead runs (and of this process: the run lock is held, so no partition of
    /// this process is active). `Err` says why partitions cannot run.
    pub fn probe() -> Result<Firewall, String> {
        let rules = iptables(&["-S"])?;
        let me = std::process::id();
        for line in rules.lines() {
            let Some(chain) = line.strip_prefix("-N ") else {
                continue;
            };
            let Some(pid) = chain.strip_prefix("CHAOS") else {
                continue;
            };
            let pid: Option<u32> = pid.parse().ok();
            if pid.is_some_and(|p| p != me && live_runner(p)) {
                continue;
            }
            match remove_chain(chain) {
                Ok(()) => eprintln!("chaos: removed the iptables chain {chain} of a dead run"),
                Err(e) => eprintln!("chaos: cannot remove the leftover chain {chain}: {e}"),
            }
        }
        let chain = format!("CHAOS{me}");
        iptables(&["-N", &chain])?;
        iptables(&["-X", &chain])?;
        Ok(Firewall { chain })
    }

    /// Drops every packet between `node` and each of `others`, both ways.
    pub fn isolate(&self, node: Ipv4Addr, others: &[Ipv4Addr]) -> Result<Partition, String> {
        let chain = &self.chain;
        iptables(&["-N", chain])?;
        let partition = Partition {
            chain: chain.clone(),
            active: true,
        };
        let node = node.to_string();
        for other in others.iter().map(Ipv4Addr::to_string) {
            for (src, dst) in [(&node, &other), (&other, &node)] {
                iptables(&["-A", chain, "-s", src, "-d", dst, "-j", "DROP"])?;
            }
        }
        iptables(&["-I", "INPUT", "1", "-j", chain])?;
        Ok(partition)
    }
}

impl Partition {
    /// Removes the rules.
    pub fn heal(mut self) -> Result<(), String> {
        self.active = false;
        remove_chain(&self.chain)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = remove_chain(&self.chain) {
                eprintln!(
                    "chaos: cannot remove the iptables chain {}: {e}",
                    self.chain
                );
            }
        }
    }
}
