//! Virtual time: the clock, the event queue, and the dispatch of each event
//! to the part of the host that handles it.
//!
//! Nothing in the host happens on its own: ticks, upstream answers, retries,
//! callout answers and scheduled requests are events in one queue ordered by
//! (virtual time, sequence number), and time moves only when a test calls
//! [`Host::advance`] or [`Host::run_until`]. The same inputs and seed give
//! the same sequence of guest calls, so a scenario of thousands of requests is
//! reproducible to the byte and takes no wall-clock time to wait out.

use std::cmp::Reverse;
use std::time::Duration;

use super::client::Request;
use super::{Host, PluginId, StreamId};
use crate::vm::CallResponse;
use crate::world::QueueOwner;

/// Something due at a virtual time. Stream events carry the router's
/// `generation` at scheduling time and are dropped if it has moved on (a
/// newer attempt, a local reply, the end of the stream).
pub(super) enum Event {
    Tick {
        plugin: PluginId,
        worker: usize,
        generation: u64,
    },
    CallDone {
        plugin: PluginId,
        worker: usize,
        context_id: u32,
        token: u32,
        response: CallResponse,
    },
    QueueReady {
        owner: QueueOwner,
        queue_id: u32,
    },
    StartRequest {
        worker: Option<usize>,
        request: Box<Request>,
        tag: u64,
    },
    AttemptHeaders {
        stream: StreamId,
        generation: u64,
    },
    AttemptConnectFailure {
        stream: StreamId,
        generation: u64,
    },
    AttemptChunk {
        stream: StreamId,
        generation: u64,
        index: usize,
    },
    AttemptReset {
        stream: StreamId,
        generation: u64,
    },
    Retry {
        stream: StreamId,
        generation: u64,
    },
    PerTryTimeout {
        stream: StreamId,
        generation: u64,
    },
}

/// An event in the queue, ordered by (time, sequence) so that events due at
/// the same instant run in the order they were scheduled.
pub(super) struct Scheduled {
    pub(super) at: u64,
    pub(super) seq: u64,
    pub(super) event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Host {
    /// Virtual now, ns since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.world.borrow().now_ns
    }

    /// Virtual time since the host started.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now_ns() - self.options.start_time_ns)
    }

    /// Moves virtual time forward by `by`, running every event due on the way
    /// (ticks, upstream answers, callouts) in order.
    pub fn advance(&mut self, by: Duration) {
        let until = self.now_ns().saturating_add(by.as_nanos() as u64);
        self.run_events_until(until);
        self.world.borrow_mut().now_ns = until;
    }

    pub(super) fn run_events_until(&mut self, until: u64) {
        while let Some(Reverse(next)) = self.events.peek() {
            if next.at > until {
                break;
            }
            let Some(Reverse(item)) = self.events.pop() else {
                break;
            };
            {
                let mut world = self.world.borrow_mut();
                world.now_ns = world.now_ns.max(item.at);
            }
            self.handle(item.event);
            self.run_pending();
        }
    }

    /// Runs events until `done(self)` holds or `limit` of virtual time passes;
    /// returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Host) -> bool) -> bool {
        let deadline = self.now_ns().saturating_add(limit.as_nanos() as u64);
        loop {
            if done(self) {
                return true;
            }
            let Some(Reverse(next)) = self.events.peek() else {
                return done(self);
            };
            if next.at > deadline {
                self.world.borrow_mut().now_ns = deadline;
                return done(self);
            }
            let at = next.at;
            self.run_events_until(at);
        }
    }

    pub(super) fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    pub(super) fn schedule_in(&mut self, after_ns: u64, event: Event) {
        let at = self.now_ns().saturating_add(after_ns);
        self.schedule(at, event);
    }
}

impl Host {
    /// Runs one event: each kind goes to the module that owns its concern.
    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick {
                plugin,
                worker,
                generation,
            } => self.fire_tick(plugin, worker, generation),
            Event::CallDone {
                plugin,
                worker,
                context_id,
                token,
                response,
            } => self.deliver_call_response(plugin, worker, context_id, token, response),
            Event::QueueReady { owner, queue_id } => self.notify_queue_ready(owner, queue_id),
            Event::StartRequest {
                worker,
                request,
                tag,
            } => {
                let worker = worker.unwrap_or_else(|| {
                    let w = self.next_worker % self.options.workers;
                    self.next_worker += 1;
                    w
                });
                let id = self.open_stream(worker, *request);
                self.tags.insert(id, tag);
            }
            Event::AttemptHeaders { stream, generation } => {
                self.on_attempt_headers(stream, generation)
            }
            Event::AttemptConnectFailure { stream, generation } => {
                self.on_connect_failure(stream, generation)
            }
            Event::AttemptChunk {
                stream,
                generation,
                index,
            } => self.on_attempt_chunk(stream, generation, index),
            Event::AttemptReset { stream, generation } => self.on_attempt_reset(stream, generation),
            Event::Retry { stream, generation } => self.on_retry(stream, generation),
            Event::PerTryTimeout { stream, generation } => {
                self.on_per_try_timeout(stream, generation)
            }
        }
    }
}
