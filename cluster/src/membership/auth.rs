//! Authenticated gossip: a chitchat [`Transport`] whose datagrams carry an HMAC-SHA256 tag
//! keyed by the cluster secret, so only nodes holding the secret can inject or alter
//! membership, lifecycle or presence state.
//!
//! chitchat 0.13 keeps its wire encoding private, so this transport lets chitchat's own UDP
//! socket do the encoding: an envelope to send is sent by a *codec* socket to a *tap*
//! socket, both on loopback, and the bytes the tap receives are sealed and sent from the
//! public socket; a verified datagram goes the other way, from the tap to the codec socket,
//! which decodes it. Only one datagram is ever in flight between the two, and a leftover
//! one (from a receive cancelled part-way) is drained before the next, so datagrams are
//! never attributed to the wrong peer.
//!
//! A sealed datagram is `tag (32) | sent at, unix ms (8) | sender's clock reading (8) |
//! message id (4) | fragment index (1) | fragment count (1) | payload`. The receiver's
//! clock is pulled past the sender's reading (`crate::clock::Hlc::observe`), and the "sent at"
//! time feeds its clock-skew estimate (`crate::clock::SkewGuard`). chitchat fills datagrams up to the UDP limit, so a
//! message that does not fit with the header goes as two fragments. Datagrams more than
//! [`MAX_SKEW`] away from this node's clock are refused (nodes need clocks within that of
//! each other), and a datagram seen once within that window is refused the second time
//! ([`ReplayGuard`]): a captured datagram cannot be replayed to make a node answer, so a
//! node never sends anything to an address whose datagrams it has not verified except a
//! [`NAK_LEN`]-byte refusal notice, smaller than any datagram it answers (no amplification).
//!
//! The refusal notice (`NAK_MAGIC | the refused datagram's tag`, at most
//! [`NAKS_PER_SEC`] a second) tells a node whose secret differs from its seeds' that it
//! was refused: the node checks that the echoed tag is one it sent to that address (so an
//! off-path attacker cannot forge one), and counts it in [`GossipHealth`], which the node
//! reads before it starts serving (a node with the wrong secret stops with a clear error
//! instead of forming a cluster of its own).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as CodecSocket};
use chitchat::ChitchatEnvelope;
use ring::hmac;
use tokio::net::UdpSocket;
use tracing::warn;

use crate::certs::ClusterSecret;
use crate::clock::{wall_ms, ClusterClock};

/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;
const TAG_LEN: usize = 32;
const HEADER_LEN: usize = TAG_LEN + 8 + 8 + 4 + 1 + 1;
/// Payload bytes per fragment.
const FRAGMENT: usize = MAX_DATAGRAM - HEADER_LEN;
/// How far a datagram's timestamp may be from this node's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(120);
/// Partly received messages kept at once; the oldest go first.
const MAX_PARTIAL: usize = 256;
/// How long the loopback hop to or from chitchat's codec socket may take.
const CODEC_HOP: Duration = Duration::from_secs(1);
/// Datagrams remembered by the replay guard. Within [`MAX_SKEW`] (240 s of timestamps) this
/// allows ~270 verified datagrams a second, far above what gossip sends (a few per peer and
/// round); past it, the oldest are forgotten and anything not newer than them is refused.
/// About 40 bytes each: ~2.6 MB at most.
pub const REPLAY_WINDOW_ENTRIES: usize = 65_536;
/// The first bytes of a refusal notice.
pub const NAK_MAGIC: [u8; 8] = *b"chatNAK1";
/// A refusal notice's length: magic and the refused datagram's tag. Smaller than
/// [`HEADER_LEN`], so never larger than the datagram it answers.
pub const NAK_LEN: usize = NAK_MAGIC.len() + TAG_LEN;
/// Refusal notices sent per second at most (a reflection bound).
pub const NAKS_PER_SEC: u32 = 10;
/// Tags of datagrams recently sent, kept to check refusal notices against.
const SENT_REMEMBERED: usize = 256;

/// What the gossip transport has seen, shared with whoever watches it (the node reads it
/// before serving: see the module docs). Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct GossipHealth {
    inner: Arc<HealthInner>,
}

#[derive(Default, Debug)]
struct HealthInner {
    verified: AtomicU64,
    sent_bytes: AtomicU64,
    refused_by_peers: AtomicU64,
    replays: AtomicU64,
    /// The last peer that refused this node's datagrams.
    // A std-style lock held for a copy only; parking_lot never poisons.
    last_refuser: parking_lot::Mutex<Option<SocketAddr>>,
}

impl GossipHealth {
    /// Datagrams received that carried this cluster's seal and were fresh.
    pub fn verified(&self) -> u64 {
        self.inner.verified.load(Ordering::Relaxed)
    }

    /// Bytes of sealed gossip datagrams this node has sent.
    pub fn sent_bytes(&self) -> u64 {
        self.inner.sent_bytes.load(Ordering::Relaxed)
    }

    /// Refusal notices received for datagrams this node sent: its peers hold another
    /// cluster secret.
    pub fn refused_by_peers(&self) -> u64 {
        self.inner.refused_by_peers.load(Ordering::Relaxed)
    }

    /// Correctly sealed datagrams refused because they had been seen before.
    pub fn replays(&self) -> u64 {
        self.inner.replays.load(Ordering::Relaxed)
    }

    /// The last peer that refused this node's datagrams.
    pub fn last_refuser(&self) -> Option<SocketAddr> {
        *self.inner.last_refuser.lock()
    }
}

/// Remembers the sealed datagrams verified within the skew window and refuses a second
/// copy of any of them. Memory is bounded by [`REPLAY_WINDOW_ENTRIES`]: when full, the
/// oldest (by their timestamp) are forgotten and the guard refuses everything not newer
/// than them, so a forgotten datagram still cannot be replayed.
#[derive(Debug)]
pub struct ReplayGuard {
    /// `(sent at, first 16 bytes of the tag)` of the datagrams seen.
    seen: BTreeSet<(u64, [u8; 16])>,
    /// Datagrams sent at or before this were forgotten for lack of room: refused.
    floor: Option<u64>,
    capacity: usize,
}

impl ReplayGuard {
    /// A guard remembering at most `capacity` datagrams.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: BTreeSet::new(),
            floor: None,
            capacity: capacity.max(1),
        }
    }

    /// Records a verified datagram (its tag and timestamp) at `now_ms`; `false` if it was
    /// seen before (a replay) or is too old to tell.
    pub fn admit(&mut self, tag: &[u8], sent_ms: u64, now_ms: u64) -> bool {
        // Forget what the skew check refuses anyway.
        let expired = now_ms.saturating_sub(MAX_SKEW.as_millis() as u64);
        if self.seen.first().is_some_and(|(t, _)| *t < expired) {
            self.seen = self.seen.split_off(&(expired, [0; 16]));
        }
        if self.floor.is_some_and(|f| sent_ms <= f) {
            return false;
        }
        let mut short = [0u8; 16];
        let n = tag.len().min(16);
        short[..n].copy_from_slice(&tag[..n]);
        if !self.seen.insert((sent_ms, short)) {
            return false;
        }
        while self.seen.len() > self.capacity {
            if let Some((t, _)) = self.seen.pop_first() {
                self.floor = Some(self.floor.map_or(t, |f| f.max(t)));
            }
        }
        true
    }

    /// Datagrams remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The gossip key of `secret`, for the fuzz targets.
#[cfg(test)]
pub(crate) fn test_key(secret: &ClusterSecret) -> hmac::Key {
    AuthTransport::new(secret).key
}

/// A chitchat transport that seals every datagram with the cluster secret.
pub struct AuthTransport {
    key: hmac::Key,
    clock: Option<ClusterClock>,
    health: GossipHealth,
}

impl AuthTransport {
    /// A transport keyed by `secret` (a key derived for gossip, not the secret itself).
    pub fn new(secret: &ClusterSecret) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let derived = hmac::sign(&root, b"chatnode gossip authentication v2");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
            clock: None,
            health: GossipHealth::default(),
        }
    }

    /// What this transport's sockets have seen.
    pub fn health(&self) -> GossipHealth {
        self.health.clone()
    }

    /// Stamps datagrams with `clock`'s readings and feeds it the peers' (see the module
    /// docs).
    pub fn with_clock(mut self, clock: Option<ClusterClock>) -> Self {
        self.clock = clock;
        self
    }
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let codec = CodecSocket::open(loopback).await?;
        let codec_addr = codec.local_addr()?;
        let tap = UdpSocket::bind(loopback)
            .await
            .context("failed to bind the gossip codec tap")?;
        let tap_addr = tap.local_addr()?;
        Ok(Box::new(AuthSocket {
            public,
            codec,
            codec_addr,
            tap,
            tap_addr,
            key: self.key.clone(),
            clock: self.clock.clone(),
            buf: vec![0; MAX_DATAGRAM + 1].into_boxed_slice(),
            next_id: rand::random(),
            partial: HashMap::new(),
            last_warning: None,
            replay: ReplayGuard::new(REPLAY_WINDOW_ENTRIES),
            sent_tags: VecDeque::with_capacity(SENT_REMEMBERED),
            naks: NakBudget::default(),
            health: self.health.clone(),
        }))
    }
}

/// A verified fragment, owned.
struct Fragment {
    id: u32,
    index: u8,
    count: u8,
    payload: Vec<u8>,
}

struct Partial {
    first_seen: Instant,
    fragments: Vec<Option<Vec<u8>>>,
}

struct AuthSocket {
    public: UdpSocket,
    codec: CodecSocket,
    codec_addr: SocketAddr,
    tap: UdpSocket,
    tap_addr: SocketAddr,
    key: hmac::Key,
    clock: Option<ClusterClock>,
    buf: Box<[u8]>,
    next_id: u32,
    partial: HashMap<(SocketAddr, u32), Partial>,
    last_warning: Option<Instant>,
    replay: ReplayGuard,
    /// `(to, tag)` of the last datagrams sent, to check refusal notices against.
    sent_tags: VecDeque<(SocketAddr, [u8; TAG_LEN])>,
    naks: NakBudget,
    health: GossipHealth,
}

/// At most [`NAKS_PER_SEC`] refusal notices a second.
#[derive(Default)]
struct NakBudget {
    second: u64,
    sent: u32,
}

impl NakBudget {
    fn take(&mut self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        if second != self.second {
            self.second = second;
            self.sent = 0;
        }
        if self.sent < NAKS_PER_SEC {
            self.sent += 1;
            true
        } else {
            false
        }
    }
}

/// A refusal notice for a datagram with this tag.
pub(crate) fn nak(tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NAK_LEN);
    out.extend_from_slice(&NAK_MAGIC);
    out.extend_from_slice(tag);
    out
}

/// The tag a refusal notice echoes, if `datagram` is one.
pub(crate) fn nak_tag(datagram: &[u8]) -> Option<&[u8]> {
    (datagram.len() == NAK_LEN && datagram.starts_with(&NAK_MAGIC))
        .then(|| &datagram[NAK_MAGIC.len()..])
}

/// What a sealed datagram's header says besides the fragment fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The sender's wall clock, Unix ms.
    pub sent_ms: u64,
    /// The sender's clock reading (0 when it keeps none).
    pub hlc: u64,
}

/// `header | payload` with the tag over everything after it.
pub(crate) fn seal(
    key: &hmac::Key,
    stamp: Stamp,
    id: u32,
    index: u8,
    count: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&[0; TAG_LEN]);
    out.extend_from_slice(&stamp.sent_ms.to_be_bytes());
    out.extend_from_slice(&stamp.hlc.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.push(index);
    out.push(count);
    out.extend_from_slice(payload);
    let tag = hmac::sign(key, &out[TAG_LEN..]);
    out[..TAG_LEN].copy_from_slice(tag.as_ref());
    out
}

/// A verified fragment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Opened<'a> {
    pub stamp: Stamp,
    pub id: u32,
    pub index: u8,
    pub count: u8,
    pub payload: &'a [u8],
}

/// Why a datagram was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    Short,
    BadTag,
    Skewed(i64),
    BadFragment,
    Replayed,
}

/// Checks a sealed datagram's tag, clock and fragment fields.
pub(crate) fn open<'a>(
    key: &hmac::Key,
    datagram: &'a [u8],
    now_ms: u64,
) -> Result<Opened<'a>, Refused> {
    if datagram.len() < HEADER_LEN {
        return Err(Refused::Short);
    }
    if hmac::verify(key, &datagram[TAG_LEN..], &datagram[..TAG_LEN]).is_err() {
        return Err(Refused::BadTag);
    }
    let field = |at: usize, len: usize| &datagram[at..at + len];
    let u64_at = |at: usize| {
        field(at, 8)
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Refused::Short)
    };
    let sent_ms = u64_at(TAG_LEN)?;
    let hlc = u64_at(TAG_LEN + 8)?;
    let id = u32::from_be_bytes(
        field(TAG_LEN + 16, 4)
            .try_into()
            .map_err(|_| Refused::Short)?,
    );
    let (index, count) = (datagram[TAG_LEN + 20], datagram[TAG_LEN + 21]);
    // Any u64 may arrive: no signed arithmetic that can overflow (the fuzz target found one).
    let distance = sent_ms.abs_diff(now_ms);
    if distance > MAX_SKEW.as_millis() as u64 {
        let magnitude = i64::try_from(distance).unwrap_or(i64::MAX);
        let skew = if sent_ms >= now_ms {
            magnitude
        } else {
            -magnitude
        };
        return Err(Refused::Skewed(skew));
    }
    if count == 0 || index >= count || count > 2 {
        return Err(Refused::BadFragment);
    }
    Ok(Opened {
        stamp: Stamp { sent_ms, hlc },
        id,
        index,
        count,
        payload: &datagram[HEADER_LEN..],
    })
}

impl AuthSocket {
    /// A refusal notice from `from`: counted if it echoes a datagram this node sent there.
    fn refused_by(&mut self, from: SocketAddr, tag: &[u8]) {
        if self
            .sent_tags
            .iter()
            .any(|(to, sent)| *to == from && sent.as_slice() == tag)
        {
            self.health
                .inner
                .refused_by_peers
                .fetch_add(1, Ordering::Relaxed);
            *self.health.inner.last_refuser.lock() = Some(from);
            let now = Instant::now();
            if self
                .last_warning
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
            {
                self.last_warning = Some(now);
                tracing::error!(peer = %from, "a peer refused this node's gossip: it holds another cluster secret");
            }
        }
    }

    fn warn_refused(&mut self, from: SocketAddr, why: &Refused) {
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            self.last_warning = Some(now);
            warn!(%from, reason = ?why, "gossip datagram refused (not sealed with this cluster's secret, replayed, or clocks more than 2 min apart)");
        }
    }

    /// A whole message once its last fragment is in.
    fn reassemble(&mut self, from: SocketAddr, fragment: Fragment) -> Option<Vec<u8>> {
        if fragment.count == 1 {
            return Some(fragment.payload);
        }
        let now = Instant::now();
        self.partial
            .retain(|_, p| now.duration_since(p.first_seen) < Duration::from_secs(5));
        if self.partial.len() >= MAX_PARTIAL {
            let oldest = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.first_seen)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.partial.remove(&k);
            }
        }
        let entry = self
            .partial
            .entry((from, fragment.id))
            .or_insert_with(|| Partial {
                first_seen: now,
                fragments: vec![None; usize::from(fragment.count)],
            });
        let slot = entry.fragments.get_mut(usize::from(fragment.index))?;
        *slot = Some(fragment.payload);
        if entry.fragments.iter().all(Option::is_some) {
            let done = self.partial.remove(&(from, fragment.id))?;
            Some(done.fragments.into_iter().flatten().flatten().collect())
        } else {
            None
        }
    }

    /// Drops whatever a cancelled receive left in the codec socket.
    async fn drain_codec(&mut self) {
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::ZERO, self.codec.recv()).await {}
    }
}

#[async_trait]
impl Socket for AuthSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.public
            .local_addr()
            .context("failed to get the gossip socket address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        while self.tap.try_recv_from(&mut self.buf).is_ok() {}
        self.codec.send(self.tap_addr, envelope).await?;
        let deadline = tokio::time::Instant::now() + CODEC_HOP;
        let len = loop {
            let (len, from) = tokio::time::timeout_at(deadline, self.tap.recv_from(&mut self.buf))
                .await
                .context("gossip codec hop timed out")??;
            // Anything but the codec socket's own datagram is dropped.
            if from == self.codec_addr {
                break len;
            }
        };
        let payload = &self.buf[..len];
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let chunks: Vec<&[u8]> = if payload.is_empty() {
            vec![payload]
        } else {
            payload.chunks(FRAGMENT).collect()
        };
        let count = u8::try_from(chunks.len()).context("gossip message too large")?;
        let stamp = Stamp {
            sent_ms: wall_ms(),
            hlc: self.clock.as_ref().map_or(0, |c| c.hlc.peek()),
        };
        let mut sent = 0;
        for (index, chunk) in chunks.iter().enumerate() {
            let datagram = seal(&self.key, stamp, id, index as u8, count, chunk);
            let mut tag = [0; TAG_LEN];
            tag.copy_from_slice(&datagram[..TAG_LEN]);
            if self.sent_tags.len() >= SENT_REMEMBERED {
                self.sent_tags.pop_front();
            }
            self.sent_tags.push_back((to, tag));
            match self.public.send_to(&datagram, to).await {
                Ok(n) => sent += n,
                // As chitchat's own socket: a peer that is gone is not a broken transport.
                Err(e) => {
                    warn!(%to, error = %e, "gossip send failed");
                    break;
                }
            }
        }
        self.health
            .inner
            .sent_bytes
            .fetch_add(sent as u64, Ordering::Relaxed);
        metrics::counter!("gossip_sent_bytes_total").increment(sent as u64);
        Ok(SendOutcome {
            num_bytes_sent: sent,
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (len, from) = match self.public.recv_from(&mut self.buf).await {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e).context("fatal gossip receive error"),
            };
            let now = wall_ms();
            if let Some(tag) = nak_tag(&self.buf[..len]) {
                let tag = tag.to_vec();
                self.refused_by(from, &tag);
                continue;
            }
            let opened = open(&self.key, &self.buf[..len], now).and_then(|o| {
                if self
                    .replay
                    .admit(&self.buf[..TAG_LEN], o.stamp.sent_ms, now)
                {
                    Ok(o)
                } else {
                    Err(Refused::Replayed)
                }
            });
            let fragment = match opened {
                Ok(o) => {
                    self.health.inner.verified.fetch_add(1, Ordering::Relaxed);
                    if let Some(clock) = &self.clock {
                        clock.guard.record(from, o.stamp.sent_ms, now);
                        clock.hlc.set_peers_ahead_ms(clock.guard.peers_ahead_ms());
                        clock.hlc.observe(o.stamp.hlc);
                    }
                    Fragment {
                        id: o.id,
                        index: o.index,
                        count: o.count,
                        payload: o.payload.to_vec(),
                    }
                }
                Err(why) => {
                    metrics::counter!("gossip_refused_total").increment(1);
                    if why == Refused::Replayed {
                        self.health.inner.replays.fetch_add(1, Ordering::Relaxed);
                    }
                    self.warn_refused(from, &why);
                    if why == Refused::BadTag && self.naks.take(now) {
                        let notice = nak(&self.buf[..TAG_LEN]);
                        // Best effort: the notice is advice, not protocol.
                        let _ = self.public.send_to(&notice, from).await;
                    }
                    continue;
                }
            };
            let Some(message) = self.reassemble(from, fragment) else {
                continue;
            };
            if message.len() > MAX_DATAGRAM {
                continue;
            }
            self.drain_codec().await;
            self.tap.send_to(&message, self.codec_addr).await?;
            match tokio::time::timeout(CODEC_HOP, self.codec.recv()).await {
                // Only what came through the tap counts: the codec socket's loopback port is
                // not sealed, and anything else sent to it is dropped.
                Ok(Ok(outcome)) if outcome.from_addr == self.tap_addr => {
                    return Ok(RecvOutcome {
                        from_addr: from,
                        envelope: outcome.envelope,
                        num_bytes_received: len,
                    })
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                // chitchat's socket dropped it as undecodable (and logged it).
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> hmac::Key {
        AuthTransport::new(&ClusterSecret::from_bytes([byte; 32])).key
    }

    #[test]
    fn only_the_right_key_and_an_untouched_datagram_open() {
        let (k, other) = (key(1), key(2));
        let stamp = Stamp {
            sent_ms: 1_000_000,
            hlc: 42,
        };
        let sealed = seal(&k, stamp, 7, 0, 1, b"hello");
        let opened = open(&k, &sealed, 1_000_500).unwrap();
        assert_eq!((opened.id, opened.payload), (7, &b"hello"[..]));
        assert_eq!(opened.stamp, stamp);
        assert_eq!(open(&other, &sealed, 1_000_500), Err(Refused::BadTag));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&k, &bad, 1_000_500).is_err(), "byte {i}");
        }
        assert_eq!(open(&k, &sealed[..10], 1_000_500), Err(Refused::Short));
        let late = 1_000_000 + MAX_SKEW.as_millis() as u64 + 1;
        assert!(matches!(open(&k, &sealed, late), Err(Refused::Skewed(_))));
        // A timestamp far in the future (any u64 can arrive) is refused, not an overflow.
        let future = Stamp {
            sent_ms: u64::MAX,
            hlc: 0,
        };
        let far = seal(&k, future, 7, 0, 1, b"x");
        assert_eq!(open(&k, &far, 1_000_000), Err(Refused::Skewed(i64::MAX)));
        let bad_fragment = seal(&k, stamp, 7, 2, 2, b"x");
        assert_eq!(
            open(&k, &bad_fragment, 1_000_000),
            Err(Refused::BadFragment)
        );
    }

    #[test]
    fn the_replay_guard_admits_a_datagram_once_and_bounds_its_memory() {
        let mut g = ReplayGuard::new(4);
        let now = 10_000_000;
        assert!(g.admit(&[1; 32], now, now));
        assert!(!g.admit(&[1; 32], now, now + 1), "a replay is refused");
        assert!(g.admit(&[2; 32], now, now), "another tag is fine");
        for i in 3..=6u8 {
            assert!(g.admit(&[i; 32], now + u64::from(i), now));
        }
        assert_eq!(g.len(), 4, "memory is bounded");
        // Forgotten for lack of room: refused rather than replayable.
        assert!(!g.admit(&[1; 32], now, now));
        assert!(!g.admit(&[2; 32], now, now));
        // Past the skew window, old entries are dropped.
        let later = now + MAX_SKEW.as_millis() as u64 + 100;
        assert!(g.admit(&[9; 32], later, later));
        assert_eq!(g.len(), 1);
    }

    fn envelope(version: chitchat::ProtocolVersion) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version,
            message: chitchat::ChitchatMessage::BadCluster,
        }
    }

    async fn open_socket(t: &AuthTransport) -> Box<dyn Socket> {
        t.open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap()
    }

    /// What `from` seals and sends for `envelope`, captured on a plain socket.
    async fn capture(from: &mut Box<dyn Socket>, envelope: ChitchatEnvelope) -> Vec<u8> {
        let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        from.send(tap.local_addr().unwrap(), envelope)
            .await
            .unwrap();
        let mut buf = vec![0; MAX_DATAGRAM];
        let (n, _) = tap.recv_from(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn the_same_datagram_sent_twice_is_dropped_the_second_time() {
        let secret = ClusterSecret::from_bytes([5; 32]);
        let (ta, tb) = (AuthTransport::new(&secret), AuthTransport::new(&secret));
        let health = tb.health();
        let mut a = open_socket(&ta).await;
        let mut b = open_socket(&tb).await;
        let b_addr = b.local_addr().unwrap();
        let first = capture(&mut a, envelope(chitchat::ProtocolVersion::V0)).await;
        let second = capture(&mut a, envelope(chitchat::ProtocolVersion::V1)).await;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();

        attacker.send_to(&first, b_addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.envelope.version, chitchat::ProtocolVersion::V0);

        // The replay, then a fresh datagram: only the fresh one comes through.
        attacker.send_to(&first, b_addr).await.unwrap();
        attacker.send_to(&second, b_addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.envelope.version, chitchat::ProtocolVersion::V1);
        assert_eq!(health.replays(), 1);
        assert_eq!(health.verified(), 2);
    }

    #[tokio::test]
    async fn a_peer_with_another_secret_answers_with_a_small_checked_refusal() {
        let ta = AuthTransport::new(&ClusterSecret::from_bytes([1; 32]));
        let tb = AuthTransport::new(&ClusterSecret::from_bytes([2; 32]));
        let (health_a, health_b) = (ta.health(), tb.health());
        let mut a = open_socket(&ta).await;
        let mut b = open_socket(&tb).await;
        let a_addr = a.local_addr().unwrap();
        let b_addr = b.local_addr().unwrap();

        // A forged notice (a tag A never sent) is ignored.
        let forger = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        forger.send_to(&nak(&[7; TAG_LEN]), a_addr).await.unwrap();

        a.send(b_addr, envelope(chitchat::ProtocolVersion::V0))
            .await
            .unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                r = a.recv() => panic!("A got a datagram: {:?}", r.map(|o| o.envelope)),
                r = b.recv() => panic!("B accepted a datagram: {:?}", r.map(|o| o.envelope)),
                () = async {
                    while health_a.refused_by_peers() == 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                } => {}
            }
        })
        .await;
        assert!(waited.is_ok(), "A was never told it was refused");
        assert_eq!(health_a.refused_by_peers(), 1, "the forged notice counted");
        assert_eq!(health_a.last_refuser(), Some(b_addr));
        assert_eq!(health_b.verified(), 0);
        const {
            assert!(
                NAK_LEN < HEADER_LEN,
                "a notice is smaller than any datagram"
            )
        };
    }
}
