//! Documents: [`Resource`] (metadata + typed spec), its canonical JSON and
//! YAML forms, and parsing operator text ([`parse_documents`]) and stored
//! bytes ([`Resource::from_json`]) into resources, with [`DocError`]s that
//! name the file, line, column, resource and field.
//!
//! Parsing one document goes: split the text into documents (on `---`
//! lines, or the items of a JSON array) keeping each one's position in the
//! file → size limit → peek `apiVersion`/`kind` → deserialize into the typed
//! document for that kind (unknown fields rejected, so a typo is an error
//! with its field path and line) → [`Resource::validate`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize, Serializer};

use crate::access::AccessPolicySpec;
use crate::policy::DestinationPolicySpec;
use crate::quota::QuotaSpec;
use crate::route::RouteSpec;
use crate::service::{InstanceSpec, ServiceSpec};
use crate::validate::{self, Errors, FieldError};

/// The one API version this crate reads and writes.
pub const API_VERSION: &str = "trellis/v1";

/// Largest document accepted, in bytes of its text: 256 KiB.
///
/// Every resource is replicated through Raft and pushed to every sidecar,
/// so one must stay far below the store's batch size; the largest
/// legitimate documents (a Route with many rules, a 64 KiB degrade body)
/// fit several times over. Checked before parsing, so an oversized
/// document costs nothing to reject.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Namespace of a resource whose metadata does not name one: `default`, as
/// in Kubernetes, so a mesh that does not need namespaces never writes one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// A service and its ports ([`ServiceSpec`]).
    Service,
    /// One endpoint of a service ([`InstanceSpec`]).
    Instance,
    /// Routing rules for services ([`RouteSpec`]).
    Route,
    /// Subsets, balancing and resilience for a service ([`DestinationPolicySpec`]).
    DestinationPolicy,
    /// A rate limit ([`QuotaSpec`]).
    Quota,
    /// Allow/deny rules ([`AccessPolicySpec`]).
    AccessPolicy,
}

impl Kind {
    /// Every kind, in the order documents usually depend on each other.
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::Instance,
        Kind::Route,
        Kind::DestinationPolicy,
        Kind::Quota,
        Kind::AccessPolicy,
    ];

    /// The name written in documents' `kind` field: `"Route"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Instance => "Instance",
            Kind::Route => "Route",
            Kind::DestinationPolicy => "DestinationPolicy",
            Kind::Quota => "Quota",
            Kind::AccessPolicy => "AccessPolicy",
        }
    }

    /// The first segment of the kind's store keys: `"route"`,
    /// `"destinationpolicy"`, `"accesspolicy"`, ...
    pub fn key_segment(&self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Instance => "instance",
            Kind::Route => "route",
            Kind::DestinationPolicy => "destinationpolicy",
            Kind::Quota => "quota",
            Kind::AccessPolicy => "accesspolicy",
        }
    }

    /// Reads a kind as an operator types it, ignoring case: the kind name
    /// (`Route`), its key segment (`route`), plural (`routes`,
    /// `destinationpolicies`) or short name (`svc`, `inst`, `rt`, `dp`,
    /// `quota`, `ap`).
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Kind::Service,
            "instance" | "instances" | "inst" => Kind::Instance,
            "route" | "routes" | "rt" => Kind::Route,
            "destinationpolicy" | "destinationpolicies" | "dp" => Kind::DestinationPolicy,
            "quota" | "quotas" => Kind::Quota,
            "accesspolicy" | "accesspolicies" | "ap" => Kind::AccessPolicy,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Identity and labels of a resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Name, a DNS-1123 label, unique per kind and namespace.
    pub name: String,
    /// Namespace, a DNS-1123 label; default [`DEFAULT_NAMESPACE`].
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Free-form labels for operators and tools.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Metadata {
    /// Metadata with no labels.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Metadata {
        Metadata {
            name: name.into(),
            namespace: namespace.into(),
            labels: BTreeMap::new(),
        }
    }
}

/// The typed `spec` of a resource; the variant is its kind.
// Not boxed: a Spec lives inside its Resource and is moved rarely, while
// every consumer matches on it; `Spec::Route(r)` beats `Spec::Route(b)` + deref.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    /// `kind: Service`.
    Service(ServiceSpec),
    /// `kind: Instance`.
    Instance(InstanceSpec),
    /// `kind: Route`.
    Route(RouteSpec),
    /// `kind: DestinationPolicy`.
    DestinationPolicy(DestinationPolicySpec),
    /// `kind: Quota`.
    Quota(QuotaSpec),
    /// `kind: AccessPolicy`.
    AccessPolicy(AccessPolicySpec),
}

impl Spec {
    /// The kind this spec belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Service(_) => Kind::Service,
            Spec::Instance(_) => Kind::Instance,
            Spec::Route(_) => Kind::Route,
            Spec::DestinationPolicy(_) => Kind::DestinationPolicy,
            Spec::Quota(_) => Kind::Quota,
            Spec::AccessPolicy(_) => Kind::AccessPolicy,
        }
    }
}

/// One mesh resource. `apiVersion` and `kind` are not stored: they follow
/// from [`API_VERSION`] and the spec's variant, and are written on output.
/// Serializes as the full document (`apiVersion`, `kind`, `metadata`,
/// `spec`).
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// Name, namespace, labels.
    pub metadata: Metadata,
    /// The kind-specific part.
    pub spec: Spec,
}

/// Output form of a document; field order is the canonical order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DocumentOut<'a> {
    api_version: &'static str,
    kind: Kind,
    metadata: &'a Metadata,
    spec: &'a Spec,
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        DocumentOut {
            api_version: API_VERSION,
            kind: self.kind(),
            metadata: &self.metadata,
            spec: &self.spec,
        }
        .serialize(serializer)
    }
}

/// Input form of a document for one kind. `apiVersion` and `kind` were
/// checked by the header peek; they are listed so that unknown-field
/// checking accepts them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentIn<S> {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: Metadata,
    spec: S,
}

/// The first look at a document: just enough to pick the typed parser.
#[derive(Deserialize)]
#[serde(expecting = "a resource document (a mapping with apiVersion, kind, metadata and spec)")]
struct Header {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// Something a typed document can be deserialized from (YAML text or JSON
/// bytes), so the per-kind dispatch is written once.
trait Decode {
    type Error;
    fn decode<S: DeserializeOwned>(&self) -> Result<DocumentIn<S>, Self::Error>;
}

struct YamlText<'a>(&'a str);

impl Decode for YamlText<'_> {
    type Error = serde_norway::Error;
    fn decode<S: DeserializeOwned>(&self) -> Result<DocumentIn<S>, serde_norway::Error> {
        serde_norway::from_str(self.0)
    }
}

struct JsonBytes<'a>(&'a [u8]);

impl Decode for JsonBytes<'_> {
    type Error = serde_json::Error;
    fn decode<S: DeserializeOwned>(&self) -> Result<DocumentIn<S>, serde_json::Error> {
        serde_json::from_slice(self.0)
    }
}

fn decode_resource<D: Decode>(kind: Kind, d: &D) -> Result<Resource, D::Error> {
    fn build<S>(doc: DocumentIn<S>, spec: impl FnOnce(S) -> Spec) -> Resource {
        Resource {
            metadata: doc.metadata,
            spec: spec(doc.spec),
        }
    }
    Ok(match kind {
        Kind::Service => build(d.decode()?, Spec::Service),
        Kind::Instance => build(d.decode()?, Spec::Instance),
        Kind::Route => build(d.decode()?, Spec::Route),
        Kind::DestinationPolicy => build(d.decode()?, Spec::DestinationPolicy),
        Kind::Quota => build(d.decode()?, Spec::Quota),
        Kind::AccessPolicy => build(d.decode()?, Spec::AccessPolicy),
    })
}

fn kind_list() -> String {
    Kind::ALL.map(|k| k.as_str()).join(", ")
}

/// Checks `apiVersion` and `kind`; on failure returns (field, message).
fn check_header(h: &Header) -> Result<Kind, (&'static str, String)> {
    match h.api_version.as_deref() {
        None => return Err(("apiVersion", format!("required, expected {API_VERSION:?}"))),
        Some(API_VERSION) => {}
        Some(other) => {
            return Err((
                "apiVersion",
                format!("unsupported apiVersion {other:?}, expected {API_VERSION:?}"),
            ))
        }
    }
    let Some(kind) = h.kind.as_deref() else {
        return Err(("kind", format!("required, expected one of {}", kind_list())));
    };
    match Kind::ALL.into_iter().find(|k| k.as_str() == kind) {
        Some(k) => Ok(k),
        None => {
            let hint = match Kind::parse(kind) {
                Some(k) => format!(" (did you mean {k}?)"),
                None => String::new(),
            };
            Err((
                "kind",
                format!(
                    "unknown kind {kind:?}, expected one of {}{hint}",
                    kind_list()
                ),
            ))
        }
    }
}

impl Resource {
    /// The resource's kind (from its spec).
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// Its store key: `/{key_segment}/{namespace}/{name}`.
    pub fn key(&self) -> String {
        format!(
            "/{}/{}/{}",
            self.kind().key_segment(),
            self.metadata.namespace,
            self.metadata.name
        )
    }

    /// How messages name it: `Route default/ratings`.
    pub fn display_name(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind(),
            self.metadata.namespace,
            self.metadata.name
        )
    }

    /// The canonical stored form: compact JSON with keys `apiVersion`,
    /// `kind`, `metadata`, `spec` in that order, struct fields in
    /// declaration order and maps sorted, so equal resources give equal
    /// bytes. Fields at their default are left out where the type says so.
    pub fn to_json(&self) -> Vec<u8> {
        // Cannot fail: every map key is a string and every value is plain
        // data. Should that ever change, an empty value is rejected by
        // from_json rather than taking the process down.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the stored form (any JSON document of this API, in fact).
    /// Checks `apiVersion`, `kind` and the schema, but does not run
    /// [`Resource::validate`]: the store only holds validated resources, and
    /// a reader should not lose a stored resource because a later version
    /// tightened a rule. Call `validate` on bytes from elsewhere. Errors
    /// have `source` `"<json>"` and the line and column in `bytes`.
    pub fn from_json(bytes: &[u8]) -> Result<Resource, DocError> {
        const SOURCE: &str = "<json>";
        let header: Header = serde_json::from_slice(bytes).map_err(|e| json_error(SOURCE, &e))?;
        let kind = check_header(&header).map_err(|(path, message)| DocError {
            source: SOURCE.to_string(),
            line: None,
            column: None,
            resource: None,
            path: path.to_string(),
            message,
        })?;
        decode_resource(kind, &JsonBytes(bytes)).map_err(|e| json_error(SOURCE, &e))
    }

    /// The document as YAML, as an operator would write it (`trellisctl
    /// get -o yaml`).
    pub fn to_yaml(&self) -> String {
        // Cannot fail for the same reasons as to_json.
        serde_norway::to_string(self).unwrap_or_default()
    }

    /// Checks every single-resource rule (names, ranges, one-of fields,
    /// weights, regexes, ...) and returns all violations, each with its
    /// field path. Rules that need other resources are in
    /// [`crate::check_references`].
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Errors::default();
        validate::dns_label(&mut errs, "metadata.name", "name", &self.metadata.name);
        validate::dns_label(
            &mut errs,
            "metadata.namespace",
            "namespace",
            &self.metadata.namespace,
        );
        validate::labels(&mut errs, "metadata.labels", &self.metadata.labels);
        match &self.spec {
            Spec::Service(s) => s.validate(&mut errs),
            Spec::Instance(s) => s.validate(&mut errs),
            Spec::Route(s) => s.validate(&mut errs),
            Spec::DestinationPolicy(s) => s.validate(&mut errs),
            Spec::Quota(s) => s.validate(&mut errs),
            Spec::AccessPolicy(s) => s.validate(&mut errs),
        }
        if errs.0.is_empty() {
            Ok(())
        } else {
            Err(errs.0)
        }
    }
}

/// The key prefix that lists resources of `kind`: `/route/`, or within one
/// namespace `/route/default/`.
pub fn key_prefix(kind: Kind, namespace: Option<&str>) -> String {
    match namespace {
        None => format!("/{}/", kind.key_segment()),
        Some(ns) => format!("/{}/{}/", kind.key_segment(), ns),
    }
}

/// Splits a store key `/{key_segment}/{namespace}/{name}` back into its
/// parts; `None` if it is not a resource key.
pub fn parse_key(key: &str) -> Option<(Kind, &str, &str)> {
    let mut parts = key.strip_prefix('/')?.split('/');
    let (seg, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ns.is_empty() || name.is_empty() {
        return None;
    }
    let kind = Kind::ALL.into_iter().find(|k| k.key_segment() == seg)?;
    Some((kind, ns, name))
}

/// One problem with one document, rendered as
/// `route.yaml: Route default/ratings: spec.http[0].route: weights sum to 99, expected 100`
/// or, for parse errors,
/// ``route.yaml:12:5: spec.http[0]: unknown field `rout`, expected one of ...``
/// (the source, then `:line[:column]` when known, then the resource when
/// known, then the field path when there is one, then the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    /// The file the document came from (`-` for stdin, `<json>` for
    /// [`Resource::from_json`]).
    pub source: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// 1-based column, when known (only with `line`).
    pub column: Option<usize>,
    /// The resource's display name (`Route default/ratings`), when known.
    pub resource: Option<String>,
    /// Field path (`spec.http[0].route`); empty for the whole document.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(r) = &self.resource {
            write!(f, "{r}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for DocError {}

/// A document's text and where it starts in the file (1-based), so parser
/// positions inside it can be turned into file positions.
#[derive(Clone, Copy, Debug)]
struct Chunk<'a> {
    text: &'a str,
    line: usize,
    column: usize,
}

impl Chunk<'_> {
    /// File position of a 1-based (line, column) inside the chunk.
    fn position(&self, line: usize, column: usize) -> (usize, usize) {
        let line_in_file = self.line + line.saturating_sub(1);
        let column_in_file = if line <= 1 {
            self.column + column.saturating_sub(1)
        } else {
            column
        };
        (line_in_file, column_in_file)
    }

    /// File line of the first line with content (not blank, a comment or a
    /// document marker), or of the chunk's start.
    fn content_line(&self) -> usize {
        self.text
            .lines()
            .position(|l| !is_blank_line(l))
            .map_or(self.line, |i| self.line + i)
    }

    /// File line of a top-level `key:` in a YAML document, if written so.
    fn key_line(&self, key: &str) -> Option<usize> {
        self.text
            .lines()
            .position(|l| {
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
            })
            .map(|i| self.line + i)
    }
}

/// True if `line` starts a new YAML document: `---` alone or followed by
/// whitespace.
fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// True for lines that carry no document content.
fn is_blank_line(line: &str) -> bool {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') || t == "..." {
        return true;
    }
    match t.strip_prefix("---") {
        Some(rest) => {
            let rest = rest.trim_start();
            rest.is_empty() || rest.starts_with('#')
        }
        None => false,
    }
}

/// Splits YAML text into documents at `---` lines (which YAML forbids
/// inside any scalar at column 0, so this agrees with the parser), keeping
/// each document's first line number.
fn split_yaml(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_document_start(line) && offset > start {
            chunks.push(Chunk {
                text: &text[start..offset],
                line: start_line,
                column: 1,
            });
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    chunks.push(Chunk {
        text: &text[start..],
        line: start_line,
        column: 1,
    });
    chunks
}

/// 1-based (line, column) of byte `offset` in `text`; columns count
/// characters, as the YAML parser does.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Splits a JSON array of documents into one chunk per item.
fn split_json_array<'a>(source: &str, text: &'a str) -> Result<Vec<Chunk<'a>>, DocError> {
    let items: Vec<&'a serde_json::value::RawValue> =
        serde_json::from_str(text).map_err(|e| json_error(source, &e))?;
    let base = text.as_ptr() as usize;
    Ok(items
        .into_iter()
        .map(|raw| {
            let item = raw.get();
            // The item borrows from `text`, so its address lies inside it.
            let offset = (item.as_ptr() as usize)
                .checked_sub(base)
                .filter(|&o| o <= text.len())
                .unwrap_or(0);
            let (line, column) = line_column(text, offset);
            Chunk {
                text: item,
                line,
                column,
            }
        })
        .collect())
}

/// Turns a parser message into (path, message) in file coordinates: the
/// parser's own " at line L column C" (chunk-relative, and already in the
/// DocError's line/column) is dropped, other positions it mentions (libyaml
/// adds context like "while parsing a block mapping at line 1 column 1")
/// are rewritten to file lines, and a leading `path: ` is split off.
fn clean_message(text: &str, chunk: &Chunk<'_>, own: Option<(usize, usize)>) -> (String, String) {
    const MARK: &str = " at line ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut dropped_own = false;
    while let Some(i) = rest.find(MARK) {
        out.push_str(&rest[..i]);
        let after = &rest[i + MARK.len()..];
        match parse_line_column(after) {
            Some((line, column, used)) => {
                if !dropped_own && own == Some((line, column)) {
                    dropped_own = true;
                } else {
                    let (l, c) = chunk.position(line, column);
                    out.push_str(&format!("{MARK}{l} column {c}"));
                }
                rest = &after[used..];
            }
            None => {
                out.push_str(MARK);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    split_path(out)
}

/// Parses `L column C` at the start of `s`; returns (L, C, bytes used).
fn parse_line_column(s: &str) -> Option<(usize, usize, usize)> {
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n1 = digits(s);
    let line = s.get(..n1)?.parse().ok()?;
    let rest = s.get(n1..)?.strip_prefix(" column ")?;
    let n2 = digits(rest);
    let column = rest.get(..n2)?.parse().ok()?;
    Some((line, column, n1 + " column ".len() + n2))
}

/// Splits `spec.http[0]: message` into path and message (serde_norway
/// prefixes the field path this way; the top level has none).
fn split_path(text: String) -> (String, String) {
    if let Some((head, tail)) = text.split_once(": ") {
        let is_path = !head.is_empty()
            && head.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-' | '/')
            });
        if is_path {
            return (head.to_string(), tail.to_string());
        }
    }
    (String::new(), text)
}

fn yaml_error(source: &str, chunk: &Chunk<'_>, err: &serde_norway::Error) -> DocError {
    let own = err.location().map(|l| (l.line(), l.column()));
    let (path, message) = clean_message(&err.to_string(), chunk, own);
    let position = own.map(|(l, c)| chunk.position(l, c));
    DocError {
        source: source.to_string(),
        line: position.map(|p| p.0),
        column: position.map(|p| p.1),
        resource: None,
        path,
        message,
    }
}

fn json_error(source: &str, err: &serde_json::Error) -> DocError {
    let whole = Chunk {
        text: "",
        line: 1,
        column: 1,
    };
    let own = (err.line() > 0).then(|| (err.line(), err.column()));
    let (path, message) = clean_message(&err.to_string(), &whole, own);
    DocError {
        source: source.to_string(),
        line: own.map(|p| p.0),
        column: own.map(|p| p.1),
        resource: None,
        path,
        message,
    }
}

/// Parses one document; `Ok(None)` for an empty one.
fn parse_chunk(source: &str, chunk: &Chunk<'_>) -> Result<Option<Resource>, Vec<DocError>> {
    if chunk.text.lines().all(is_blank_line) {
        return Ok(None);
    }
    let doc_line = chunk.content_line();
    let at_doc = |path: &str, message: String, line: usize, resource: Option<String>| DocError {
        source: source.to_string(),
        line: Some(line),
        column: None,
        resource,
        path: path.to_string(),
        message,
    };
    if chunk.text.len() > MAX_DOCUMENT_BYTES {
        return Err(vec![at_doc(
            "",
            format!(
                "document is {} bytes, over the limit of {MAX_DOCUMENT_BYTES} bytes",
                chunk.text.len()
            ),
            doc_line,
            None,
        )]);
    }
    let header: Option<Header> =
        serde_norway::from_str(chunk.text).map_err(|e| vec![yaml_error(source, chunk, &e)])?;
    let Some(header) = header else {
        return Ok(None); // a document that is just `null` or `~`
    };
    let kind = check_header(&header).map_err(|(path, message)| {
        let line = chunk.key_line(path).unwrap_or(doc_line);
        vec![at_doc(path, message, line, None)]
    })?;
    let resource = decode_resource(kind, &YamlText(chunk.text))
        .map_err(|e| vec![yaml_error(source, chunk, &e)])?;
    resource.validate().map_err(|errors| {
        let name = resource.display_name();
        errors
            .into_iter()
            .map(|e| DocError {
                source: source.to_string(),
                line: None,
                column: None,
                resource: Some(name.clone()),
                path: e.path,
                message: e.message,
            })
            .collect::<Vec<_>>()
    })?;
    Ok(Some(resource))
}

/// Parses every document in `text`: YAML (several documents separated by
/// `---` lines), or JSON (one object, or an array of objects). `source`
/// names the input in errors (`route.yaml`, `-` for stdin). Empty
/// documents are skipped.
///
/// Each document is checked for size ([`MAX_DOCUMENT_BYTES`]),
/// `apiVersion`, `kind`, schema (unknown fields and wrong types are errors
/// with line and column) and [`Resource::validate`]; two documents with the
/// same kind, namespace and name are an error too. Returns every error
/// found, in document order, not just the first. Never panics.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Resource>, Vec<DocError>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut errors = Vec::new();
    let chunks = if text.trim_start().starts_with('[') {
        match split_json_array(source, text) {
            Ok(chunks) => chunks,
            Err(e) => return Err(vec![e]),
        }
    } else {
        split_yaml(text)
    };
    let mut resources = Vec::new();
    let mut first_seen: BTreeMap<(Kind, String, String), usize> = BTreeMap::new();
    for chunk in &chunks {
        match parse_chunk(source, chunk) {
            Ok(None) => {}
            Ok(Some(resource)) => {
                let line = chunk.content_line();
                let id = (
                    resource.kind(),
                    resource.metadata.namespace.clone(),
                    resource.metadata.name.clone(),
                );
                match first_seen.get(&id) {
                    Some(first) => errors.push(DocError {
                        source: source.to_string(),
                        line: Some(line),
                        column: None,
                        resource: Some(resource.display_name()),
                        path: "metadata.name".to_string(),
                        message: format!("defined twice in this input (first at line {first})"),
                    }),
                    None => {
                        first_seen.insert(id, line);
                        resources.push(resource);
                    }
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_every_spelling() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(Kind::parse(k.key_segment()), Some(k));
            assert_eq!(Kind::parse(&k.as_str().to_uppercase()), Some(k));
        }
        for (s, k) in [
            ("svc", Kind::Service),
            ("inst", Kind::Instance),
            ("rt", Kind::Route),
            ("dp", Kind::DestinationPolicy),
            ("quota", Kind::Quota),
            ("ap", Kind::AccessPolicy),
            ("routes", Kind::Route),
            ("DestinationPolicies", Kind::DestinationPolicy),
            ("accesspolicies", Kind::AccessPolicy),
            ("quotas", Kind::Quota),
        ] {
            assert_eq!(Kind::parse(s), Some(k), "{s}");
        }
        assert_eq!(Kind::parse("certificate"), None);
        assert_eq!(Kind::parse(""), None);
    }

    #[test]
    fn keys() {
        assert_eq!(key_prefix(Kind::Route, None), "/route/");
        assert_eq!(
            key_prefix(Kind::DestinationPolicy, Some("default")),
            "/destinationpolicy/default/"
        );
        assert_eq!(
            parse_key("/accesspolicy/ns1/deny-v3"),
            Some((Kind::AccessPolicy, "ns1", "deny-v3"))
        );
        assert_eq!(parse_key("/route/default"), None);
        assert_eq!(parse_key("/route/default/a/b"), None);
        assert_eq!(parse_key("/nope/default/a"), None);
        assert_eq!(parse_key("route/default/a"), None);
    }

    #[test]
    fn split_yaml_keeps_line_numbers() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n---x: 4\n";
        let chunks = split_yaml(text);
        let got: Vec<(usize, &str)> = chunks.iter().map(|c| (c.line, c.text)).collect();
        assert_eq!(
            got,
            vec![
                (1, "a: 1\n"),
                (2, "---\nb: 2\n"),
                (4, "--- # c\nc: 3\n---x: 4\n")
            ]
        );
    }

    #[test]
    fn clean_message_rewrites_positions() {
        let chunk = Chunk {
            text: "",
            line: 10,
            column: 1,
        };
        let (path, msg) = clean_message(
            "spec.ports: did not find expected key at line 3 column 1, while parsing a block mapping at line 1 column 1",
            &chunk,
            Some((3, 1)),
        );
        assert_eq!(path, "spec.ports");
        assert_eq!(
            msg,
            "did not find expected key, while parsing a block mapping at line 10 column 1"
        );
        let (path, msg) = clean_message("invalid type: string \"x\", expected u16", &chunk, None);
        assert_eq!(path, "");
        assert_eq!(msg, "invalid type: string \"x\", expected u16");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé d", 7), (2, 4));
        assert_eq!(line_column("x", 0), (1, 1));
        assert_eq!(line_column("x", 99), (1, 2));
    }
}
