//! What one chaos run did and saw: the users, devices and groups of the workload, every send
//! with its outcome, every message and connection change each device reported, the faults
//! with their times, and the final reads through every node.
//!
//! The runner writes it as `history.json` next to the nodes' logs; [`crate::chaos::checker`]
//! judges it without any I/O, so a failing run can be checked again offline
//! (`chaos --recheck history.json`). Times are milliseconds since the run's start (a
//! monotonic clock: the nodes' clocks are what the `skew` fault moves, not the runner's).
//! Users, devices, groups and nodes are referred to by index.

use client_proto::{ConversationId, DeviceId, ErrorCode, GroupId, MessageId, UserId};
use serde::{Deserialize, Serialize};

/// Milliseconds since the run's start.
pub type Ms = u64;

/// The record of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub seed: u64,
    /// The fault the run was asked for (`pause`, `mixed`...).
    pub fault: String,
    pub nodes: usize,
    /// Unix milliseconds at `t = 0`, to line the history up with the nodes' logs.
    pub start_unix_ms: u64,
    pub users: Vec<User>,
    pub devices: Vec<Device>,
    pub groups: Vec<Group>,
    pub sends: Vec<Send>,
    pub deliveries: Vec<Delivery>,
    pub links: Vec<LinkEvent>,
    pub faults: Vec<Fault>,
    /// When the senders started (the nemesis schedule counts from here).
    pub workload_start_ms: Ms,
    /// When the senders were told to stop (every fault is healed by then).
    pub workload_end_ms: Ms,
    /// When the devices stopped listening (the end of the catch-up wait).
    pub end_ms: Ms,
    /// Each user's whole inbox, read through each node after the run.
    pub inbox_reads: Vec<InboxRead>,
    /// Each conversation's whole history, read through each node after the run.
    pub history_reads: Vec<HistoryRead>,
    /// Anything the runner wants a reader of the history to know.
    pub notes: Vec<String>,
}

/// A user of the workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub name: String,
    /// Indices into [`History::devices`].
    pub devices: Vec<usize>,
}

/// One logged-in device (a `ChatClient` of its own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Index into [`History::users`].
    pub user: usize,
    pub device_id: DeviceId,
    /// The node it first connected to.
    pub first_node: usize,
}

/// A group; the workload never changes its members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    /// Indices into [`History::users`], the owner first.
    pub members: Vec<usize>,
}

/// Where a send went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A 1:1 message to this user (an index).
    User(usize),
    /// A message to this group (an index into [`History::groups`]).
    Group(usize),
}

/// One `ChatClient::send` of the workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Send {
    /// The sender (an index).
    pub user: usize,
    /// The sending device (an index).
    pub device: usize,
    /// The sender's sequence number; a user's sends run one after another.
    pub seq: u64,
    /// Unique in the run: it names the seed, the user and `seq`.
    pub body: String,
    pub to: Target,
    /// The conversation the message belongs in.
    pub conversation: ConversationId,
    pub start_ms: Ms,
    /// When the send ended (ack, refusal, error or timeout).
    pub end_ms: Ms,
    pub outcome: Outcome,
}

/// How a send ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Stored durably: every recipient device must get it.
    Acked {
        message_id: MessageId,
        conversation: ConversationId,
        ts: u64,
    },
    /// The server refused; with `unavailable` the message may still have been stored, with
    /// any other code it must never appear.
    Refused { code: ErrorCode, message: String },
    /// No answer (timeout, connection closed): the message may or may not appear.
    Indeterminate { reason: String },
}

impl Outcome {
    /// The message id, when acked.
    pub fn message_id(&self) -> Option<MessageId> {
        match self {
            Outcome::Acked { message_id, .. } => Some(*message_id),
            _ => None,
        }
    }

    /// Whether the message may appear at devices without having been acked.
    pub fn may_appear(&self) -> bool {
        match self {
            Outcome::Acked { .. } | Outcome::Indeterminate { .. } => true,
            Outcome::Refused { code, .. } => *code == ErrorCode::Unavailable,
        }
    }
}

/// A message a device's `ChatClient` reported (`Event::Message`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The receiving device (an index).
    pub device: usize,
    /// When the runner took the event from the client. While one of the device's own sends
    /// is pending (a [`Send`] of this device, `start_ms..end_ms`), its events wait inside
    /// the `ChatClient` (see `workload.rs`), so this is an upper bound there.
    pub at_ms: Ms,
    pub message_id: MessageId,
    pub conversation: ConversationId,
    pub from: UserId,
    pub body: String,
}

/// A device connected or lost its connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkEvent {
    pub device: usize,
    /// An upper bound, as for [`Delivery::at_ms`].
    pub at_ms: Ms,
    pub change: LinkChange,
}

/// What [`LinkEvent`] says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkChange {
    Connected { node: usize },
    Disconnected { reason: String },
}

/// One fault the nemesis applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// `kill`, `kill2`, `pause`, `partition` or `skew`.
    pub kind: String,
    /// The nodes it hit.
    pub nodes: Vec<usize>,
    pub applied_ms: Ms,
    /// When it was healed (for `kill`, when the restarted node was ready again); `None` if
    /// healing failed.
    pub healed_ms: Option<Ms>,
}

/// A user's whole inbox (`sync` from nothing, paged until `done`) through one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboxRead {
    pub user: usize,
    pub node: usize,
    /// The message ids in the order they came, or why the read failed.
    pub ids: Result<Vec<MessageId>, String>,
}

/// A conversation's whole history (`GET /v1/conversations/{id}/messages`, paged with
/// `before`) through one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryRead {
    pub conversation: ConversationId,
    pub node: usize,
    /// The message ids in the order the pages gave them (newest first), or why it failed.
    pub ids: Result<Vec<MessageId>, String>,
}

impl History {
    /// The users a send is for, the sender included (its inbox keeps its own messages).
    pub fn participants(&self, send: &Send) -> Vec<usize> {
        let mut users = match send.to {
            Target::User(u) => vec![u],
            Target::Group(g) => self
                .groups
                .get(g)
                .map(|g| g.members.clone())
                .unwrap_or_default(),
        };
        if !users.contains(&send.user) {
            users.push(send.user);
        }
        users
    }

    /// The devices that must get a send's message: every device of every participant but
    /// the sending device itself.
    pub fn expected_devices(&self, send: &Send) -> Vec<usize> {
        self.participants(send)
            .into_iter()
            .filter_map(|u| self.users.get(u))
            .flat_map(|u| u.devices.iter().copied())
            .filter(|d| *d != send.device)
            .collect()
    }

    /// Reads a history written by the runner.
    pub fn from_json(text: &str) -> Result<History, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The history as JSON.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}
