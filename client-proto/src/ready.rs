//! The `chatnode ready` line: the one line a node logs once it serves, saying where it
//! listens. Programs that start a node (the bench's `--spawn-node`, the test harness) read
//! its log for this line to learn the ports it bound. The node builds the line with
//! [`ReadyLine`]'s `Display` and readers parse it with [`ReadyLine::parse`], so both sides
//! share one format:
//!
//! ```text
//! chatnode ready node_id=N http=ADDR quic=ADDR peer=ADDR gossip=ADDR data_dir=PATH
//! ```
//!
//! `data_dir` comes last and runs to the end of the line, so a path may contain spaces.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What a node's ready line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyLine {
    /// The node's id (`--node-id`).
    pub node_id: u16,
    /// The bound HTTP and WebSocket address (the real port when `:0` was asked for).
    pub http: SocketAddr,
    /// The bound client QUIC address.
    pub quic: SocketAddr,
    /// The peer (node-to-node) address.
    pub peer: SocketAddr,
    /// The gossip address.
    pub gossip: SocketAddr,
    /// The node's data dir.
    pub data_dir: PathBuf,
}

impl ReadyLine {
    /// The words that mark the line.
    pub const MARKER: &'static str = "chatnode ready";

    /// Reads a ready line out of one line of the node's log. Whatever the log formatter put
    /// before the marker (timestamp, level, span names) is skipped; the line must be free of
    /// ANSI colour codes after the marker. `None` when the line is not a ready line or a field
    /// is missing or malformed.
    pub fn parse(line: &str) -> Option<ReadyLine> {
        let (_, rest) = line.split_once(Self::MARKER)?;
        let (fields, data_dir) = rest.split_once(" data_dir=")?;
        let data_dir = data_dir.trim_end();
        if data_dir.is_empty() {
            return None;
        }
        let (mut node_id, mut http, mut quic, mut peer, mut gossip) =
            (None, None, None, None, None);
        for field in fields.split_whitespace() {
            let (name, value) = field.split_once('=')?;
            match name {
                "node_id" => node_id = Some(value.parse().ok()?),
                "http" => http = Some(value.parse().ok()?),
                "quic" => quic = Some(value.parse().ok()?),
                "peer" => peer = Some(value.parse().ok()?),
                "gossip" => gossip = Some(value.parse().ok()?),
                _ => {}
            }
        }
        Some(ReadyLine {
            node_id: node_id?,
            http: http?,
            quic: quic?,
            peer: peer?,
            gossip: gossip?,
            data_dir: PathBuf::from(data_dir),
        })
    }
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} node_id={} http={} quic={} peer={} gossip={} data_dir={}",
            Self::MARKER,
            self.node_id,
            self.http,
            self.quic,
            self.peer,
            self.gossip,
            self.data_dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReadyLine {
        ReadyLine {
            node_id: 7,
            http: "127.0.0.1:8080".parse().unwrap(),
            quic: "127.0.0.1:4433".parse().unwrap(),
            peer: "[::1]:7000".parse().unwrap(),
            gossip: "127.0.0.1:7001".parse().unwrap(),
            data_dir: PathBuf::from("/var/lib/chat node/data"),
        }
    }

    #[test]
    fn display_round_trips() {
        let ready = sample();
        let line = ready.to_string();
        assert_eq!(
            line,
            "chatnode ready node_id=7 http=127.0.0.1:8080 quic=127.0.0.1:4433 peer=[::1]:7000 \
             gossip=127.0.0.1:7001 data_dir=/var/lib/chat node/data"
        );
        assert_eq!(ReadyLine::parse(&line), Some(ready));
    }

    #[test]
    fn parses_a_real_log_line() {
        let line = "2025-06-01T09:14:03.512871Z  INFO chatnode ready node_id=0 \
                    http=127.0.0.1:39261 quic=127.0.0.1:50544 peer=127.0.0.1:46001 \
                    gossip=127.0.0.1:41234 data_dir=/tmp/.tmpAbC123/data\n";
        let ready = ReadyLine::parse(line).unwrap();
        assert_eq!(ready.node_id, 0);
        assert_eq!(ready.http, "127.0.0.1:39261".parse().unwrap());
        assert_eq!(ready.quic, "127.0.0.1:50544".parse().unwrap());
        assert_eq!(ready.peer, "127.0.0.1:46001".parse().unwrap());
        assert_eq!(ready.gossip, "127.0.0.1:41234".parse().unwrap());
        assert_eq!(ready.data_dir, PathBuf::from("/tmp/.tmpAbC123/data"));
    }

    #[test]
    fn other_lines_are_not_ready_lines() {
        assert_eq!(ReadyLine::parse(""), None);
        assert_eq!(
            ReadyLine::parse("2025-06-01T09:14:03Z  INFO shutting down"),
            None
        );
        // A field missing or malformed.
        let line = sample().to_string();
        assert_eq!(
            ReadyLine::parse(&line.replace(" quic=127.0.0.1:4433", "")),
            None
        );
        assert_eq!(
            ReadyLine::parse(&line.replace("http=127.0.0.1:8080", "http=x")),
            None
        );
        assert_eq!(
            ReadyLine::parse(line.split(" data_dir=").next().unwrap()),
            None
        );
    }
}
