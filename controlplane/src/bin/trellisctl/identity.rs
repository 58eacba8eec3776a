//! Identity commands: the cluster CA (`ca create|load|show`), certificates
//! (`cert create|list`) and sidecar join tokens (`token create|list|revoke`).
//!
//! `ca create` and `cert create` work offline on files (like Consul's
//! `tls ca create` / `tls cert create`): a CA directory holds `ca.pem` and
//! `ca-key.pem`; certificates are written next to it (or to `--out`) as
//! `node-<ID>.pem` / `admin-<NAME>.pem` with `-key.pem` keys. Every file is
//! written atomically, keys with mode 0600, and nothing is overwritten
//! without `--force`. The other commands call the `Identity` admin service;
//! no call ever returns the CA key, and `ca show` refuses to print one.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use trellis_identity::{Ca, Issued, ADMIN_CERT_VALIDITY, NODE_CERT_VALIDITY};
use trellis_proto::admin::identity_client::IdentityClient;
use trellis_proto::admin::{
    CreateTokenRequest, GetCaRequest, JoinTokenInfo, ListCertificatesRequest, ListTokensRequest,
    LoadCaRequest, LoadCaResponse, RevokeTokenRequest,
};

use crate::args::{CaCreateArgs, CaDirArgs, CertCreateArgs, TokenCreateArgs, TokenRevokeArgs};
use crate::client::{fmt_duration, with_deadline};
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::output::{escape_text, note, print_json, print_line, rfc3339_ms, write_stdout, Table};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// SANs of a node certificate when `--san` is not given: the node is
/// reached on this machine.
const DEFAULT_NODE_SANS: [&str; 3] = ["127.0.0.1", "::1", "localhost"];

/// A CA directory, read and checked (the key matches the certificate).
pub struct CaFiles {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca: Ca,
}

/// Reads `DIR/ca.pem` and `DIR/ca-key.pem` and checks them as a CA. Any
/// problem is a usage error (exit 2) that names the path.
pub fn read_ca_dir(flag: &str, dir: &Path) -> Result<CaFiles, CliError> {
    if !dir.is_dir() {
        let why = if dir.exists() {
            "not a directory"
        } else {
            "no such directory"
        };
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "{flag} {}: {why} (create one with `trellisctl ca create --out DIR`)",
                dir.display()
            ),
        ));
    }
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            CliError::new(
                exit::USAGE,
                format!(
                    "{flag} {}: cannot read {}: {e}",
                    dir.display(),
                    path.display()
                ),
            )
        })
    };
    let cert_pem = read(CA_CERT_FILE)?;
    let key_pem = read(CA_KEY_FILE)?;
    let ca = Ca::from_pem(&cert_pem, &key_pem).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!(
                "{flag} {}: {} and {} are not a usable CA: {e}",
                dir.display(),
                dir.join(CA_CERT_FILE).display(),
                dir.join(CA_KEY_FILE).display()
            ),
        )
    })?;
    Ok(CaFiles {
        cert_pem,
        key_pem,
        ca,
    })
}

/// Exit 2 naming the first of `paths` that exists, unless `force`.
fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<(), CliError> {
    if force {
        return Ok(());
    }
    for path in paths {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "{} already exists; pass --force to overwrite it",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Creates the output directory (and its parents) if needed.
fn ensure_dir(flag: &str, dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!("{flag} {}: cannot create the directory: {e}", dir.display()),
        )
    })
}

/// Writes one file atomically (keys: `private`, mode 0600).
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CliError> {
    trellis_identity::write_file_atomic(path, contents.as_bytes(), private)
        .map_err(|e| CliError::new(exit::OTHER, format!("cannot write {}: {e}", path.display())))
}

/// `ca create --out DIR [--trust-domain TD] [--force]` (offline).
pub fn ca_create(json: bool, args: CaCreateArgs) -> Result<(), CliError> {
    let cert_path = args.out.join(CA_CERT_FILE);
    let key_path = args.out.join(CA_KEY_FILE);
    refuse_overwrite(&[&cert_path, &key_path], args.force)?;
    let ca = Ca::create(&args.trust_domain)
        .map_err(|e| CliError::new(exit::USAGE, format!("ca create: {e}")))?;
    ensure_dir("--out", &args.out)?;
    // The key first: a certificate without its key is useless, the other
    // way round `--force` repairs it.
    write_file(&key_path, ca.key_pem(), true)?;
    write_file(&cert_path, ca.cert_pem(), false)?;
    if json {
        return print_json(&json!({
            "cert_file": cert_path.display().to_string(),
            "key_file": key_path.display().to_string(),
            "trust_domain": ca.trust_domain(),
        }));
    }
    print_line(&format!("wrote {}", cert_path.display()))?;
    print_line(&format!(
        "wrote {} (private key, mode 0600: keep it secret)",
        key_path.display()
    ))?;
    print_line(&format!("trust domain: {}", ca.trust_domain()))
}

/// What `cert create` makes.
enum Subject {
    Node(u64),
    Admin(String),
}

/// `cert create --ca-dir DIR (--node ID [--san ...] | --admin NAME) [--out
/// DIR] [--validity D] [--force]` (offline).
pub fn cert_create(json: bool, args: CertCreateArgs) -> Result<(), CliError> {
    let subject = match (args.node, args.admin) {
        (Some(id), _) => Subject::Node(id),
        (None, Some(name)) => {
            // The name becomes part of a file name; the identity rules
            // (checked when issuing) are stricter still.
            if name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(CliError::new(
                    exit::USAGE,
                    format!(
                        "--admin {:?}: not a valid admin name (lower-case letters, digits, \
                         '-', '.', '_')",
                        escape_text(&name)
                    ),
                ));
            }
            Subject::Admin(name)
        }
        (None, None) => {
            return Err(CliError::new(
                exit::USAGE,
                "cert create: give --node ID or --admin NAME",
            ))
        }
    };
    let ca = read_ca_dir("--ca-dir", &args.ca_dir)?.ca;
    let out = args.out.unwrap_or_else(|| args.ca_dir.clone());
    let stem = match &subject {
        Subject::Node(id) => format!("node-{id}"),
        Subject::Admin(name) => format!("admin-{name}"),
    };
    let cert_path = out.join(format!("{stem}.pem"));
    let key_path = out.join(format!("{stem}-key.pem"));
    refuse_overwrite(&[&cert_path, &key_path], args.force)?;

    let mut sans: Vec<String> = args
        .sans
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let issued = match &subject {
        Subject::Node(id) => {
            if sans.is_empty() {
                sans = DEFAULT_NODE_SANS.iter().map(|s| (*s).to_string()).collect();
            }
            let validity = args.validity.unwrap_or(NODE_CERT_VALIDITY);
            ca.issue_node(*id, &sans, validity)
        }
        Subject::Admin(name) => {
            let validity = args.validity.unwrap_or(ADMIN_CERT_VALIDITY);
            ca.issue_admin(name, validity)
        }
    };
    let (issued, key_pem): (Issued, String) =
        issued.map_err(|e| CliError::new(exit::USAGE, format!("cert create: {e}")))?;
    ensure_dir("--out", &out)?;
    write_file(&key_path, &key_pem, true)?;
    write_file(&cert_path, &issued.cert_pem, false)?;

    let info = &issued.info;
    if json {
        let mut doc = json!({
            "cert_file": cert_path.display().to_string(),
            "key_file": key_path.display().to_string(),
            "identity": info.identity.to_string(),
            "spiffe_id": info.spiffe_id,
            "trust_domain": info.trust_domain,
            "serial": info.serial,
            "not_before_unix_ms": info.not_before_unix_ms,
            "not_after_unix_ms": info.not_after_unix_ms,
            "not_before": rfc3339_ms(info.not_before_unix_ms),
            "not_after": rfc3339_ms(info.not_after_unix_ms),
        });
        if let (Subject::Node(_), Value::Object(map)) = (&subject, &mut doc) {
            map.insert("sans".into(), json!(sans));
        }
        return print_json(&doc);
    }
    print_line(&format!(
        "wrote {} ({}, serial {}, valid until {})",
        cert_path.display(),
        info.spiffe_id,
        info.serial,
        rfc3339_ms(info.not_after_unix_ms)
    ))?;
    print_line(&format!(
        "wrote {} (private key, mode 0600)",
        key_path.display()
    ))?;
    if let Subject::Node(_) = subject {
        print_line(&format!("subject alternative names: {}", sans.join(", ")))?;
    }
    Ok(())
}

/// Sends a CA to the cluster (`ca load`, `cluster init --ca-dir`) through
/// the endpoints, with failover.
pub async fn load_ca(ctx: &Ctx, what: &str, files: &CaFiles) -> Result<LoadCaResponse, CliError> {
    if !ctx.client.tls() {
        note(&format!(
            "{what}: sending the CA key without TLS (no --ca-file); do this only on a \
             trusted network"
        ));
    }
    let request = LoadCaRequest {
        cert_pem: files.cert_pem.clone(),
        key_pem: files.key_pem.clone(),
    };
    let answer = ctx
        .client
        .unary_write(what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { IdentityClient::new(channel).load_ca(request).await }
        })
        .await?;
    Ok(answer.value)
}

/// One line about a `LoadCa` answer.
pub fn load_ca_summary(response: &LoadCaResponse) -> String {
    if response.loaded {
        format!(
            "loaded the CA into the cluster (trust domain {})",
            response.trust_domain
        )
    } else {
        format!(
            "the cluster already has this CA (trust domain {}); nothing changed",
            response.trust_domain
        )
    }
}

/// `ca load --ca-dir DIR`.
pub async fn ca_load(ctx: &Ctx, args: CaDirArgs) -> Result<(), CliError> {
    let files = read_ca_dir("--ca-dir", &args.ca_dir)?;
    let response = load_ca(ctx, "ca load", &files).await?;
    if ctx.json() {
        return print_json(&json!({
            "trust_domain": response.trust_domain,
            "loaded": response.loaded,
            "revision": response.header.map_or(0, |h| h.revision),
        }));
    }
    print_line(&load_ca_summary(&response))
}

/// `ca show`: the CA certificate and trust domain; never a key.
pub async fn ca_show(ctx: &Ctx) -> Result<(), CliError> {
    let what = "ca show";
    let answer = ctx
        .client
        .unary(what, |channel, deadline| {
            let request = with_deadline(GetCaRequest {}, deadline);
            async move { IdentityClient::new(channel).get_ca(request).await }
        })
        .await?;
    let response = answer.value;
    if response.cert_pem.contains("PRIVATE KEY") {
        return Err(CliError::new(
            exit::OTHER,
            format!(
                "{what}: the server sent a private key with the CA certificate; refusing to \
                 print it (endpoint {})",
                answer.endpoint
            ),
        ));
    }
    if ctx.json() {
        return print_json(&json!({
            "trust_domain": response.trust_domain,
            "cert_pem": response.cert_pem,
            "revision": response.header.map_or(0, |h| h.revision),
        }));
    }
    print_line(&format!("trust domain: {}", response.trust_domain))?;
    let mut pem = response.cert_pem;
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    write_stdout(pem.as_bytes())
}

/// `cert list`: the certificates the cluster issued that have not expired.
pub async fn cert_list(ctx: &Ctx) -> Result<(), CliError> {
    let answer = ctx
        .client
        .unary("cert list", |channel, deadline| {
            let request = with_deadline(ListCertificatesRequest {}, deadline);
            async move {
                IdentityClient::new(channel)
                    .list_certificates(request)
                    .await
            }
        })
        .await?;
    let response = answer.value;
    let mut certs = response.certificates;
    // Soonest to expire first, as the server lists them.
    certs.sort_by(|a, b| {
        let key_a = (a.not_after_unix_ms, &a.serial);
        key_a.cmp(&(b.not_after_unix_ms, &b.serial))
    });
    if ctx.json() {
        let rows: Vec<Value> = certs
            .iter()
            .map(|c| {
                json!({
                    "serial": c.serial,
                    "spiffe_id": c.spiffe_id,
                    "not_before_unix_ms": c.not_before_unix_ms,
                    "not_after_unix_ms": c.not_after_unix_ms,
                    "not_before": rfc3339_ms(c.not_before_unix_ms),
                    "not_after": rfc3339_ms(c.not_after_unix_ms),
                    "reason": c.reason,
                    "issued_by_node": c.issued_by_node,
                    "token_id": c.token_id,
                })
            })
            .collect();
        return print_json(&json!({
            "revision": response.header.map_or(0, |h| h.revision),
            "certificates": rows,
        }));
    }
    let mut table = Table::new(&["SERIAL", "IDENTITY", "NOT-AFTER", "REASON", "NODE", "TOKEN"]);
    for c in &certs {
        table.row(vec![
            cell(&c.serial),
            cell(&c.spiffe_id),
            rfc3339_ms(c.not_after_unix_ms),
            cell(&c.reason),
            if c.issued_by_node == 0 {
                "-".into()
            } else {
                c.issued_by_node.to_string()
            },
            cell(&c.token_id),
        ]);
    }
    write_stdout(table.render().as_bytes())
}

/// A table cell: the text with control characters escaped, `-` if empty.
fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        escape_text(text)
    }
}

fn token_json(info: &JoinTokenInfo) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("id".into(), json!(info.id));
    map.insert("namespace".into(), json!(info.namespace));
    map.insert("service".into(), json!(info.service));
    map.insert("created_unix_ms".into(), json!(info.created_unix_ms));
    map.insert("expires_unix_ms".into(), json!(info.expires_unix_ms));
    map.insert("created".into(), json!(rfc3339_ms(info.created_unix_ms)));
    map.insert("expires".into(), json!(rfc3339_ms(info.expires_unix_ms)));
    map.insert("description".into(), json!(info.description));
    map.insert("uses".into(), json!(info.uses));
    map
}

/// `token create --namespace NS --service SVC [--ttl D] [--description T] [-q]`.
pub async fn token_create(ctx: &Ctx, args: TokenCreateArgs) -> Result<(), CliError> {
    let what = format!("token create for {}/{}", args.namespace, args.service);
    let ttl_ms = args.ttl.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    });
    let request = CreateTokenRequest {
        namespace: args.namespace.clone(),
        service: args.service.clone(),
        ttl_ms,
        description: args.description.clone(),
    };
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { IdentityClient::new(channel).create_token(request).await }
        })
        .await?;
    let response = answer.value;
    if response.token.is_empty() {
        return Err(CliError::new(
            exit::OTHER,
            format!(
                "{what}: the server returned no token (endpoint {})",
                answer.endpoint
            ),
        ));
    }
    if args.quiet {
        return print_line(&response.token);
    }
    let info = response.info.unwrap_or_default();
    if ctx.json() {
        let mut doc = token_json(&info);
        doc.insert("token".into(), json!(response.token));
        doc.insert(
            "revision".into(),
            json!(response.header.map_or(0, |h| h.revision)),
        );
        return print_json(&Value::Object(doc));
    }
    note("the token is shown only now; store it (or pass -q to print nothing else)");
    let ttl = args
        .ttl
        .map(fmt_duration)
        .map_or(String::new(), |t| format!(", ttl {t}"));
    print_line(&format!(
        "token {} for {}/{}, expires {}{ttl}",
        info.id,
        info.namespace,
        info.service,
        rfc3339_ms(info.expires_unix_ms)
    ))?;
    print_line(&response.token)
}

/// `token list`.
pub async fn token_list(ctx: &Ctx) -> Result<(), CliError> {
    let answer = ctx
        .client
        .unary("token list", |channel, deadline| {
            let request = with_deadline(ListTokensRequest {}, deadline);
            async move { IdentityClient::new(channel).list_tokens(request).await }
        })
        .await?;
    let response = answer.value;
    let mut tokens = response.tokens;
    tokens.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
    if ctx.json() {
        let rows: Vec<Value> = tokens
            .iter()
            .map(|t| Value::Object(token_json(t)))
            .collect();
        return print_json(&json!({
            "revision": response.header.map_or(0, |h| h.revision),
            "tokens": rows,
        }));
    }
    let mut table = Table::new(&["ID", "SCOPE", "EXPIRES", "USES", "DESCRIPTION"]);
    for t in &tokens {
        table.row(vec![
            cell(&t.id),
            escape_text(&format!("{}/{}", t.namespace, t.service)),
            rfc3339_ms(t.expires_unix_ms),
            t.uses.to_string(),
            cell(&t.description),
        ]);
    }
    write_stdout(table.render().as_bytes())
}

/// `token revoke ID` (exit 3 if there is no such token).
pub async fn token_revoke(ctx: &Ctx, args: TokenRevokeArgs) -> Result<(), CliError> {
    let what = format!("token revoke {}", escape_text(&args.id));
    let request = RevokeTokenRequest {
        id: args.id.clone(),
    };
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { IdentityClient::new(channel).revoke_token(request).await }
        })
        .await?;
    let response = answer.value;
    if !response.revoked {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("{what}: no such token (endpoint {})", answer.endpoint),
        ));
    }
    if ctx.json() {
        return print_json(&json!({
            "id": args.id,
            "revoked": true,
            "revision": response.header.map_or(0, |h| h.revision),
        }));
    }
    print_line(&format!("token {} revoked", escape_text(&args.id)))
}

/// The CA directory of `cluster init --ca-dir`, checked before anything
/// changes in the cluster.
pub fn read_init_ca(dir: Option<&PathBuf>) -> Result<Option<CaFiles>, CliError> {
    dir.map(|d| read_ca_dir("--ca-dir", d)).transpose()
}
