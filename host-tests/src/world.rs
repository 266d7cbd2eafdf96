//! State every worker VM of a host sees: virtual clock, shared data, shared
//! queues, metrics and logs.
//!
//! Envoy keeps shared data and queues process-wide per `vm_id`, and stats in one
//! store; the harness keeps them in one `World` per [`crate::Host`], behind an
//! `Rc<RefCell<_>>` that each VM's `Store` data holds. Nothing is global, so
//! tests run in parallel.

use std::collections::{BTreeMap, HashMap};

use crate::abi::{LogLevel, MetricType, Status};

/// One line a guest logged with `proxy_log` (or the host logged about a guest).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogRecord {
    /// Virtual time of the call, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub level: LogLevel,
    /// Plugin name of the VM that logged (`"host"` for the harness itself).
    pub plugin: String,
    /// Worker index of the VM.
    pub worker: usize,
    pub message: String,
}

/// Shared data with Envoy's semantics: per `vm_id`, a value and a cas per key;
/// `set` with a non-zero stale cas fails with `CasMismatch`, cas 0 overwrites.
#[derive(Default, Debug)]
pub struct SharedData {
    entries: HashMap<(String, Vec<u8>), (Vec<u8>, u32)>,
    next_cas: u32,
}

impl SharedData {
    /// Value and cas of `key`, or `NotFound`.
    pub fn get(&self, vm_id: &str, key: &[u8]) -> Result<(Vec<u8>, u32), Status> {
        self.entries
            .get(&(vm_id.to_owned(), key.to_vec()))
            .cloned()
            .ok_or(Status::NotFound)
    }

    /// Stores `value` when `cas` is 0 or matches; every store gets a new cas.
    pub fn set(&mut self, vm_id: &str, key: &[u8], value: &[u8], cas: u32) -> Status {
        let next = self.bump_cas();
        match self.entries.get_mut(&(vm_id.to_owned(), key.to_vec())) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Status::CasMismatch;
                }
                *entry = (value.to_vec(), next);
            }
            None => {
                self.entries
                    .insert((vm_id.to_owned(), key.to_vec()), (value.to_vec(), next));
            }
        }
        Status::Ok
    }

    /// Number of keys stored for `vm_id` (filters must keep key sets bounded).
    pub fn key_count(&self, vm_id: &str) -> usize {
        self.entries.keys().filter(|(vm, _)| vm == vm_id).count()
    }

    fn bump_cas(&mut self) -> u32 {
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        self.next_cas
    }
}

/// Who gets `on_queue_ready` for a queue: the context that registered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOwner {
    pub plugin: usize,
    pub worker: usize,
    pub context_id: u32,
}

#[derive(Debug)]
struct Queue {
    owner: QueueOwner,
    items: std::collections::VecDeque<Vec<u8>>,
}

/// Shared queues: registered by name per `vm_id`, resolved by any VM; an
/// enqueue notifies the registering context on its own worker.
#[derive(Default, Debug)]
pub struct SharedQueues {
    ids: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
    /// Notifications not yet delivered, in enqueue order.
    pub(crate) ready: Vec<(QueueOwner, u32)>,
}

impl SharedQueues {
    /// Registers (or re-registers) a queue; returns its id.
    pub fn register(&mut self, vm_id: &str, name: &str, owner: QueueOwner) -> u32 {
        let key = (vm_id.to_owned(), name.to_owned());
        if let Some(&id) = self.ids.get(&key) {
            if let Some(q) = self.queues.get_mut(&id) {
                q.owner = owner;
            }
            return id;
        }
        let id = self.ids.len() as u32 + 1;
        self.ids.insert(key, id);
        self.queues.insert(
            id,
            Queue {
                owner,
                items: Default::default(),
            },
        );
        id
    }

    pub fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.ids.get(&(vm_id.to_owned(), name.to_owned())).copied()
    }

    pub fn enqueue(&mut self, id: u32, value: Vec<u8>) -> Status {
        match self.queues.get_mut(&id) {
            Some(q) => {
                q.items.push_back(value);
                self.ready.push((q.owner, id));
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    pub fn dequeue(&mut self, id: u32) -> Result<Vec<u8>, Status> {
        match self.queues.get_mut(&id) {
            Some(q) => q.items.pop_front().ok_or(Status::Empty),
            None => Err(Status::NotFound),
        }
    }
}

/// A metric as a test reads it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Metric {
    pub kind: MetricType,
    /// Counter or gauge value (gauges may go below zero here; Envoy's are u64).
    pub value: i64,
    /// Every value recorded into a histogram, in order.
    pub samples: Vec<u64>,
}

/// Metrics by name, shared by every VM (Envoy's stats store: two VMs defining
/// the same name update the same stat). Ids are per VM and carry the type in
/// their low two bits, as in Envoy.
#[derive(Default, Debug)]
pub struct Metrics {
    by_name: BTreeMap<String, Metric>,
}

impl Metrics {
    pub(crate) fn define(&mut self, name: &str, kind: MetricType) {
        self.by_name.entry(name.to_owned()).or_insert(Metric {
            kind,
            value: 0,
            samples: Vec::new(),
        });
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut Metric> {
        self.by_name.get_mut(name)
    }

    /// A metric by the name the filter defined (without Envoy's `wasmcustom.` prefix).
    pub fn get(&self, name: &str) -> Option<&Metric> {
        self.by_name.get(name)
    }

    /// Counter or gauge value, 0 when undefined.
    pub fn value(&self, name: &str) -> i64 {
        self.get(name).map_or(0, |m| m.value)
    }

    pub fn all(&self) -> &BTreeMap<String, Metric> {
        &self.by_name
    }
}

/// Node identity the `xds.node.*` properties report.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    /// `xds.node.metadata` (a protobuf Struct in Envoy); string values only here.
    pub metadata: BTreeMap<String, String>,
    pub locality: Locality,
}

/// Region/zone/sub-zone of a node or endpoint (Envoy's `core.v3.Locality`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

impl Locality {
    pub fn zone(region: &str, zone: &str) -> Self {
        Self {
            region: region.into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }
    }
}

/// Everything the VMs of one host share.
#[derive(Debug)]
pub struct World {
    /// Virtual time, nanoseconds since the Unix epoch.
    pub now_ns: u64,
    pub shared_data: SharedData,
    pub queues: SharedQueues,
    pub metrics: Metrics,
    pub logs: Vec<LogRecord>,
    pub node: NodeInfo,
    /// Cluster names `dispatch_http_call` accepts.
    pub cluster_names: std::collections::BTreeSet<String>,
    /// Level `proxy_get_log_level` reports.
    pub log_level: LogLevel,
    /// Whether `proxy_log` lines are also printed to stderr (for debugging a test).
    pub echo_logs: bool,
}

impl World {
    pub fn new(start_ns: u64) -> Self {
        Self {
            now_ns: start_ns,
            shared_data: SharedData::default(),
            queues: SharedQueues::default(),
            metrics: Metrics::default(),
            logs: Vec::new(),
            node: NodeInfo::default(),
            cluster_names: Default::default(),
            log_level: LogLevel::Trace,
            echo_logs: std::env::var_os("SLUICE_HOST_LOGS").is_some(),
        }
    }

    /// Records a log line (and echoes it when `SLUICE_HOST_LOGS` is set).
    pub fn log(&mut self, level: LogLevel, plugin: &str, worker: usize, message: String) {
        if self.echo_logs {
            eprintln!(
                "[{:>12.6}s {level:?} {plugin}#{worker}] {message}",
                self.now_ns as f64 / 1e9
            );
        }
        self.logs.push(LogRecord {
            time_ns: self.now_ns,
            level,
            plugin: plugin.to_owned(),
            worker,
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rules_match_envoy() {
        let mut data = SharedData::default();
        assert_eq!(data.get("vm", b"k"), Err(Status::NotFound));
        assert_eq!(data.set("vm", b"k", b"1", 0), Status::Ok);
        let (_, cas1) = data.get("vm", b"k").unwrap();
        assert_ne!(cas1, 0);
        assert_eq!(data.set("vm", b"k", b"2", cas1), Status::Ok);
        assert_eq!(data.set("vm", b"k", b"3", cas1), Status::CasMismatch);
        assert_eq!(data.get("vm", b"k").unwrap().0, b"2");
        assert_eq!(data.set("vm", b"k", b"4", 0), Status::Ok);
        assert_eq!(data.get("vm", b"k").unwrap().0, b"4");
        // Another vm_id does not see the key.
        assert_eq!(data.get("other", b"k"), Err(Status::NotFound));
    }

    #[test]
    fn queues_notify_the_registering_context() {
        let mut queues = SharedQueues::default();
        let owner = QueueOwner {
            plugin: 0,
            worker: 1,
            context_id: 1,
        };
        let id = queues.register("vm", "jobs", owner);
        assert_eq!(queues.resolve("vm", "jobs"), Some(id));
        assert_eq!(queues.resolve("other-vm", "jobs"), None);
        assert_eq!(queues.dequeue(id), Err(Status::Empty));
        assert_eq!(queues.dequeue(id + 100), Err(Status::NotFound));
        assert_eq!(queues.enqueue(id + 100, b"x".to_vec()), Status::NotFound);
        assert_eq!(queues.enqueue(id, b"a".to_vec()), Status::Ok);
        assert_eq!(queues.enqueue(id, b"b".to_vec()), Status::Ok);
        assert_eq!(queues.ready, vec![(owner, id), (owner, id)]);
        assert_eq!(queues.dequeue(id).unwrap(), b"a");
        // Re-registering keeps the id and moves notifications to the new owner.
        let new_owner = QueueOwner { worker: 0, ..owner };
        assert_eq!(queues.register("vm", "jobs", new_owner), id);
        queues.enqueue(id, b"c".to_vec());
        assert_eq!(queues.ready.last(), Some(&(new_owner, id)));
    }
}
