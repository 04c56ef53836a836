//! Reading a connection's inbox: the client's `sync`, and the node's own *catch-ups*, which
//! make delivery heal itself.
//!
//! A connection keeps a **mark**: an inbox position at or below which everything for its
//! user has been sent on it (a closed cursor, see `domain::chat::cursor_after`). Live
//! deliveries are fast but can be missed (a peer that could not forward, a node that was
//! paused or cut off, a sender that had not yet learned where the device is); a catch-up
//! reads the inbox after the mark, sends what the connection has not had (the writer drops
//! what it already sent), and moves the mark. Catch-ups run:
//!
//! - shortly after connecting, in a cluster (twice: 3 s and 12 s, a safety net behind the
//!   directory: a node whose route to the user gains this node tells it to catch the user
//!   up at once, below);
//! - when the node is told to ([`crate::domain::hub::Hub::catch_up_all`] and
//!   `catch_up_users`: a peer died or came back, this node was paused, a peer could not
//!   forward to it);
//! - every `--heal-interval-secs` as a safety net;
//! - again after a failure (no read quorum), with backoff, until one succeeds.
//!
//! Once the client has synced (its coverage and the connection's join up), a catch-up that
//! moves the mark sends it as a `cursor` frame, so a reconnect syncs from there.

use std::time::Duration;

use client_proto::{Position, ServerFrame};
use rand::Rng;
use tokio::time::Instant;

use super::Session;
use crate::domain::chat::cursor_after;
use crate::domain::error::ApiError;
use crate::domain::hub::{CatchUpPage, Outbound};

/// When a connection in a cluster first catches up after connecting (behind the catch-up a
/// node that routed to the user by a stale route asks for, see `cluster::directory`).
const FIRST_CATCH_UP: Duration = Duration::from_secs(3);
/// When it catches up the second time.
const SECOND_CATCH_UP: Duration = Duration::from_secs(12);
/// How far before the connection's start its own coverage begins, on top of the seal
/// window: a message acknowledged just after the device connected may have taken its
/// position a little before (the write was in flight).
const START_MARGIN: Duration = Duration::from_secs(10);
/// A catch-up that is asked for starts within this (spreads a node-wide catch-up).
const ASKED_JITTER_MS: u64 = 250;
/// Longest wait between attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// A connection's position in its inbox and its catch-up schedule.
pub(super) struct CatchUp {
    /// Everything at or below it has been sent on this connection (since `covered_from`,
    /// and below that too once the client has synced).
    mark: Position,
    /// Where this connection's own coverage starts (before the client syncs).
    covered_from: Position,
    /// The client has synced: `mark` covers the whole inbox; `cursor` frames may be sent.
    synced: bool,
    /// The mark last sent in a `cursor` frame.
    told: Option<Position>,
    /// When the next catch-up runs.
    due: Option<Instant>,
    /// Catch-ups done since connecting.
    done: u32,
    /// Failed attempts in a row.
    failures: u32,
}

impl CatchUp {
    /// The state of a connection that starts now, when the node's clock reads `now` and
    /// inbox seals trail it by `seal_window`.
    pub(super) fn new(now: Position, seal_window: Duration) -> Self {
        let back = cluster::clock::span((seal_window + START_MARGIN).as_millis() as u64);
        let start = Position(now.0.saturating_sub(back));
        CatchUp {
            mark: start,
            covered_from: start,
            synced: false,
            told: None,
            due: Some(Instant::now() + FIRST_CATCH_UP),
            done: 0,
            failures: 0,
        }
    }

    /// When the next catch-up is due.
    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// A catch-up was asked for: run one soon.
    pub(super) fn ask(&mut self) {
        let jitter = rand::thread_rng().gen_range(0..=ASKED_JITTER_MS);
        let soon = Instant::now() + Duration::from_millis(jitter);
        self.due = Some(self.due.map_or(soon, |d| d.min(soon)));
    }

    /// The client's own `sync` ended with the closed cursor `cursor`.
    fn synced(&mut self, cursor: Option<Position>) {
        let Some(cursor) = cursor else { return };
        // The client has everything up to `cursor` (what it had before `after`, and the
        // sync). It joins this connection's coverage when it reaches its start; otherwise
        // the next catch-up reads from the client's cursor.
        let joined = self.synced || self.covered_from <= cursor;
        self.mark = if joined {
            self.mark.max(cursor)
        } else {
            cursor
        };
        self.synced = true;
        self.told = Some(self.told.map_or(cursor, |t| t.max(cursor)));
    }

    /// The client's own `sync` from `after` failed part-way (no read quorum): it has
    /// everything up to `after` and nothing past it from that sync. The connection takes
    /// over from there: the next catch-ups (soon, and retried until one succeeds) read from
    /// `after`, so nothing between it and this connection's own coverage is left out.
    fn sync_failed(&mut self, after: Option<Position>) {
        let after = after.unwrap_or(Position(0));
        if !self.synced || after < self.mark {
            self.mark = self.mark.min(after);
            self.covered_from = self.covered_from.min(after);
        }
        self.synced = true;
        self.ask();
    }

    /// Schedules the next catch-up after one that succeeded.
    fn succeeded(&mut self, every: Option<Duration>) {
        self.done += 1;
        self.failures = 0;
        let now = Instant::now();
        self.due = match (self.done, every) {
            (1, _) => Some(now + SECOND_CATCH_UP - FIRST_CATCH_UP),
            (_, Some(every)) => Some(now + jittered(every)),
            (_, None) => None,
        };
    }

    /// Schedules a retry after one that failed.
    fn failed(&mut self) {
        self.failures += 1;
        let backoff = Duration::from_millis(500) * 2u32.saturating_pow(self.failures.min(5));
        self.due = Some(Instant::now() + backoff.min(MAX_BACKOFF));
    }

    /// Not due in a single-node cluster (every delivery is local there): the next periodic
    /// one instead.
    fn skipped(&mut self, every: Option<Duration>) {
        self.due = every.map(|e| Instant::now() + jittered(e));
    }
}

/// `every`, give or take a tenth (connections that started together drift apart).
fn jittered(every: Duration) -> Duration {
    every.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
}

impl Session {
    /// Answers `sync`: the inbox after `after` in batches until done, each with a closed
    /// cursor.
    pub(super) async fn sync(&mut self, after: Option<Position>, limit: Option<u32>) {
        let mut from = after;
        let mut seal: Option<Position> = None;
        let mut first = true;
        loop {
            let page = match self.node.chat.sync_page(self.who.user, from, limit).await {
                Ok(p) => p,
                Err(e) => {
                    // The batches sent so far stand (their cursors are closed); the rest is
                    // the connection's to catch up.
                    self.catch_up.sync_failed(from);
                    return self.error(e, None).await;
                }
            };
            seal = match (first, seal, page.seal) {
                (true, _, s) => s,
                (false, Some(a), Some(b)) => Some(a.min(b)),
                (false, _, _) => None,
            };
            first = false;
            self.limit.charge_read_bytes(
                super::reply_bytes(&page.messages),
                std::time::Instant::now(),
            );
            let done = !page.more;
            let cursor = cursor_after(after, page.last, seal, done);
            if page.last.is_some() {
                from = page.last;
            }
            self.emit(Outbound::Frame(Box::new(ServerFrame::SyncBatch {
                messages: page.messages,
                cursor,
                done,
                gap: false,
            })))
            .await;
            if done {
                self.catch_up.synced(cursor);
                return;
            }
        }
    }

    /// Runs the catch-up that is due (see the module docs).
    pub(super) async fn run_catch_up(&mut self) {
        let every = self.node.cfg.heal_interval;
        if self.node.live_members() < 2 {
            self.catch_up.skipped(every);
            return;
        }
        let started = std::time::Instant::now();
        match self.read_after_mark().await {
            Ok(sent) => {
                self.catch_up.succeeded(every);
                metrics::counter!("gateway_catch_ups_total").increment(1);
                metrics::histogram!("gateway_catch_up_seconds")
                    .record(started.elapsed().as_secs_f64());
                if sent > 0 {
                    tracing::debug!(sent, "caught up with the inbox");
                }
                self.tell_cursor().await;
            }
            Err(e) => {
                metrics::counter!("gateway_catch_up_failures_total").increment(1);
                tracing::debug!(error = %e, "catch-up failed; retrying");
                self.catch_up.failed();
            }
        }
    }

    /// Sends every message of the inbox after the mark (the writer drops those this
    /// connection already had) and moves the mark. Returns how many were read.
    async fn read_after_mark(&mut self) -> Result<usize, ApiError> {
        let after = Some(self.catch_up.mark);
        let mut from = after;
        let mut seal: Option<Position> = None;
        let mut first = true;
        let mut read = 0;
        loop {
            // A turn per page read, not held while the frames are queued: a slow client must
            // not hold up other connections' catch-ups.
            let page = {
                let _turn = self.node.catch_up_permit().await;
                self.node.chat.sync_page(self.who.user, from, None).await?
            };
            seal = match (first, seal, page.seal) {
                (true, _, s) => s,
                (false, Some(a), Some(b)) => Some(a.min(b)),
                (false, _, _) => None,
            };
            first = false;
            read += page.messages.len();
            if !page.messages.is_empty() {
                let (taken, page_taken) = tokio::sync::oneshot::channel();
                let page = CatchUpPage {
                    messages: page.messages,
                    taken,
                };
                self.emit(Outbound::CatchUp(Box::new(page))).await;
                // One page at a time (see `CatchUpPage::taken`); an error is a writer gone.
                let _ = page_taken.await;
            }
            if page.last.is_some() {
                from = page.last;
            }
            if !page.more {
                if let Some(c) = cursor_after(after, page.last, seal, true) {
                    self.catch_up.mark = self.catch_up.mark.max(c);
                }
                return Ok(read);
            }
        }
    }

    /// Sends the mark as a `cursor` frame when the client has synced and it moved.
    async fn tell_cursor(&mut self) {
        let c = &mut self.catch_up;
        if !c.synced || c.told.is_some_and(|t| t >= c.mark) {
            return;
        }
        c.told = Some(c.mark);
        let cursor = c.mark;
        self.emit(Outbound::Frame(Box::new(ServerFrame::Cursor { cursor })))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN_15S: u64 = 15_000 << 22;

    #[tokio::test(start_paused = true)]
    async fn a_client_sync_joins_the_connections_coverage_only_when_it_reaches_it() {
        let now = Position(1_000_000 << 22);
        let mut c = CatchUp::new(now, Duration::from_secs(5));
        assert_eq!(c.covered_from, Position(now.0 - SPAN_15S));
        assert_eq!(c.due(), Some(Instant::now() + FIRST_CATCH_UP));
        // A catch-up moved the mark past the start.
        c.mark = Position(now.0 + 5);
        // The client's sync ended below the connection's start: its cursor is where the next
        // catch-up reads from (nothing between it and the start may be skipped).
        c.synced(Some(Position(now.0 - SPAN_15S - 10)));
        assert_eq!(c.mark, Position(now.0 - SPAN_15S - 10));
        assert!(c.synced);
        // A later sync past the mark moves it.
        c.synced(Some(Position(now.0 + 100)));
        assert_eq!(c.mark, Position(now.0 + 100));
        // A sync with no cursor changes nothing.
        c.synced(None);
        assert_eq!(c.mark, Position(now.0 + 100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_client_sync_leaves_no_gap() {
        let now = Position(1_000_000 << 22);
        let mut c = CatchUp::new(now, Duration::from_secs(5));
        // The client had everything up to far before this connection started; its sync
        // failed after the first batch ended at `p`: catch-ups read from `p`.
        let p = Position(now.0 - 10 * SPAN_15S);
        c.sync_failed(Some(p));
        assert_eq!(c.mark, p);
        assert!(c.synced);
        assert!(c.due().unwrap() <= Instant::now() + Duration::from_millis(ASKED_JITTER_MS));
        // A client with nothing: catch-ups read the whole inbox.
        let mut c = CatchUp::new(now, Duration::from_secs(5));
        c.sync_failed(None);
        assert_eq!(c.mark, Position(0));
        // A later sync that fails above what the connection already covers changes nothing.
        let mut c = CatchUp::new(now, Duration::from_secs(5));
        c.synced(Some(Position(now.0 + 100)));
        c.sync_failed(Some(Position(now.0 + 200)));
        assert_eq!(c.mark, Position(now.0 + 100));
    }

    #[tokio::test(start_paused = true)]
    async fn catch_ups_are_scheduled_retried_and_asked_for() {
        let mut c = CatchUp::new(Position(1 << 40), Duration::from_secs(5));
        let t0 = Instant::now();
        c.succeeded(Some(Duration::from_secs(60)));
        assert_eq!(c.due(), Some(t0 + SECOND_CATCH_UP - FIRST_CATCH_UP));
        c.succeeded(Some(Duration::from_secs(60)));
        let due = c.due().unwrap();
        assert!(due >= t0 + Duration::from_secs(54) && due <= t0 + Duration::from_secs(66));
        c.failed();
        c.failed();
        assert_eq!(c.due(), Some(t0 + Duration::from_secs(2)));
        for _ in 0..10 {
            c.failed();
        }
        assert_eq!(c.due(), Some(t0 + MAX_BACKOFF));
        c.ask();
        assert!(c.due().unwrap() <= t0 + Duration::from_millis(ASKED_JITTER_MS));
        c.succeeded(None);
        assert_eq!(c.due(), None, "no periodic catch-up when it is off");
        c.skipped(None);
        assert_eq!(c.due(), None);
    }
}
