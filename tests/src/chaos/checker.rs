//! The checker: judges a [`History`] with no I/O. It flags
//!
//! - **lost**: an acked message that some device of a participant (the sender's other
//!   devices included) never got by the end of the run;
//! - **duplicated**: a device got one message id twice (after `ChatClient`'s own dedup);
//! - **unexpected**: a device got a message the workload never sent, or one whose sender,
//!   conversation or id does not match what was sent, or one not for that device's user, or
//!   one whose send was refused with a code other than `unavailable`;
//! - **out of order**: a send got a message id not above one its device had already seen
//!   when the send started (the ack of one of its earlier sends, or a message it received):
//!   what a device has seen sorts before what it sends next, the causal order the protocol
//!   promises (docs/protocol.md, 2.3; two devices of one user that have not seen each other's
//!   messages are not ordered); or a conversation's history, read through a node, is not in
//!   strictly descending id order;
//! - **divergent**: after healing, a user's whole inbox or a conversation's whole history
//!   differs between nodes, misses an acked message, or cannot be read.
//!
//! It also measures, for each fault, the time from its heal until every device that had not
//! yet got a message acked before the heal got it ([`HealStats`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use client_proto::{ConversationId, MessageId};

use super::history::{History, LinkChange, Ms, Outcome, Send};

/// The kinds of finding; any finding fails the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Lost,
    Duplicated,
    Unexpected,
    OutOfOrder,
    Divergent,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Lost,
        Kind::Duplicated,
        Kind::Unexpected,
        Kind::OutOfOrder,
        Kind::Divergent,
    ];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Lost => "lost",
            Kind::Duplicated => "duplicated",
            Kind::Unexpected => "unexpected",
            Kind::OutOfOrder => "out of order",
            Kind::Divergent => "divergent",
        })
    }
}

/// One thing the checker found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    /// The message concerned, when there is one.
    pub message: Option<MessageId>,
    /// The device concerned (an index), when there is one.
    pub device: Option<usize>,
    pub detail: String,
}

/// Heal-to-everything times of one kind of fault.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealStats {
    /// Per message acked before a heal that some device lacked at the heal: the time from the
    /// heal until the last such device got it, sorted.
    pub latencies_ms: Vec<Ms>,
    /// Such messages that some device never got.
    pub never: usize,
}

impl HealStats {
    /// The `q` quantile (0..=1) of the latencies, if any.
    pub fn quantile(&self, q: f64) -> Option<Ms> {
        let n = self.latencies_ms.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies_ms.get(rank - 1).copied()
    }
}

/// The checker's judgement of one history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    pub acked: usize,
    pub refused: usize,
    pub indeterminate: usize,
    pub findings: Vec<Finding>,
    /// By fault kind.
    pub heal: BTreeMap<String, HealStats>,
    /// Lost (device, message) pairs on devices that never lost their connection.
    pub lost_on_steady_devices: usize,
    /// Lost (device, message) pairs by the node the device was connected to when the message
    /// was acked (`"none"`: it was between connections).
    pub lost_by_node: BTreeMap<String, usize>,
}

impl Verdict {
    /// How many findings of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.findings.iter().filter(|f| f.kind == kind).count()
    }

    /// How many distinct messages are lost somewhere.
    pub fn lost_messages(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.kind == Kind::Lost)
            .filter_map(|f| f.message)
            .collect::<HashSet<_>>()
            .len()
    }

    /// The kinds that have findings.
    pub fn kinds(&self) -> BTreeSet<Kind> {
        self.findings.iter().map(|f| f.kind).collect()
    }

    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Every heal latency, whatever the fault.
    pub fn heal_all(&self) -> HealStats {
        let mut all = HealStats::default();
        for s in self.heal.values() {
            all.latencies_ms.extend(&s.latencies_ms);
            all.never += s.never;
        }
        all.latencies_ms.sort_unstable();
        all
    }
}

/// Judges `h`.
pub fn check(h: &History) -> Verdict {
    let mut v = Verdict::default();
    for s in &h.sends {
        match s.outcome {
            Outcome::Acked { .. } => v.acked += 1,
            Outcome::Refused { .. } => v.refused += 1,
            Outcome::Indeterminate { .. } => v.indeterminate += 1,
        }
    }
    let ix = Index::new(h);
    lost(h, &ix, &mut v);
    duplicated(&ix, &mut v);
    unexpected(h, &ix, &mut v);
    out_of_order(h, &mut v);
    divergent(h, &mut v);
    heal(h, &ix, &mut v);
    v
}

/// Lookups shared by the checks.
struct Index<'h> {
    /// First time each device got each message, and how often.
    received: HashMap<(usize, MessageId), (Ms, usize)>,
    /// Acked sends.
    acked: Vec<(&'h Send, MessageId)>,
    /// Each device's connection changes, in time order.
    links: HashMap<usize, Vec<(Ms, Option<usize>)>>,
}

impl<'h> Index<'h> {
    fn new(h: &'h History) -> Self {
        let mut received: HashMap<(usize, MessageId), (Ms, usize)> = HashMap::new();
        for d in &h.deliveries {
            let e = received
                .entry((d.device, d.message_id))
                .or_insert((d.at_ms, 0));
            e.0 = e.0.min(d.at_ms);
            e.1 += 1;
        }
        let acked = h
            .sends
            .iter()
            .filter_map(|s| s.outcome.message_id().map(|id| (s, id)))
            .collect();
        let mut links: HashMap<usize, Vec<(Ms, Option<usize>)>> = HashMap::new();
        for l in &h.links {
            let node = match l.change {
                LinkChange::Connected { node } => Some(node),
                LinkChange::Disconnected { .. } => None,
            };
            links.entry(l.device).or_default().push((l.at_ms, node));
        }
        for l in links.values_mut() {
            l.sort_by_key(|(t, _)| *t);
        }
        Index {
            received,
            acked,
            links,
        }
    }

    /// The node `device` was connected to at `t`, if any.
    fn node_at(&self, device: usize, t: Ms) -> Option<usize> {
        self.links
            .get(&device)?
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .and_then(|(_, n)| *n)
    }

    /// Whether `device` ever lost its connection.
    fn ever_disconnected(&self, device: usize) -> bool {
        self.links
            .get(&device)
            .is_some_and(|l| l.iter().any(|(_, n)| n.is_none()))
    }
}

fn lost(h: &History, ix: &Index, v: &mut Verdict) {
    for (s, id) in &ix.acked {
        for d in h.expected_devices(s) {
            if ix.received.contains_key(&(d, *id)) {
                continue;
            }
            if !ix.ever_disconnected(d) {
                v.lost_on_steady_devices += 1;
            }
            let node = ix
                .node_at(d, s.end_ms)
                .map_or_else(|| "none".to_string(), |n| n.to_string());
            *v.lost_by_node.entry(node).or_default() += 1;
            v.findings.push(Finding {
                kind: Kind::Lost,
                message: Some(*id),
                device: Some(d),
                detail: format!(
                    "device {d} never got {id} ({}, acked at {} ms)",
                    shown(&s.body),
                    s.end_ms
                ),
            });
        }
    }
}

fn duplicated(ix: &Index, v: &mut Verdict) {
    let mut dups: Vec<_> = ix
        .received
        .iter()
        .filter(|(_, (_, n))| *n > 1)
        .map(|((d, id), (_, n))| (*d, *id, *n))
        .collect();
    dups.sort_unstable();
    for (d, id, n) in dups {
        v.findings.push(Finding {
            kind: Kind::Duplicated,
            message: Some(id),
            device: Some(d),
            detail: format!("device {d} got {id} {n} times"),
        });
    }
}

fn unexpected(h: &History, ix: &Index, v: &mut Verdict) {
    let by_body: HashMap<&str, &Send> = h.sends.iter().map(|s| (s.body.as_str(), s)).collect();
    // Each body must map to one message id wherever it shows up.
    let mut id_of_body: HashMap<&str, MessageId> = ix
        .acked
        .iter()
        .map(|(s, id)| (s.body.as_str(), *id))
        .collect();
    let mut flagged: HashSet<(usize, MessageId)> = HashSet::new();
    for d in &h.deliveries {
        let mut flag = |why: String| {
            if flagged.insert((d.device, d.message_id)) {
                v.findings.push(Finding {
                    kind: Kind::Unexpected,
                    message: Some(d.message_id),
                    device: Some(d.device),
                    detail: format!(
                        "device {} got {} ({}): {why}",
                        d.device,
                        d.message_id,
                        shown(&d.body)
                    ),
                });
            }
        };
        let Some(s) = by_body.get(d.body.as_str()) else {
            flag("no send has this body".into());
            continue;
        };
        let sender = h.users.get(s.user).map(|u| u.id);
        if sender != Some(d.from) {
            flag(format!(
                "it says it is from {}, the sender is {sender:?}",
                d.from
            ));
        }
        if d.conversation != s.conversation {
            flag(format!(
                "it is in {}, it was sent to {}",
                d.conversation, s.conversation
            ));
        }
        let owner = h.devices.get(d.device).map(|x| x.user);
        if !owner.is_some_and(|u| h.participants(s).contains(&u)) {
            flag(format!("user {owner:?} is not a participant"));
        }
        if !s.outcome.may_appear() {
            flag(format!("its send was refused: {:?}", s.outcome));
        }
        match id_of_body.get(s.body.as_str()) {
            Some(id) if *id != d.message_id => flag(format!(
                "this body is message {id} (acked or seen first); stored twice?"
            )),
            Some(_) => {}
            None => {
                id_of_body.insert(s.body.as_str(), d.message_id);
            }
        }
    }
}

fn out_of_order(h: &History, v: &mut Verdict) {
    // What each device had seen, in time order: its own acks and the messages it received.
    let mut seen: HashMap<usize, Vec<(Ms, MessageId, String)>> = HashMap::new();
    for s in &h.sends {
        if let Some(id) = s.outcome.message_id() {
            let what = format!("its own send {} of user {}", s.seq, s.user);
            seen.entry(s.device).or_default().push((s.end_ms, id, what));
        }
    }
    for d in &h.deliveries {
        let what = format!("a message it received at {} ms", d.at_ms);
        seen.entry(d.device)
            .or_default()
            .push((d.at_ms, d.message_id, what));
    }
    for b in &h.sends {
        let Some(b_id) = b.outcome.message_id() else {
            continue;
        };
        let before = seen
            .get(&b.device)
            .into_iter()
            .flatten()
            .filter(|(at, id, _)| *at <= b.start_ms && *id != b_id)
            .max_by_key(|(_, id, _)| *id);
        if let Some((_, a_id, what)) = before {
            if b_id <= *a_id {
                v.findings.push(Finding {
                    kind: Kind::OutOfOrder,
                    message: Some(b_id),
                    device: Some(b.device),
                    detail: format!(
                        "user {} device {}: send {} got {b_id}, not above {a_id} ({what}) that \
                         the device had seen before it started",
                        b.user, b.device, b.seq
                    ),
                });
            }
        }
    }
    for r in &h.history_reads {
        let Ok(ids) = &r.ids else { continue };
        if let Some(w) = ids.windows(2).find(|w| w[0] <= w[1]) {
            v.findings.push(Finding {
                kind: Kind::OutOfOrder,
                message: Some(w[1]),
                device: None,
                detail: format!(
                    "history of {} through node {}: {} then {} (not strictly descending)",
                    r.conversation, r.node, w[0], w[1]
                ),
            });
        }
    }
}

fn divergent(h: &History, v: &mut Verdict) {
    // Acked message ids per user inbox and per conversation.
    let mut inbox_want: HashMap<usize, BTreeSet<MessageId>> = HashMap::new();
    let mut conv_want: HashMap<ConversationId, BTreeSet<MessageId>> = HashMap::new();
    for s in &h.sends {
        if let Some(id) = s.outcome.message_id() {
            for u in h.participants(s) {
                inbox_want.entry(u).or_default().insert(id);
            }
            conv_want.entry(s.conversation).or_default().insert(id);
        }
    }
    let mut inboxes: BTreeMap<usize, Vec<NodeRead>> = BTreeMap::new();
    for r in &h.inbox_reads {
        inboxes.entry(r.user).or_default().push((r.node, &r.ids));
    }
    for (user, reads) in inboxes {
        let empty = BTreeSet::new();
        let want = inbox_want.get(&user).unwrap_or(&empty);
        compare(&format!("inbox of user {user}"), want, &reads, v);
    }
    let mut convs: BTreeMap<String, (ConversationId, Vec<NodeRead>)> = BTreeMap::new();
    for r in &h.history_reads {
        convs
            .entry(r.conversation.to_string())
            .or_insert_with(|| (r.conversation, Vec::new()))
            .1
            .push((r.node, &r.ids));
    }
    for (name, (conv, reads)) in convs {
        let empty = BTreeSet::new();
        let want = conv_want.get(&conv).unwrap_or(&empty);
        compare(&format!("history of {name}"), want, &reads, v);
    }
}

/// One read through one node: the node and what it gave.
type NodeRead<'h> = (usize, &'h Result<Vec<MessageId>, String>);

/// Flags reads of one thing through several nodes that fail, miss an acked id, or differ.
fn compare(what: &str, want: &BTreeSet<MessageId>, reads: &[NodeRead], v: &mut Verdict) {
    let mut first: Option<(usize, BTreeSet<MessageId>)> = None;
    for (node, ids) in reads {
        let ids = match ids {
            Ok(ids) => ids.iter().copied().collect::<BTreeSet<_>>(),
            Err(e) => {
                v.findings.push(divergence(format!(
                    "{what}: the read through node {node} failed: {e}"
                )));
                continue;
            }
        };
        let missing: Vec<_> = want.difference(&ids).collect();
        if !missing.is_empty() {
            v.findings.push(divergence(format!(
                "{what} through node {node} lacks {} acked messages, such as {}",
                missing.len(),
                missing[0]
            )));
        }
        match &first {
            None => first = Some((*node, ids)),
            Some((n0, ids0)) if *ids0 != ids => {
                let only0 = ids0.difference(&ids).count();
                let only1 = ids.difference(ids0).count();
                v.findings.push(divergence(format!(
                    "{what}: node {n0} has {only0} ids node {node} lacks, node {node} has \
                     {only1} that node {n0} lacks"
                )));
            }
            Some(_) => {}
        }
    }
}

fn divergence(detail: String) -> Finding {
    Finding {
        kind: Kind::Divergent,
        message: None,
        device: None,
        detail,
    }
}

fn heal(h: &History, ix: &Index, v: &mut Verdict) {
    for f in &h.faults {
        let stats = v.heal.entry(f.kind.clone()).or_default();
        let Some(healed) = f.healed_ms else { continue };
        for (s, id) in ix.acked.iter().filter(|(s, _)| s.end_ms < healed) {
            let mut late: Vec<Option<Ms>> = h
                .expected_devices(s)
                .into_iter()
                .map(|d| ix.received.get(&(d, *id)).map(|(t, _)| *t))
                .filter(|t| !matches!(t, Some(t) if *t <= healed))
                .collect();
            if late.is_empty() {
                continue;
            }
            if late.iter().any(Option::is_none) {
                stats.never += 1;
                continue;
            }
            late.sort_unstable();
            if let Some(Some(last)) = late.last() {
                stats.latencies_ms.push(last - healed);
            }
        }
        stats.latencies_ms.sort_unstable();
    }
}

#[cfg(test)]
mod tests;

/// A body as a finding shows it: quoted, its first 60 characters and its length when longer.
fn shown(body: &str) -> String {
    match body.char_indices().nth(60) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &body[..cut], body.len()),
        None => format!("{body:?}"),
    }
}
