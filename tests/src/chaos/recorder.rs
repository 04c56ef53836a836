//! The recorder: a cheap shared handle that every task of a run appends to (device events,
//! send outcomes, faults), stamping each entry with the time since the run's start. At the
//! end it becomes the run's [`History`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use client_proto::client::Event;
use client_proto::MessageId;

use super::history::{Delivery, Fault, History, LinkChange, LinkEvent, Ms, Outcome, Send};

/// A shared, append-only record of a run.
#[derive(Clone)]
pub struct Recorder {
    t0: Instant,
    // A std mutex: every critical section is a few pushes, never held across an await.
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    history: History,
    /// (device, message) pairs received so far, for [`Recorder::missing`].
    received: HashSet<(usize, MessageId)>,
    /// Whether each device is connected now.
    connected: Vec<bool>,
    /// What the nemesis is doing now.
    current_fault: Option<String>,
    in_flight: usize,
}

/// A glance at a run in progress.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub at_ms: Ms,
    pub acked: usize,
    pub refused: usize,
    pub indeterminate: usize,
    pub in_flight: usize,
    pub deliveries: usize,
    pub connected: usize,
    pub devices: usize,
    pub fault: Option<String>,
}

impl Recorder {
    /// Starts the clock; `history` holds what is known before the run (seed, fault, nodes).
    pub fn new(mut history: History) -> Self {
        history.start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Recorder {
            t0: Instant::now(),
            inner: Arc::new(Mutex::new(Inner {
                history,
                received: HashSet::new(),
                connected: Vec::new(),
                current_fault: None,
                in_flight: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while appending leaves the data usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Milliseconds since the run's start.
    pub fn now_ms(&self) -> Ms {
        self.t0.elapsed().as_millis() as Ms
    }

    /// Lets `f` fill in the workload's users, devices and groups.
    pub fn setup(&self, f: impl FnOnce(&mut History)) {
        let mut inner = self.lock();
        f(&mut inner.history);
        inner.connected = vec![false; inner.history.devices.len()];
    }

    /// What device `device`'s `ChatClient` reported.
    pub fn event(&self, device: usize, event: Event) {
        let at_ms = self.now_ms();
        let mut inner = self.lock();
        match event {
            Event::Message(m) => {
                inner.received.insert((device, m.message_id));
                inner.history.deliveries.push(Delivery {
                    device,
                    at_ms,
                    message_id: m.message_id,
                    conversation: m.conversation,
                    from: m.from,
                    body: m.body,
                });
            }
            Event::Connected { node_id } => {
                if let Some(c) = inner.connected.get_mut(device) {
                    *c = true;
                }
                inner.history.links.push(LinkEvent {
                    device,
                    at_ms,
                    change: LinkChange::Connected {
                        node: usize::from(node_id),
                    },
                });
            }
            Event::Moving { to } => {
                let reason = format!("draining; moving to {to:?}");
                if let Some(c) = inner.connected.get_mut(device) {
                    *c = false;
                }
                inner.history.links.push(LinkEvent {
                    device,
                    at_ms,
                    change: LinkChange::Disconnected { reason },
                });
            }
            Event::Disconnected { reason } => {
                if let Some(c) = inner.connected.get_mut(device) {
                    *c = false;
                }
                inner.history.links.push(LinkEvent {
                    device,
                    at_ms,
                    change: LinkChange::Disconnected { reason },
                });
            }
            Event::Error(e) => inner
                .history
                .notes
                .push(format!("device {device} at {at_ms} ms: error {e}")),
            Event::Presence { .. } => {}
        }
    }

    /// A send is about to start.
    pub fn send_started(&self) {
        self.lock().in_flight += 1;
    }

    /// A send ended.
    pub fn send_ended(&self, send: Send) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        inner.history.sends.push(send);
    }

    /// The nemesis applied a fault; returns its index for [`Recorder::fault_healed`].
    pub fn fault_applied(&self, kind: &str, nodes: &[usize]) -> usize {
        let applied_ms = self.now_ms();
        let mut inner = self.lock();
        inner.current_fault = Some(format!("{kind} {nodes:?}"));
        inner.history.faults.push(Fault {
            kind: kind.to_string(),
            nodes: nodes.to_vec(),
            applied_ms,
            healed_ms: None,
        });
        inner.history.faults.len() - 1
    }

    /// The fault `index` is healed.
    pub fn fault_healed(&self, index: usize) {
        let at = self.now_ms();
        let mut inner = self.lock();
        inner.current_fault = None;
        if let Some(f) = inner.history.faults.get_mut(index) {
            f.healed_ms = Some(at);
        }
    }

    /// Adds a note for the reader of the history.
    pub fn note(&self, note: impl Into<String>) {
        self.lock().history.notes.push(note.into());
    }

    /// Lets `f` change the history (end marks, final reads).
    pub fn update(&self, f: impl FnOnce(&mut History)) {
        f(&mut self.lock().history);
    }

    /// How many (device, acked message) pairs are still missing.
    pub fn missing(&self) -> usize {
        let inner = self.lock();
        let h = &inner.history;
        h.sends
            .iter()
            .filter_map(|s| s.outcome.message_id().map(|id| (s, id)))
            .map(|(s, id)| {
                h.expected_devices(s)
                    .into_iter()
                    .filter(|d| !inner.received.contains(&(*d, id)))
                    .count()
            })
            .sum()
    }

    /// A glance at the run so far.
    pub fn progress(&self) -> Progress {
        let at_ms = self.now_ms();
        let inner = self.lock();
        let mut p = Progress {
            at_ms,
            in_flight: inner.in_flight,
            deliveries: inner.history.deliveries.len(),
            connected: inner.connected.iter().filter(|c| **c).count(),
            devices: inner.connected.len(),
            fault: inner.current_fault.clone(),
            ..Progress::default()
        };
        for s in &inner.history.sends {
            match s.outcome {
                Outcome::Acked { .. } => p.acked += 1,
                Outcome::Refused { .. } => p.refused += 1,
                Outcome::Indeterminate { .. } => p.indeterminate += 1,
            }
        }
        p
    }

    /// Whether every device is connected.
    pub fn all_connected(&self) -> bool {
        self.lock().connected.iter().all(|c| *c)
    }

    /// A copy of the history so far.
    pub fn history(&self) -> History {
        self.lock().history.clone()
    }
}
