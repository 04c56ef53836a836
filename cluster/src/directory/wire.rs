//! The directory's peer messages (request kind [`super::KIND_DIRECTORY`]).

use crate::placement::NodeId;

/// What one node asks of another's directory.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub(crate) enum DirRequest {
    /// Changes since the last request: users whose devices `from` now holds (`true`) or no
    /// longer holds, and users `from` starts (`true`) or stops watching. Answered with the
    /// node sets of the users it starts watching.
    Update {
        from: NodeId,
        /// `from`'s generation: registrations of an older one are forgotten when a newer
        /// one speaks, and a view change to this one does not forget them.
        gen: u64,
        regs: Vec<(u64, bool)>,
        subs: Vec<(u64, bool)>,
    },
    /// Everything `from` holds and watches in `partitions`, replacing what the receiver
    /// knew of it there (after a view change or when asked). Answered like `Update`.
    Statement {
        from: NodeId,
        gen: u64,
        partitions: Vec<u32>,
        regs: Vec<u64>,
        subs: Vec<u64>,
    },
    /// From a home replica to a subscriber: these users' node sets, each as of the
    /// replica's change counter (a subscriber keeps, per replica, the newest it got: a
    /// push and the answer to a subscription travel on different streams).
    Push {
        from: NodeId,
        changes: Vec<(u64, Vec<NodeId>, u64)>,
    },
    /// "Send me your statement": the receiver's view of `from` was reset (it had been
    /// dead or restarted there), so `from` forgot what the receiver holds.
    Resend { from: NodeId },
}

/// The answer to [`DirRequest::Update`] and [`DirRequest::Statement`].
#[derive(Debug, Clone, Default, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub(crate) struct DirReply {
    /// The replier's change counter when it answered.
    pub(crate) seq: u64,
    /// The node sets of the users the request started watching.
    pub(crate) current: Vec<(u64, Vec<NodeId>)>,
}

/// Most users one request may name (the sender chunks its requests below it).
pub(crate) const MAX_USERS_PER_REQUEST: usize = 200_000;
/// Most nodes one user's set may name in a push (a user has at most 32 devices).
pub(crate) const MAX_NODES_PER_USER: usize = 64;
/// Node ids are below this (`placement::NodeId` is 0..1024).
pub(crate) const NODE_IDS: u16 = 1024;

pub(crate) fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ crate::transport::HARD_MAX_FRAME }>()
}

pub(crate) fn encode<T: bincode::Encode>(v: &T) -> Result<Vec<u8>, String> {
    bincode::encode_to_vec(v, config()).map_err(|e| e.to_string())
}

pub(crate) fn decode<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, String> {
    bincode::decode_from_slice(bytes, config())
        .map(|(v, _)| v)
        .map_err(|e| e.to_string())
}

impl DirRequest {
    /// How many users (and partitions) it names.
    pub(crate) fn users(&self) -> usize {
        match self {
            DirRequest::Update { regs, subs, .. } => regs.len() + subs.len(),
            DirRequest::Statement {
                regs,
                subs,
                partitions,
                ..
            } => regs.len() + subs.len() + partitions.len(),
            DirRequest::Push { changes, .. } => changes.len(),
            DirRequest::Resend { .. } => 0,
        }
    }

    pub(crate) fn from(&self) -> NodeId {
        match self {
            DirRequest::Update { from, .. }
            | DirRequest::Statement { from, .. }
            | DirRequest::Push { from, .. }
            | DirRequest::Resend { from } => *from,
        }
    }

    /// Checks the bounds before any work: at most [`MAX_USERS_PER_REQUEST`] users, node ids
    /// that exist, a statement's partitions below `partitions` and each named once, a
    /// pushed node set of at most [`MAX_NODES_PER_USER`].
    pub(crate) fn check(&self, partitions: u32) -> Result<(), &'static str> {
        if self.users() > MAX_USERS_PER_REQUEST {
            return Err("too many users in one request");
        }
        if self.from() >= NODE_IDS {
            return Err("no such node id");
        }
        match self {
            DirRequest::Statement { partitions: ps, .. } => {
                if ps.iter().any(|p| *p >= partitions) {
                    return Err("no such partition");
                }
                let mut sorted = ps.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != ps.len() {
                    return Err("a partition named twice");
                }
            }
            DirRequest::Push { changes, .. } => {
                for (_, nodes, _) in changes {
                    if nodes.len() > MAX_NODES_PER_USER || nodes.iter().any(|n| *n >= NODE_IDS) {
                        return Err("a node set out of bounds");
                    }
                }
            }
            DirRequest::Update { .. } | DirRequest::Resend { .. } => {}
        }
        Ok(())
    }
}
