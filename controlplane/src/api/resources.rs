//! The `Resources` service: mesh documents (`trellis/v1`) on the store.
//!
//! Path of an apply (on the leader; followers forward it once):
//! parse and validate every document ([`trellis_resources::parse_documents`])
//! → read barrier → read each resource's current version → check
//! cross-references against the set and the store
//! ([`trellis_resources::check_references`]) → decide created / configured
//! / unchanged → (unless a dry run) one `Txn` command whose compares pin
//! every resource to the version just read, so the set commits as one
//! Raft entry at one revision, or not at all.
//!
//! Resources are stored as canonical JSON at `/{kind}/{namespace}/{name}`.

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_proto::admin as pb;
use trellis_proto::admin::resources_client::ResourcesClient;
use trellis_proto::admin::resources_server::Resources;
use trellis_raft_store::{Command, Compare, CompareOp, CompareTarget, KeyValue, Outcome, TxnOp};
use trellis_resources::{check_references, key_prefix, parse_documents, Kind, Resource, Spec};

use super::is_forwarded;
use crate::error::{ApiError, MAX_VALUE_BYTES};
use crate::node::{Node, Route, MAX_ADMIN_MESSAGE_BYTES};

/// Most resources in one apply: one Raft entry must stay well below the
/// peer message limit, and one revision's events below a watch page.
pub const MAX_APPLY_RESOURCES: usize = 1_000;
/// Most bytes of document text in one apply.
pub const MAX_APPLY_BYTES: usize = 8 * 1024 * 1024;
/// Namespace of a request that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

pub struct ResourcesService {
    node: Arc<Node>,
}

impl ResourcesService {
    pub fn new(node: Arc<Node>) -> Self {
        ResourcesService { node }
    }

    fn client(
        &self,
        channel: tonic::transport::Channel,
    ) -> ResourcesClient<tonic::transport::Channel> {
        ResourcesClient::new(channel)
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
    }

    fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, ApiError> {
        self.node
            .store
            .get(key)
            .map_err(|e| ApiError::internal("store get", e))
    }

    /// Apply `set` (the parsed `r.documents`) on this node, the leader.
    async fn apply_local(
        &self,
        r: pb::ApplyRequest,
        set: Vec<(String, Resource)>,
    ) -> Result<pb::ApplyResponse, ApiError> {
        self.node.read_barrier().await?;
        let mut current = Vec::with_capacity(set.len());
        for (_, res) in &set {
            current.push(self.get_kv(&res.key())?);
        }
        // References resolve against the set first, then the store.
        let lookup = |kind: Kind, ns: &str, name: &str| -> Option<Resource> {
            let key = format!("{}{name}", key_prefix(kind, Some(ns)));
            let kv = self.node.store.get(&key).ok().flatten()?;
            Resource::from_json(&kv.value).ok()
        };
        let mut problems: Vec<String> = check_references(&set, &lookup)
            .iter()
            .map(ToString::to_string)
            .collect();
        problems.extend(self.check_claims(&set)?);
        if !problems.is_empty() {
            return Err(ApiError::InvalidDocuments(problems));
        }
        if let Some(expected) = r.expected_revision {
            for ((_, res), kv) in set.iter().zip(&current) {
                if let Some(kv) = kv.as_ref().filter(|kv| kv.mod_revision > expected) {
                    return Err(ApiError::FailedPrecondition(format!(
                        "{} changed at revision {}, after the expected revision {expected}",
                        res.display_name(),
                        kv.mod_revision
                    )));
                }
            }
        }

        let mut results = Vec::with_capacity(set.len());
        let mut compare = Vec::with_capacity(set.len());
        let mut puts = Vec::new();
        for ((_, res), kv) in set.iter().zip(current) {
            let json = res.to_json();
            let action = match &kv {
                None => pb::apply_result::Action::Created,
                Some(kv) if kv.value == json && kv.lease == r.lease => {
                    pb::apply_result::Action::Unchanged
                }
                Some(_) => pb::apply_result::Action::Configured,
            };
            let key = res.key();
            compare.push(Compare {
                key: key.clone(),
                target: CompareTarget::ModRevision(kv.as_ref().map_or(0, |kv| kv.mod_revision)),
                op: CompareOp::Equal,
            });
            if action != pb::apply_result::Action::Unchanged {
                puts.push(TxnOp::Put {
                    key,
                    value: json.clone(),
                    lease: r.lease,
                });
            }
            results.push(pb::ApplyResult {
                kind: res.kind().as_str().to_string(),
                namespace: res.metadata.namespace.clone(),
                name: res.metadata.name.clone(),
                action: action as i32,
                mod_revision: kv.as_ref().map_or(0, |kv| kv.mod_revision),
                previous: kv.map(|kv| kv.value).unwrap_or_default(),
                applied: json,
            });
        }
        if r.dry_run || puts.is_empty() {
            return Ok(pb::ApplyResponse {
                header: Some(self.node.header(self.node.store.revision())),
                results,
                revision: 0,
            });
        }
        let resp = self
            .node
            .write(Command::Txn {
                compare,
                success: puts,
                failure: Vec::new(),
            })
            .await?;
        match resp.outcome {
            Outcome::Txn {
                succeeded: true, ..
            } => {}
            Outcome::Txn {
                succeeded: false, ..
            } => {
                return Err(ApiError::FailedPrecondition(
                    "resources of this set changed while it was being applied; nothing was applied, apply again".into(),
                ))
            }
            Outcome::LeaseNotFound { id } => return Err(ApiError::LeaseNotFound { id }),
            other => {
                return Err(ApiError::internal(
                    "apply",
                    format!("unexpected outcome {other:?}"),
                ))
            }
        }
        for result in &mut results {
            if result.action != pb::apply_result::Action::Unchanged as i32 {
                result.mod_revision = resp.revision;
            }
        }
        Ok(pb::ApplyResponse {
            header: Some(self.node.header(resp.revision)),
            results,
            revision: resp.revision,
        })
    }
}

impl ResourcesService {
    /// Rules that need the store's other resources of a namespace: a host
    /// is routed by one Route, and one AccessPolicy per namespace sets the
    /// default action. The set's own resources replace their stored
    /// versions; clashes inside the set are the parser's to report.
    fn check_claims(&self, set: &[(String, Resource)]) -> Result<Vec<String>, ApiError> {
        let mut problems = Vec::new();
        let in_set: HashSet<String> = set.iter().map(|(_, r)| r.key()).collect();
        for (source, res) in set {
            let ns = &res.metadata.namespace;
            match &res.spec {
                Spec::Route(route) => {
                    for other in self.stored(Kind::Route, ns, &in_set)? {
                        let Spec::Route(theirs) = &other.spec else {
                            continue;
                        };
                        for (i, host) in route.hosts.iter().enumerate() {
                            if theirs.hosts.contains(host) {
                                problems.push(format!(
                                    "{source}: {}: spec.hosts[{i}]: host {host:?} is already routed by {}; a host has one Route (delete that one first, or change its hosts in the same apply)",
                                    res.display_name(),
                                    other.display_name()
                                ));
                            }
                        }
                    }
                    for (other_source, other) in set {
                        let Spec::Route(theirs) = &other.spec else {
                            continue;
                        };
                        if other.key() <= res.key() || other.metadata.namespace != *ns {
                            continue;
                        }
                        for host in route.hosts.iter().filter(|h| theirs.hosts.contains(h)) {
                            problems.push(format!(
                                "{other_source}: {}: spec.hosts: host {host:?} is also routed by {} in this apply; a host has one Route",
                                other.display_name(),
                                res.display_name()
                            ));
                        }
                    }
                }
                Spec::AccessPolicy(policy) if policy.default_action.is_some() => {
                    for other in self.stored(Kind::AccessPolicy, ns, &in_set)? {
                        if let Spec::AccessPolicy(theirs) = &other.spec {
                            if theirs.default_action.is_some() {
                                problems.push(format!(
                                    "{source}: {}: spec.defaultAction: {} already sets the default action of namespace {ns:?}; only one AccessPolicy per namespace may",
                                    res.display_name(),
                                    other.display_name()
                                ));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(problems)
    }

    /// Stored resources of `kind` in `ns`, except those at `skip` keys.
    fn stored(
        &self,
        kind: Kind,
        ns: &str,
        skip: &HashSet<String>,
    ) -> Result<Vec<Resource>, ApiError> {
        let page = self
            .node
            .store
            .list(
                &key_prefix(kind, Some(ns)),
                None,
                usize::MAX,
                usize::MAX,
                false,
            )
            .map_err(|e| ApiError::internal("store list", e))?;
        Ok(page
            .kvs
            .into_iter()
            .filter(|kv| !skip.contains(&kv.key))
            .filter_map(|kv| Resource::from_json(&kv.value).ok())
            .collect())
    }
}

/// Parse every document of the request; every problem of every document
/// is reported, not only the first.
fn parse_set(docs: &[pb::SourceDocument]) -> Result<Vec<(String, Resource)>, ApiError> {
    let total: usize = docs.iter().map(|d| d.content.len()).sum();
    if total > MAX_APPLY_BYTES {
        return Err(ApiError::invalid(
            "documents",
            format!("{total} bytes of documents; the limit is {MAX_APPLY_BYTES}"),
        ));
    }
    let mut set = Vec::new();
    let mut problems = Vec::new();
    for doc in docs {
        match parse_documents(&doc.source, &doc.content) {
            Ok(resources) => set.extend(resources.into_iter().map(|r| (doc.source.clone(), r))),
            Err(errors) => problems.extend(errors.iter().map(ToString::to_string)),
        }
    }
    // The same resource twice across files (within one file the parser
    // already said so).
    let mut seen = HashSet::new();
    for (source, res) in &set {
        if !seen.insert(res.key()) {
            problems.push(format!(
                "{source}: {}: metadata.name: appears more than once in this apply",
                res.display_name()
            ));
        }
        let size = res.to_json().len();
        if size > MAX_VALUE_BYTES {
            problems.push(format!(
                "{source}: {}: is {size} bytes stored; the limit is {MAX_VALUE_BYTES}",
                res.display_name()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::InvalidDocuments(problems));
    }
    if set.is_empty() {
        return Err(ApiError::invalid(
            "documents",
            "no resources in the documents",
        ));
    }
    if set.len() > MAX_APPLY_RESOURCES {
        return Err(ApiError::invalid(
            "documents",
            format!(
                "{} resources; the limit is {MAX_APPLY_RESOURCES} per apply",
                set.len()
            ),
        ));
    }
    Ok(set)
}

fn parse_kind(field: &str, kind: &str) -> Result<Kind, ApiError> {
    Kind::parse(kind).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        ApiError::invalid(
            field,
            format!(
                "unknown kind {kind:?}; expected one of {}",
                known.join(", ")
            ),
        )
    })
}

fn namespace_or_default(ns: &str) -> &str {
    if ns.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        ns
    }
}

fn resource_key(kind: Kind, ns: &str, name: &str) -> Result<String, ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid("name", "must not be empty"));
    }
    if name.contains('/') || ns.contains('/') {
        return Err(ApiError::invalid("name", "must not contain '/'"));
    }
    Ok(format!("{}{name}", key_prefix(kind, Some(ns))))
}

fn to_pb(kv: KeyValue) -> pb::Resource {
    pb::Resource {
        json: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

#[tonic::async_trait]
impl Resources for ResourcesService {
    #[tracing::instrument(level = "info", skip_all, fields(documents = req.get_ref().documents.len(), dry_run = req.get_ref().dry_run))]
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        // Parsed once here: bad documents are reported by the node that
        // received them, and a leader applies what it parsed.
        let set = parse_set(&r.documents)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, apply, r)
            }
            Route::Local => Ok(Response::new(self.apply_local(r, set).await?)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(kind = %req.get_ref().kind, name = %req.get_ref().name))]
    async fn get(
        &self,
        req: Request<pb::ResourceGetRequest>,
    ) -> Result<Response<pb::ResourceGetResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        let kind = parse_kind("kind", &r.kind)?;
        let ns = namespace_or_default(&r.namespace);
        let key = resource_key(kind, ns, &r.name)?;
        match self.node.read_route(r.serializable, forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, get, r)
            }
            Route::Local => {
                let revision = self.node.store.revision();
                let kv = self
                    .get_kv(&key)?
                    .ok_or_else(|| ApiError::ResourceNotFound {
                        what: format!("{} {ns}/{}", kind.as_str(), r.name),
                    })?;
                Ok(Response::new(pb::ResourceGetResponse {
                    header: Some(self.node.header(revision)),
                    resource: Some(to_pb(kv)),
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(kind = %req.get_ref().kind))]
    async fn list(
        &self,
        req: Request<pb::ResourceListRequest>,
    ) -> Result<Response<pb::ResourceListResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        let kind = parse_kind("kind", &r.kind)?;
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        match self.node.read_route(r.serializable, forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, list, r)
            }
            Route::Local => {
                let prefix = key_prefix(kind, ns);
                let page = self
                    .node
                    .store
                    .list(&prefix, None, usize::MAX, usize::MAX, false)
                    .map_err(|e| ApiError::internal("store list", e))?;
                Ok(Response::new(pb::ResourceListResponse {
                    header: Some(self.node.header(page.revision)),
                    resources: page.kvs.into_iter().map(to_pb).collect(),
                }))
            }
        }
    }

    #[tracing::instrument(level = "info", skip_all, fields(kind = %req.get_ref().kind, name = %req.get_ref().name))]
    async fn delete(
        &self,
        req: Request<pb::ResourceDeleteRequest>,
    ) -> Result<Response<pb::ResourceDeleteResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        let kind = parse_kind("kind", &r.kind)?;
        let ns = namespace_or_default(&r.namespace);
        let key = resource_key(kind, ns, &r.name)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, delete, r)
            }
            Route::Local => {
                let resp = self
                    .node
                    .write(Command::Delete {
                        key,
                        expected_mod_revision: r.expected_mod_revision,
                        prev_kv: false,
                    })
                    .await?;
                match resp.outcome {
                    Outcome::Delete { prev } => Ok(Response::new(pb::ResourceDeleteResponse {
                        header: Some(self.node.header(resp.revision)),
                        deleted: prev.is_some(),
                    })),
                    Outcome::Conflict {
                        key,
                        current_mod_revision,
                    } => Err(ApiError::Conflict {
                        key,
                        current: current_mod_revision,
                    }
                    .into()),
                    other => Err(ApiError::internal(
                        "resource delete",
                        format!("unexpected outcome {other:?}"),
                    )
                    .into()),
                }
            }
        }
    }
}
