//! The config cache: the raw key-value state under the watch prefix and
//! the rules for changing it, enforcing the watch contract on the sidecar's
//! side.
//!
//! Data enters from the watch stream ([`crate::control`]) as whole
//! snapshots ([`ConfigCache::apply_snapshot`]), deltas
//! ([`ConfigCache::apply_delta`]) and progress notices
//! ([`ConfigCache::observe_progress`]), or from disk at start-up
//! ([`ConfigCache::load`]). It leaves as:
//!
//! * an `Arc<`[`MeshConfig`]`>` on a `tokio::sync::watch` channel
//!   ([`ConfigCache::subscribe`]), rebuilt after every change: what the
//!   request path, the disk writer and `/config_dump` read;
//! * the acknowledged revision on another watch channel
//!   ([`ConfigCache::acks`]), which the session stream reports;
//! * a record per update in the [`UpdateLog`].
//!
//! A delta at or below the applied revision, or a snapshot older than it,
//! is refused with an [`ApplyError`] and changes nothing: the caller drops
//! the stream and resumes elsewhere. A delta is checked whole before any of
//! it is applied, so a revision is never half-applied and never applied
//! twice.

use std::sync::Arc;

use tokio::sync::watch;
use trellis_proto::sidecar::{event, Delta, KeyValue};

use crate::mesh::{ConfigSource, Entry, MeshConfig, RawState};
use crate::updates::{KeyChange, UpdateLog};

/// Why an update from the control plane was refused. Every variant is a
/// protocol violation by the serving node: retrying on another node (from
/// the applied revision) is safe, and nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("delta at revision {revision} is not after the applied revision {applied} (refusing to apply it twice or out of order)")]
    StaleDelta { revision: u64, applied: u64 },
    #[error("snapshot at revision {revision} is older than the applied revision {applied}")]
    StaleSnapshot { revision: u64, applied: u64 },
    #[error("delta at revision {revision} arrived before any snapshot")]
    NoBase { revision: u64 },
    #[error("malformed delta at revision {revision}: {reason}")]
    Malformed { revision: u64, reason: String },
}

/// The raw state and its revision, plus the channels it is published on.
#[derive(Debug)]
pub struct ConfigCache {
    raw: Arc<RawState>,
    applied: u64,
    seen: u64,
    source: ConfigSource,
    config_tx: watch::Sender<Arc<MeshConfig>>,
    ack_tx: watch::Sender<u64>,
    log: Arc<UpdateLog>,
}

impl Default for ConfigCache {
    fn default() -> Self {
        ConfigCache::new(Arc::new(UpdateLog::default()))
    }
}

impl ConfigCache {
    /// An empty cache (not loaded) recording updates in `log`.
    pub fn new(log: Arc<UpdateLog>) -> Self {
        let (config_tx, _) = watch::channel(Arc::new(MeshConfig::default()));
        let (ack_tx, _) = watch::channel(0);
        ConfigCache {
            raw: Arc::new(RawState::new()),
            applied: 0,
            seen: 0,
            source: ConfigSource::Empty,
            config_tx,
            ack_tx,
            log,
        }
    }

    /// The compiled config, updated after every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.config_tx.subscribe()
    }

    /// The revision the sidecar's config is known to be current to:
    /// the applied revision, or a higher one a Progress vouched for.
    pub fn acks(&self) -> watch::Receiver<u64> {
        self.ack_tx.subscribe()
    }

    /// The update log.
    pub fn log(&self) -> &Arc<UpdateLog> {
        &self.log
    }

    /// The current compiled config.
    pub fn current(&self) -> Arc<MeshConfig> {
        self.config_tx.borrow().clone()
    }

    /// Revision of the last applied snapshot or delta (0: none).
    pub fn applied_revision(&self) -> u64 {
        self.applied
    }

    /// Highest revision known to be reflected (applied, or vouched for by a
    /// Progress).
    pub fn seen_revision(&self) -> u64 {
        self.seen.max(self.applied)
    }

    /// True once anything was loaded (disk or control plane).
    pub fn is_loaded(&self) -> bool {
        self.source != ConfigSource::Empty
    }

    /// What a new watch asks for: `None` (send a snapshot) if nothing was
    /// loaded, else everything after the applied revision.
    pub fn resume_after(&self) -> Option<u64> {
        self.is_loaded().then_some(self.applied)
    }

    /// Loads a state read from disk (source [`ConfigSource::Disk`]); the
    /// next watch resumes from its revision.
    pub fn load(&mut self, revision: u64, kvs: Vec<KeyValue>) {
        self.raw = Arc::new(
            kvs.into_iter()
                .map(|kv| (kv.key.clone(), Arc::new(Entry::new(kv))))
                .collect(),
        );
        self.applied = revision;
        self.seen = revision;
        self.source = ConfigSource::Disk;
        self.publish();
    }

    /// Replaces the whole state with a (complete, reassembled) snapshot.
    pub fn apply_snapshot(
        &mut self,
        node_id: u64,
        revision: u64,
        kvs: Vec<KeyValue>,
    ) -> Result<(), ApplyError> {
        if self.is_loaded() && revision < self.applied {
            return Err(ApplyError::StaleSnapshot {
                revision,
                applied: self.applied,
            });
        }
        let count = kvs.len();
        self.raw = Arc::new(
            kvs.into_iter()
                .map(|kv| (kv.key.clone(), Arc::new(Entry::new(kv))))
                .collect(),
        );
        self.applied = revision;
        self.seen = self.seen.max(revision);
        self.source = ConfigSource::ControlPlane { node_id };
        self.publish();
        self.log
            .push("snapshot", revision, node_id, Vec::new(), count);
        tracing::info!(revision, node_id, keys = count, "applied snapshot");
        Ok(())
    }

    /// Applies one revision's events, if it is after the applied revision.
    pub fn apply_delta(&mut self, node_id: u64, delta: &Delta) -> Result<(), ApplyError> {
        let revision = delta.revision;
        if !self.is_loaded() {
            return Err(ApplyError::NoBase { revision });
        }
        if revision <= self.applied {
            return Err(ApplyError::StaleDelta {
                revision,
                applied: self.applied,
            });
        }
        // Check everything before changing anything.
        let mut changes = Vec::with_capacity(delta.events.len());
        for (i, ev) in delta.events.iter().enumerate() {
            let malformed = |reason: String| ApplyError::Malformed {
                revision,
                reason: format!("events[{i}]: {reason}"),
            };
            let ty = event::Type::try_from(ev.r#type)
                .map_err(|_| malformed(format!("unknown event type {}", ev.r#type)))?;
            let kv = ev
                .kv
                .as_ref()
                .ok_or_else(|| malformed("no key-value".into()))?;
            if kv.key.is_empty() {
                return Err(malformed("empty key".into()));
            }
            changes.push((ty, kv));
        }
        let raw = Arc::make_mut(&mut self.raw);
        let mut keys = Vec::with_capacity(changes.len());
        for (ty, kv) in changes {
            match ty {
                event::Type::Put => {
                    raw.insert(kv.key.clone(), Arc::new(Entry::new(kv.clone())));
                }
                event::Type::Delete => {
                    raw.remove(&kv.key);
                }
            }
            keys.push(KeyChange {
                event_type: match ty {
                    event::Type::Put => "put",
                    event::Type::Delete => "delete",
                },
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
            });
        }
        self.applied = revision;
        self.seen = self.seen.max(revision);
        self.source = ConfigSource::ControlPlane { node_id };
        self.publish();
        let n = keys.len();
        tracing::debug!(revision, node_id, events = n, "applied delta");
        self.log.push("delta", revision, node_id, keys, n);
        Ok(())
    }

    /// A Progress: everything up to `revision` was sent. Advances the
    /// acknowledged revision; the config does not change.
    pub fn observe_progress(&mut self, revision: u64) {
        // Progress vouches for a state only once there is one.
        if self.is_loaded() && revision > self.seen {
            self.seen = revision;
            self.ack_tx.send_if_modified(|v| {
                let new = revision.max(*v);
                std::mem::replace(v, new) != new
            });
        }
    }

    fn publish(&mut self) {
        let config = MeshConfig::build(self.applied, self.source.clone(), Arc::clone(&self.raw));
        self.config_tx.send_replace(Arc::new(config));
        let ack = self.seen_revision();
        self.ack_tx
            .send_if_modified(|v| std::mem::replace(v, ack) != ack);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::sidecar::Event;
    use trellis_resources::{parse_documents, Kind, Resource};

    const BOOKINFO: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: Instance
metadata: {name: reviews-1, namespace: default}
spec: {service: reviews, address: 10.0.0.1, port: 9080, labels: {version: v1}}
---
apiVersion: trellis/v1
kind: Instance
metadata: {name: reviews-2, namespace: default}
spec: {service: reviews, address: 10.0.0.2, port: 9080, labels: {version: v2}}
---
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: trellis/v1
kind: Route
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
    - route:
        - {destination: {service: reviews, subset: v1}, weight: 90}
        - {destination: {service: reviews, subset: v2}, weight: 10}
---
apiVersion: trellis/v1
kind: Quota
metadata: {name: ratings-limit, namespace: default}
spec: {maxAmount: 100, validDuration: 1s}
---
apiVersion: trellis/v1
kind: AccessPolicy
metadata: {name: default-deny, namespace: default}
spec: {defaultAction: deny}
"#;

    fn resources() -> Vec<Resource> {
        parse_documents("bookinfo.yaml", BOOKINFO).unwrap()
    }

    fn kv(key: &str, value: &[u8], rev: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    fn res_kv(r: &Resource, rev: u64) -> KeyValue {
        kv(&r.key(), &r.to_json(), rev)
    }

    fn put(kv: KeyValue) -> Event {
        Event {
            r#type: event::Type::Put as i32,
            kv: Some(kv),
        }
    }

    fn del(key: &str, rev: u64) -> Event {
        Event {
            r#type: event::Type::Delete as i32,
            kv: Some(kv(key, b"", rev)),
        }
    }

    #[test]
    fn snapshot_replaces_everything() {
        let mut c = ConfigCache::default();
        let rx = c.subscribe();
        assert!(!rx.borrow().is_loaded());
        assert_eq!(c.resume_after(), None);
        c.apply_snapshot(1, 5, vec![kv("/a", b"1", 3), kv("/b", b"2", 5)])
            .unwrap();
        c.apply_snapshot(2, 7, vec![kv("/c", b"3", 7)]).unwrap();
        let cfg = rx.borrow().clone();
        assert_eq!(cfg.revision, 7);
        assert_eq!(cfg.source, ConfigSource::ControlPlane { node_id: 2 });
        assert_eq!(cfg.raw.keys().collect::<Vec<_>>(), ["/c"]);
        assert_eq!(c.resume_after(), Some(7));
        assert_eq!(*c.acks().borrow(), 7);
        let log = c.log().records();
        assert_eq!(log.len(), 2);
        assert_eq!(
            (
                log[1].kind,
                log[1].revision,
                log[1].node_id,
                log[1].key_count
            ),
            ("snapshot", 7, 2, 1)
        );
    }

    #[test]
    fn delta_puts_and_deletes() {
        let mut c = ConfigCache::default();
        c.apply_snapshot(1, 5, vec![kv("/a", b"1", 3), kv("/b", b"2", 5)])
            .unwrap();
        let d = Delta {
            revision: 6,
            events: vec![
                put(kv("/a", b"new", 6)),
                del("/b", 6),
                put(kv("/c", b"3", 6)),
            ],
        };
        c.apply_delta(3, &d).unwrap();
        let cfg = c.current();
        assert_eq!(cfg.revision, 6);
        assert_eq!(cfg.raw.keys().collect::<Vec<_>>(), ["/a", "/c"]);
        assert_eq!(cfg.get_raw("/a").unwrap().value, b"new");
        let rec = c.log().records().pop().unwrap();
        assert_eq!(rec.kind, "delta");
        assert_eq!(rec.node_id, 3);
        assert_eq!(
            rec.keys
                .iter()
                .map(|k| (k.event_type, k.key.as_str(), k.mod_revision))
                .collect::<Vec<_>>(),
            [("put", "/a", 6), ("delete", "/b", 6), ("put", "/c", 6)]
        );
    }

    #[test]
    fn stale_deltas_and_snapshots_are_refused_and_change_nothing() {
        let mut c = ConfigCache::default();
        let d = Delta {
            revision: 4,
            events: vec![put(kv("/x", b"x", 4))],
        };
        assert_eq!(
            c.apply_delta(1, &d),
            Err(ApplyError::NoBase { revision: 4 })
        );
        c.apply_snapshot(1, 5, vec![kv("/a", b"1", 5)]).unwrap();
        c.apply_delta(
            1,
            &Delta {
                revision: 6,
                events: vec![put(kv("/b", b"2", 6))],
            },
        )
        .unwrap();
        let before = c.current();
        for rev in [5, 6] {
            let d = Delta {
                revision: rev,
                events: vec![put(kv("/z", b"z", rev))],
            };
            assert_eq!(
                c.apply_delta(2, &d),
                Err(ApplyError::StaleDelta {
                    revision: rev,
                    applied: 6
                })
            );
        }
        assert_eq!(
            c.apply_snapshot(2, 5, vec![]),
            Err(ApplyError::StaleSnapshot {
                revision: 5,
                applied: 6
            })
        );
        let bad = Delta {
            revision: 7,
            events: vec![
                put(kv("/ok", b"1", 7)),
                Event {
                    r#type: 9,
                    kv: Some(kv("/q", b"", 7)),
                },
            ],
        };
        assert!(matches!(
            c.apply_delta(2, &bad),
            Err(ApplyError::Malformed { revision: 7, .. })
        ));
        let no_kv = Delta {
            revision: 7,
            events: vec![Event {
                r#type: 0,
                kv: None,
            }],
        };
        assert!(matches!(
            c.apply_delta(2, &no_kv),
            Err(ApplyError::Malformed { .. })
        ));
        assert!(Arc::ptr_eq(&before, &c.current()), "nothing was published");
        assert_eq!(c.applied_revision(), 6);
        assert!(
            c.current().get_raw("/ok").is_none(),
            "a refused delta is not half-applied"
        );
        assert_eq!(c.log().records().len(), 2);
    }

    #[test]
    fn progress_advances_acks_not_config() {
        let mut c = ConfigCache::default();
        c.apply_snapshot(1, 5, vec![]).unwrap();
        let acks = c.acks();
        let before = c.current();
        c.observe_progress(9);
        assert_eq!(*acks.borrow(), 9);
        c.observe_progress(8);
        assert_eq!(*acks.borrow(), 9, "never backwards");
        assert!(Arc::ptr_eq(&before, &c.current()));
        assert_eq!(c.applied_revision(), 5);
        assert_eq!(
            c.resume_after(),
            Some(5),
            "resume from the applied revision"
        );
        // A delta after the progress point still applies.
        c.apply_delta(
            1,
            &Delta {
                revision: 10,
                events: vec![],
            },
        )
        .unwrap();
        assert_eq!(*acks.borrow(), 10);
    }

    #[test]
    fn disk_load_is_ready_and_resumes() {
        let mut c = ConfigCache::default();
        c.load(42, vec![kv("/a", b"1", 40)]);
        let cfg = c.current();
        assert!(cfg.is_loaded());
        assert_eq!(cfg.source, ConfigSource::Disk);
        assert_eq!(c.resume_after(), Some(42));
        assert!(c
            .apply_delta(
                1,
                &Delta {
                    revision: 42,
                    events: vec![]
                }
            )
            .is_err());
        c.apply_delta(
            1,
            &Delta {
                revision: 43,
                events: vec![],
            },
        )
        .unwrap();
        assert_eq!(
            c.current().source,
            ConfigSource::ControlPlane { node_id: 1 }
        );
    }

    #[test]
    fn compiled_indexes_find_real_resources() {
        let mut c = ConfigCache::default();
        let kvs: Vec<_> = resources().iter().map(|r| res_kv(r, 3)).collect();
        c.apply_snapshot(1, 3, kvs).unwrap();
        let cfg = c.current();
        assert_eq!(cfg.skipped(), 0);
        assert_eq!(cfg.counts()[&Kind::Service], 2);
        assert_eq!(cfg.counts()[&Kind::Instance], 2);

        let (svc, spec) = cfg.service("default", "reviews").unwrap();
        assert_eq!(svc.metadata.name, "reviews");
        assert_eq!(spec.ports[0].port, 9080);
        assert!(cfg.service("default", "nope").is_none());
        assert!(cfg.service("other", "reviews").is_none());

        let addrs: Vec<String> = cfg
            .instances("default", "reviews")
            .map(|(_, i)| i.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(cfg.instances("default", "ratings").count(), 0);

        let routes: Vec<_> = cfg.routes_for_host("default", "reviews").collect();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].1.http[0].route[1].weight, Some(10));

        let (_, dp) = cfg.destination_policy("default", "reviews").unwrap();
        assert_eq!(dp.subsets.len(), 2);
        assert_eq!(cfg.quotas("default").next().unwrap().1.max_amount, 100);
        assert_eq!(cfg.access_policies("default").count(), 1);
        assert_eq!(cfg.resources().count(), 8);

        // Deleting an instance and changing the route re-indexes.
        let mut route = resources()
            .into_iter()
            .find(|r| r.kind() == Kind::Route)
            .unwrap();
        if let trellis_resources::Spec::Route(rt) = &mut route.spec {
            rt.hosts = vec!["ratings".into()];
        }
        c.apply_delta(
            1,
            &Delta {
                revision: 4,
                events: vec![
                    del("/instance/default/reviews-1", 4),
                    put(res_kv(&route, 4)),
                ],
            },
        )
        .unwrap();
        let cfg = c.current();
        assert_eq!(cfg.instances("default", "reviews").count(), 1);
        assert_eq!(cfg.routes_for_host("default", "reviews").count(), 0);
        assert_eq!(cfg.routes_for_host("default", "ratings").count(), 1);
    }

    #[test]
    fn bad_values_are_skipped_and_counted() {
        let mut c = ConfigCache::default();
        let good = resources().remove(0);
        let svc_json = good.to_json();
        c.apply_snapshot(
            1,
            3,
            vec![
                res_kv(&good, 3),
                kv("/route/default/garbage", b"{not json", 3),
                kv("/service/default/bytes", &[0xff, 0xfe], 3),
                // A valid Service stored under another name's key.
                kv("/service/default/impostor", &svc_json, 3),
                // Valid document of the wrong kind for its key.
                kv("/route/default/reviews", &svc_json, 3),
                kv("/not-a-resource/key", b"anything", 3),
                kv("/_misc", &[0, 1, 2], 3),
            ],
        )
        .unwrap();
        let cfg = c.current();
        assert_eq!(cfg.skipped(), 4);
        assert_eq!(cfg.resources().count(), 1);
        assert_eq!(cfg.raw.len(), 7, "everything is kept raw");
        assert!(cfg.service("default", "reviews").is_some());
        assert!(cfg.service("default", "impostor").is_none());
    }
}
