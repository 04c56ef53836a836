//! The chaos suite: real `chatnode` processes on their own loopback addresses, a workload of
//! self-healing `ChatClient`s, a nemesis that kills, pauses, partitions and skews nodes on a
//! seeded schedule, and a checker that proves, from the recorded history alone, that every
//! acked message reached every device it was for, once, in order, and that every node agrees.
//!
//! # Layout
//!
//! - [`run`]: one run from seed to verdict ([`run::run`], [`run::RunOptions`]);
//! - [`cluster`]: the node processes (start, SIGKILL, restart, SIGSTOP/SIGCONT, clock file);
//! - [`firewall`]: iptables partitions between the nodes' addresses, in a chain of their own;
//! - [`lock`]: one run at a time on a machine;
//! - [`nemesis`]: the fault kinds, the seeded schedule, applying and healing;
//! - [`workload`]: users, devices (`ChatClient`s), groups and the senders;
//! - [`recorder`]: the shared, timestamped record the tasks append to;
//! - [`history`]: what a run did and saw (serialisable: `history.json`);
//! - [`reads`]: the final inbox and history reads through every node;
//! - [`checker`]: the pure judgement of a history (self-test in `checker/tests.rs`);
//! - [`report`]: the table and details.
//!
//! Entry points: `cargo run -p chat-tests --bin chaos -- --help` for long runs, and
//! `tests/tests/chaos.rs` for the CI-size runs.

pub mod checker;
pub mod cluster;
pub mod firewall;
pub mod history;
pub mod lock;
pub mod nemesis;
pub mod reads;
pub mod recorder;
pub mod report;
pub mod run;
pub mod workload;

pub use nemesis::FaultKind;
pub use run::{run, Finished, RunOptions, RunOutcome};
