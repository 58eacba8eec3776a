//! End-to-end tests of `trellisctl`'s identity commands and TLS flags: the
//! offline `ca create` / `cert create` (files checked with
//! `trellis_identity`, node certificates verified for their SANs with
//! rustls), the TLS flag checks, `ca load|show`, `token create|list|revoke`,
//! `cert list`, `proxy-status` and `cluster init --ca-dir` against real
//! clusters (plaintext `--insecure-dev` ones and one with mutual TLS, where
//! a sidecar joins with a token made by the CLI and shows up in
//! `proxy-status`), and the exit codes of TLS mismatches (2) and rejected
//! certificates (7).
//!
//! Build the binaries first, in the same profile as the tests:
//! `cargo build --bins && cargo test -p trellis-tests --test cli_identity`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::Value;
use tokio::time::Instant;
use trellis_identity::{Ca, Identity};
use trellis_proto::sidecar as sc;
use trellis_tests::quic::{self, client_endpoint, connect, issued, join};
use trellis_tests::{Cluster, ClusterOptions};

use common::{array_field, bool_field, str_field, u64_field, Ctl, Run};

/// An address where nothing listens, for commands that must not connect.
const NOWHERE: &str = "127.0.0.1:1";
/// How long to wait for a sidecar's update to show in proxy-status.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

/// Runs `trellisctl` with owned arguments.
async fn run(ctl: &Ctl, args: &[String]) -> Result<Run> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl.run(&args).await
}

/// `args` after the three TLS flags.
fn with_tls(ca: &Path, cert: &Path, key: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec![
        "--ca-file".to_string(),
        path_str(ca),
        "--cert-file".to_string(),
        path_str(cert),
        "--key-file".to_string(),
        path_str(key),
    ];
    all.extend(args.iter().map(|a| (*a).to_string()));
    all
}

/// Whether `cert_pem` is a server certificate that a client trusting
/// `ca_pem` accepts for `name` (an IP address or DNS name).
fn valid_for(ca_pem: &str, cert_pem: &str, name: &str) -> Result<bool> {
    let roots = Arc::new(trellis_identity::root_store(ca_pem)?);
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots,
        trellis_identity::crypto_provider(),
    )
    .build()
    .context("building a verifier")?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("certificate PEM")?;
    let server_name = ServerName::try_from(name.to_string()).context("server name")?;
    Ok(verifier
        .verify_server_cert(&der, &[], &server_name, &[], UnixTime::now())
        .is_ok())
}

#[cfg(unix)]
fn mode(p: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// `ca create --out DIR` (must succeed).
async fn ca_create(ctl: &Ctl, dir: &Path, extra: &[&str]) -> Result<Run> {
    let mut args = vec![
        "ca".to_string(),
        "create".into(),
        "--out".into(),
        path_str(dir),
    ];
    args.extend(extra.iter().map(|a| (*a).to_string()));
    let r = run(ctl, &args).await?;
    r.expect_ok()?;
    Ok(r)
}

// ---------------------------------------------------------------------------
// Offline: ca create, cert create
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_and_cert_create_write_usable_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ctl = Ctl::new(NOWHERE)?;
    let pki = tmp.path().join("pki");
    let pki_s = path_str(&pki);

    // ca create: two files, the key private, the pair a CA of trellis.local.
    let r = ca_create(&ctl, &pki, &[]).await?;
    let out = r.stdout();
    ensure!(
        out.contains("trust domain: trellis.local") && out.contains(&path_str(&pki.join("ca.pem"))),
        "{r}"
    );
    let ca_pem = read(&pki.join("ca.pem"))?;
    let ca_key = read(&pki.join("ca-key.pem"))?;
    let ca = Ca::from_pem(&ca_pem, &ca_key)?;
    ensure!(ca.trust_domain() == "trellis.local");
    #[cfg(unix)]
    ensure!(
        mode(&pki.join("ca-key.pem"))? == 0o600,
        "CA key mode {:o}",
        mode(&pki.join("ca-key.pem"))?
    );

    // ... and is not overwritten without --force.
    let r = ctl.run(&["ca", "create", "--out", &pki_s]).await?;
    r.expect_code(2)?
        .expect_stderr("ca.pem")?
        .expect_stderr("--force")?;
    ensure!(read(&pki.join("ca.pem"))? == ca_pem, "ca.pem changed");

    // A node certificate with the default SANs.
    let r = ctl
        .run(&[
            "cert", "create", "--ca-dir", &pki_s, "--node", "1", "-o", "json",
        ])
        .await?;
    r.expect_ok()?;
    let doc = r.json()?;
    ensure!(
        str_field(&doc, "cert_file")? == path_str(&pki.join("node-1.pem")),
        "{r}"
    );
    ensure!(str_field(&doc, "identity")? == "node/1", "{r}");
    let node_pem = read(&pki.join("node-1.pem"))?;
    let info = trellis_identity::cert_info(&node_pem)?;
    ensure!(info.identity == Identity::Node { id: 1 }, "{info:?}");
    ensure!(
        info.spiffe_id == "spiffe://trellis.local/node/1",
        "{info:?}"
    );
    ensure!(info.serial == str_field(&doc, "serial")?, "{info:?} vs {r}");
    for name in ["127.0.0.1", "::1", "localhost"] {
        ensure!(
            valid_for(&ca_pem, &node_pem, name)?,
            "node-1.pem is not valid for {name}"
        );
    }
    ensure!(!valid_for(&ca_pem, &node_pem, "10.9.9.9")?);
    #[cfg(unix)]
    ensure!(mode(&pki.join("node-1-key.pem"))? == 0o600);
    let key_pem = read(&pki.join("node-1-key.pem"))?;
    ensure!(key_pem.contains("PRIVATE KEY"));

    // An admin certificate.
    let r = ctl
        .run(&["cert", "create", "--ca-dir", &pki_s, "--admin", "ops"])
        .await?;
    r.expect_ok()?;
    ensure!(
        r.stdout().contains("spiffe://trellis.local/admin/ops"),
        "{r}"
    );
    let admin = trellis_identity::cert_info(&read(&pki.join("admin-ops.pem"))?)?;
    ensure!(
        admin.identity == Identity::Admin { name: "ops".into() },
        "{admin:?}"
    );
    ensure!(pki.join("admin-ops-key.pem").exists());

    // No overwrite without --force; with it, a new certificate.
    let r = ctl
        .run(&["cert", "create", "--ca-dir", &pki_s, "--node", "1"])
        .await?;
    r.expect_code(2)?
        .expect_stderr("node-1.pem")?
        .expect_stderr("--force")?;
    ensure!(
        read(&pki.join("node-1.pem"))? == node_pem,
        "node-1.pem changed"
    );
    ctl.run(&[
        "cert", "create", "--ca-dir", &pki_s, "--node", "1", "--force",
    ])
    .await?
    .expect_ok()?;
    let again = trellis_identity::cert_info(&read(&pki.join("node-1.pem"))?)?;
    ensure!(
        again.serial != info.serial,
        "--force kept the old certificate"
    );

    // --out, --san and --validity.
    let other = tmp.path().join("out");
    let r = ctl
        .run(&[
            "cert",
            "create",
            "--ca-dir",
            &pki_s,
            "--node",
            "2",
            "--san",
            "10.1.2.3",
            "--san",
            "node-2.example",
            "--out",
            &path_str(&other),
            "--validity",
            "30d",
        ])
        .await?;
    r.expect_ok()?;
    let n2 = read(&other.join("node-2.pem"))?;
    ensure!(!pki.join("node-2.pem").exists(), "--out ignored");
    for name in ["10.1.2.3", "node-2.example"] {
        ensure!(
            valid_for(&ca_pem, &n2, name)?,
            "node-2.pem not valid for {name}"
        );
    }
    ensure!(
        !valid_for(&ca_pem, &n2, "127.0.0.1")?,
        "explicit --san must replace the defaults"
    );
    let i2 = trellis_identity::cert_info(&n2)?;
    let days30 = 30 * 86_400_000;
    let span = i2.not_after_unix_ms - i2.not_before_unix_ms;
    ensure!(
        (days30..=days30 + 600_000).contains(&span),
        "--validity 30d gave {span} ms"
    );

    // Another trust domain.
    let td = tmp.path().join("td");
    let r = ca_create(&ctl, &td, &["--trust-domain", "example.org"]).await?;
    ensure!(r.stdout().contains("trust domain: example.org"), "{r}");
    ctl.run(&["cert", "create", "--ca-dir", &path_str(&td), "--node", "3"])
        .await?
        .expect_ok()?;
    let i3 = trellis_identity::cert_info(&read(&td.join("node-3.pem"))?)?;
    ensure!(
        i3.trust_domain == "example.org" && i3.spiffe_id == "spiffe://example.org/node/3",
        "{i3:?}"
    );

    // Bad CA directories: missing, without a key, with a key of another CA.
    let missing = tmp.path().join("missing");
    ctl.run(&[
        "cert",
        "create",
        "--ca-dir",
        &path_str(&missing),
        "--node",
        "1",
    ])
    .await?
    .expect_code(2)?
    .expect_stderr(&path_str(&missing))?;
    let half = tmp.path().join("half");
    std::fs::create_dir_all(&half)?;
    std::fs::copy(pki.join("ca.pem"), half.join("ca.pem"))?;
    ctl.run(&[
        "cert",
        "create",
        "--ca-dir",
        &path_str(&half),
        "--admin",
        "x",
    ])
    .await?
    .expect_code(2)?
    .expect_stderr("ca-key.pem")?;
    std::fs::copy(td.join("ca-key.pem"), half.join("ca-key.pem"))?;
    ctl.run(&[
        "cert",
        "create",
        "--ca-dir",
        &path_str(&half),
        "--admin",
        "x",
    ])
    .await?
    .expect_code(2)?
    .expect_stderr("not a usable CA")?;
    ensure!(!half.join("admin-x.pem").exists());

    // Usage errors: neither or both subjects, bad names and ids.
    for args in [
        vec!["cert", "create", "--ca-dir", &pki_s],
        vec![
            "cert", "create", "--ca-dir", &pki_s, "--node", "4", "--admin", "a",
        ],
        vec!["cert", "create", "--ca-dir", &pki_s, "--node", "0"],
        vec![
            "cert", "create", "--ca-dir", &pki_s, "--admin", "a", "--san", "1.2.3.4",
        ],
        vec!["cert", "create", "--ca-dir", &pki_s, "--admin", "../evil"],
        vec!["cert", "create", "--ca-dir", &pki_s, "--admin", "Upper"],
    ] {
        ctl.run(&args).await?.expect_code(2)?;
    }
    ensure!(!tmp.path().join("evil.pem").exists());
    Ok(())
}

// ---------------------------------------------------------------------------
// TLS flags
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_flags_are_checked_before_connecting() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ctl = Ctl::new(NOWHERE)?;
    let pki = tmp.path().join("pki");
    ca_create(&ctl, &pki, &[]).await?;
    let pki_s = path_str(&pki);
    ctl.run(&["cert", "create", "--ca-dir", &pki_s, "--admin", "ops"])
        .await?
        .expect_ok()?;
    let ca = path_str(&pki.join("ca.pem"));
    let cert = path_str(&pki.join("admin-ops.pem"));
    let key = path_str(&pki.join("admin-ops-key.pem"));

    ctl.run(&["--ca-file", &ca, "--cert-file", &cert, "get", "/x"])
        .await?
        .expect_code(2)?
        .expect_stderr("--key-file")?;
    ctl.run(&["--ca-file", &ca, "--key-file", &key, "get", "/x"])
        .await?
        .expect_code(2)?
        .expect_stderr("--cert-file")?;
    ctl.run(&["--cert-file", &cert, "--key-file", &key, "get", "/x"])
        .await?
        .expect_code(2)?
        .expect_stderr("--ca-file")?;
    let missing = path_str(&tmp.path().join("nope.pem"));
    ctl.run(&["--ca-file", &missing, "get", "/x"])
        .await?
        .expect_code(2)?
        .expect_stderr(&missing)?;
    ctl.run(&[
        "--ca-file",
        &ca,
        "--cert-file",
        &cert,
        "--key-file",
        &missing,
        "get",
        "/x",
    ])
    .await?
    .expect_code(2)?
    .expect_stderr(&missing)?;
    // A key is not a CA certificate.
    ctl.run(&["--ca-file", &key, "get", "/x"])
        .await?
        .expect_code(2)?
        .expect_stderr("CERTIFICATE")?;
    // An https:// endpoint needs --ca-file; an http:// one refuses it.
    Ctl::new(format!("https://{NOWHERE}"))?
        .run(&["get", "/x"])
        .await?
        .expect_code(2)?
        .expect_stderr("--ca-file")?;
    Ctl::new(format!("http://{NOWHERE}"))?
        .run(&["--ca-file", &ca, "get", "/x"])
        .await?
        .expect_code(2)?;
    // Well-formed flags get as far as the network (nothing listens: 5).
    ctl.run(&[
        "--ca-file",
        &ca,
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "get",
        "/x",
    ])
    .await?
    .expect_code(5)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// A plaintext (--insecure-dev) cluster
// ---------------------------------------------------------------------------

/// `revision: N` and the proxy-status table (rows split on whitespace).
fn proxy_table(r: &Run) -> Result<(u64, Vec<Vec<String>>)> {
    let text = r.stdout();
    let mut lines = text.lines();
    let first = lines.next().with_context(|| format!("no output; {r}"))?;
    let revision: u64 = first
        .strip_prefix("revision: ")
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("first line is not `revision: N`; {r}"))?;
    let header = lines
        .next()
        .with_context(|| format!("no table header; {r}"))?;
    let cols: Vec<&str> = header.split_whitespace().collect();
    ensure!(
        cols == ["NAME", "IDENTITY", "NODE", "INSTANCE", "APPLIED", "STATUS"],
        "header {header:?}; {r}"
    );
    let rows = lines
        .take_while(|l| !l.starts_with("warning: "))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    Ok((revision, rows))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_commands_on_an_insecure_cluster() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;

    // No CA yet: nothing to show, no tokens.
    let r = ctl.run(&["ca", "show"]).await?;
    ensure!(r.code == Some(3), "ca show without a CA: {r}");
    r.expect_stderr("ca load")?;
    ctl.run(&["token", "create", "-n", "default", "--service", "reviews"])
        .await?
        .expect_code(4)?
        .expect_stderr("no CA")?;

    // proxy-status without sidecars: the revision line and an empty table.
    let r = ctl.run(&["proxy-status"]).await?;
    r.expect_ok()?;
    let (revision, rows) = proxy_table(&r)?;
    ensure!(rows.is_empty(), "{r}");
    ensure!(r.stdout().lines().count() == 2, "{r}");
    let r = ctl.run(&["proxy-status", "-o", "json"]).await?;
    r.expect_ok()?;
    let doc = r.json()?;
    ensure!(u64_field(&doc, "revision")? >= revision, "{r}");
    ensure!(array_field(&doc, "sidecars")?.is_empty(), "{r}");
    ensure!(array_field(&doc, "unreachable")?.is_empty(), "{r}");

    // cert list: nothing issued.
    let r = ctl.run(&["cert", "list"]).await?;
    r.expect_ok()?;
    ensure!(r.table_rows("SERIAL")?.is_empty(), "{r}");
    let r = ctl.run(&["cert", "list", "-o", "json"]).await?;
    r.expect_ok()?;
    ensure!(array_field(&r.json()?, "certificates")?.is_empty(), "{r}");

    // ca load, twice (the second changes nothing), then another CA (4).
    let pki = tmp.path().join("pki");
    ca_create(&ctl, &pki, &[]).await?;
    let pki_s = path_str(&pki);
    let r = ctl.run(&["ca", "load", "--ca-dir", &pki_s]).await?;
    r.expect_ok()?;
    ensure!(
        r.stdout().contains("loaded the CA") && r.stdout().contains("trellis.local"),
        "{r}"
    );
    let r = ctl
        .run(&["ca", "load", "--ca-dir", &pki_s, "-o", "json"])
        .await?;
    r.expect_ok()?;
    let doc = r.json()?;
    ensure!(!bool_field(&doc, "loaded")?, "{r}");
    ensure!(str_field(&doc, "trust_domain")? == "trellis.local", "{r}");
    let other = tmp.path().join("other");
    ca_create(&ctl, &other, &[]).await?;
    ctl.run(&["ca", "load", "--ca-dir", &path_str(&other)])
        .await?
        .expect_code(4)?
        .expect_stderr("different CA")?;
    let missing = path_str(&tmp.path().join("missing"));
    ctl.run(&["ca", "load", "--ca-dir", &missing])
        .await?
        .expect_code(2)?
        .expect_stderr(&missing)?;

    // ca show: the certificate and the trust domain, never a key.
    let ca_pem = read(&pki.join("ca.pem"))?;
    let r = ctl.run(&["ca", "show"]).await?;
    r.expect_ok()?;
    let out = r.stdout();
    ensure!(out.starts_with("trust domain: trellis.local\n"), "{r}");
    ensure!(
        out.contains(ca_pem.trim()),
        "ca show is not the loaded CA; {r}"
    );
    ensure!(!out.contains("PRIVATE KEY"), "ca show printed a key; {r}");
    let r = ctl.run(&["ca", "show", "-o", "json"]).await?;
    r.expect_ok()?;
    let doc = r.json()?;
    ensure!(str_field(&doc, "cert_pem")?.trim() == ca_pem.trim(), "{r}");
    ensure!(!r.stdout().contains("PRIVATE KEY"));

    // token create: table (token alone on the last line), -q, -o json.
    let r = ctl
        .run(&[
            "token",
            "create",
            "-n",
            "default",
            "--service",
            "reviews",
            "--description",
            "for reviews",
        ])
        .await?;
    r.expect_ok()?;
    let out = r.stdout();
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 2, "{r}");
    ensure!(lines[0].contains("default/reviews"), "{r}");
    let token1 = lines[1].to_string();
    ensure!(
        token1.starts_with("trellis-") && !token1.contains(' '),
        "{r}"
    );
    let r = ctl
        .run(&[
            "token",
            "create",
            "-n",
            "default",
            "--service",
            "reviews",
            "-q",
        ])
        .await?;
    r.expect_ok()?;
    let token2 = r.stdout().trim_end().to_string();
    ensure!(
        token2.starts_with("trellis-") && !token2.contains('\n') && token2 != token1,
        "{r}"
    );
    let r = ctl
        .run(&[
            "token",
            "create",
            "-n",
            "default",
            "--service",
            "ratings",
            "--ttl",
            "2h",
            "-o",
            "json",
        ])
        .await?;
    r.expect_ok()?;
    let doc = r.json()?;
    let id3 = str_field(&doc, "id")?.to_string();
    ensure!(
        str_field(&doc, "token")?.starts_with(&format!("trellis-{id3}.")),
        "{r}"
    );
    ensure!(str_field(&doc, "service")? == "ratings", "{r}");
    ensure!(
        u64_field(&doc, "expires_unix_ms")? - u64_field(&doc, "created_unix_ms")? == 7_200_000,
        "{r}"
    );
    // Invalid scope: the server's INVALID_ARGUMENT.
    ctl.run(&["token", "create", "-n", "default", "--service", "Bad_Name"])
        .await?
        .expect_code(2)?;

    // token list: every token, never a secret.
    let id_of = |token: &str| -> Result<String> {
        token
            .strip_prefix("trellis-")
            .and_then(|t| t.split('.').next())
            .map(str::to_string)
            .with_context(|| format!("malformed token {token:?}"))
    };
    let (id1, id2) = (id_of(&token1)?, id_of(&token2)?);
    let r = ctl.run(&["token", "list"]).await?;
    r.expect_ok()?;
    let rows = r.table_rows("ID")?;
    ensure!(rows.len() == 3, "{r}");
    for (id, scope) in [
        (&id1, "default/reviews"),
        (&id2, "default/reviews"),
        (&id3, "default/ratings"),
    ] {
        let row = rows
            .iter()
            .find(|row| row.first() == Some(id))
            .with_context(|| format!("no row for {id}; {r}"))?;
        ensure!(row.get(1).map(String::as_str) == Some(scope), "{r}");
        ensure!(row.get(3).map(String::as_str) == Some("0"), "uses; {r}");
    }
    ensure!(
        !r.stdout().contains(&token1) && !r.stdout().contains(&token2),
        "token list printed a secret; {r}"
    );
    let r = ctl.run(&["token", "list", "-o", "json"]).await?;
    r.expect_ok()?;
    let doc = r.json()?;
    let tokens = array_field(&doc, "tokens")?;
    ensure!(tokens.len() == 3, "{r}");
    ensure!(
        tokens.iter().any(|t| {
            t.get("id").and_then(Value::as_str) == Some(id1.as_str())
                && t.get("description").and_then(Value::as_str) == Some("for reviews")
        }),
        "{r}"
    );

    // token revoke: gone from the list; again: not found (3).
    let r = ctl.run(&["token", "revoke", &id1]).await?;
    r.expect_ok()?;
    ensure!(r.stdout().contains("revoked"), "{r}");
    let r = ctl.run(&["token", "list"]).await?;
    r.expect_ok()?;
    let rows = r.table_rows("ID")?;
    ensure!(
        rows.len() == 2 && rows.iter().all(|row| row.first() != Some(&id1)),
        "{r}"
    );
    ctl.run(&["token", "revoke", &id1]).await?.expect_code(3)?;

    // TLS against this plaintext cluster: a usage error that says so.
    ctl.run(&["--ca-file", &path_str(&pki.join("ca.pem")), "ca", "show"])
        .await?
        .expect_code(2)?
        .expect_stderr("does not speak TLS")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_init_loads_the_ca() -> Result<()> {
    let cluster = Cluster::spawn_unformed(ClusterOptions {
        nodes: 3,
        ..ClusterOptions::default()
    })
    .await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;

    // A bad --ca-dir is refused before anything changes.
    let missing = path_str(&tmp.path().join("missing"));
    ctl.run(&["cluster", "init", "--ca-dir", &missing])
        .await?
        .expect_code(2)?
        .expect_stderr(&missing)?;
    for id in cluster.ids() {
        let status = cluster.status(id).await?;
        ensure!(
            !status.initialized,
            "node {id} was initialized by a refused init"
        );
    }

    let pki = tmp.path().join("pki");
    ca_create(&ctl, &pki, &[]).await?;
    let pki_s = path_str(&pki);
    let r = ctl
        .run(&["cluster", "init", "--ca-dir", &pki_s, "-o", "json"])
        .await?;
    r.expect_ok()?;
    r.expect_stderr("trust domain trellis.local")?;
    let doc = r.json()?;
    ensure!(array_field(&doc, "members")?.len() == 3, "{r}");
    ensure!(str_field(&doc, "trust_domain")? == "trellis.local", "{r}");
    ensure!(bool_field(&doc, "ca_loaded")?, "{r}");
    cluster.wait_converged().await?;

    let r = ctl.run(&["ca", "show"]).await?;
    r.expect_ok()?;
    ensure!(
        r.stdout().contains(read(&pki.join("ca.pem"))?.trim()),
        "{r}"
    );

    // Again: nothing to form, the same CA changes nothing.
    let r = ctl
        .run(&["cluster", "init", "--ca-dir", &pki_s, "-o", "json"])
        .await?;
    r.expect_ok()?;
    let doc = r.json()?;
    ensure!(bool_field(&doc, "already_initialized")?, "{r}");
    ensure!(!bool_field(&doc, "ca_loaded")?, "{r}");
    Ok(())
}

// ---------------------------------------------------------------------------
// A cluster with mutual TLS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_certificates_tokens_and_proxy_status() -> Result<()> {
    let cluster = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let pki = cluster.pki().context("a TLS cluster has a PKI")?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;
    let ca_file = pki.ca_file.clone();
    let ca_pem = read(&ca_file)?;
    let admin = |args: &[&str]| with_tls(&ca_file, &pki.admin_cert_file, &pki.admin_key_file, args);

    // With the admin certificate everything works.
    let r = run(&ctl, &admin(&["ca", "show"])).await?;
    r.expect_ok()?;
    ensure!(r.stdout().contains(ca_pem.trim()), "{r}");

    // Plaintext against TLS: exit 2, and it says what to pass.
    ctl.run(&["ca", "show"])
        .await?
        .expect_code(2)?
        .expect_stderr("speaks TLS")?
        .expect_stderr("--ca-file")?;
    // No client certificate: not authorized (7), and it says what to pass.
    ctl.run(&["--ca-file", &path_str(&ca_file), "ca", "show"])
        .await?
        .expect_code(7)?
        .expect_stderr("--cert-file")?;

    // Another CA: its certificates are worth nothing here (7 either way).
    let other = tmp.path().join("other");
    ca_create(&ctl, &other, &[]).await?;
    ctl.run(&[
        "cert",
        "create",
        "--ca-dir",
        &path_str(&other),
        "--admin",
        "ops",
    ])
    .await?
    .expect_ok()?;
    let r = run(
        &ctl,
        &with_tls(
            &other.join("ca.pem"),
            &pki.admin_cert_file,
            &pki.admin_key_file,
            &["ca", "show"],
        ),
    )
    .await?;
    r.expect_code(7)?.expect_stderr("TLS handshake failed")?;
    run(
        &ctl,
        &with_tls(
            &ca_file,
            &other.join("admin-ops.pem"),
            &other.join("admin-ops-key.pem"),
            &["ca", "show"],
        ),
    )
    .await?
    .expect_code(7)?;

    // A workload certificate of the cluster CA: PERMISSION_DENIED (7).
    let (csr, key) = trellis_identity::generate_csr()?;
    let workload = pki.ca().sign_csr(
        &csr,
        &Identity::Workload {
            namespace: "default".into(),
            service: "reviews".into(),
        },
        &[],
        Duration::from_secs(3600),
    )?;
    let wl_cert = tmp.path().join("wl.pem");
    let wl_key = tmp.path().join("wl-key.pem");
    std::fs::write(&wl_cert, &workload.cert_pem)?;
    std::fs::write(&wl_key, &key)?;
    run(
        &ctl,
        &with_tls(&ca_file, &wl_cert, &wl_key, &["ca", "show"]),
    )
    .await?
    .expect_code(7)?
    .expect_stderr("may not call")?;

    // An admin certificate made by `cert create` from the cluster's CA dir.
    let pki_dir: PathBuf = ca_file.parent().context("CA file dir")?.to_path_buf();
    let mine = tmp.path().join("mine");
    ctl.run(&[
        "cert",
        "create",
        "--ca-dir",
        &path_str(&pki_dir),
        "--admin",
        "ops",
        "--out",
        &path_str(&mine),
    ])
    .await?
    .expect_ok()?;
    let ops = |args: &[&str]| {
        with_tls(
            &ca_file,
            &mine.join("admin-ops.pem"),
            &mine.join("admin-ops-key.pem"),
            args,
        )
    };
    run(&ctl, &ops(&["ca", "load", "--ca-dir", &path_str(&pki_dir)]))
        .await?
        .expect_ok()?;

    // A token from the CLI lets a sidecar join ...
    let r = run(
        &ctl,
        &ops(&[
            "token",
            "create",
            "-n",
            "default",
            "--service",
            "reviews",
            "-q",
        ]),
    )
    .await?;
    r.expect_ok()?;
    let token = r.stdout().trim().to_string();
    let anon = client_endpoint(&ca_pem, None)?;
    let conn = connect(&anon, cluster.quic_addr(1)).await?;
    let (resp, sidecar_key) = join(&conn, &token, "", "").await?;
    let cert = issued(resp)?;

    // ... which cert list and token list show.
    let r = run(&ctl, &ops(&["cert", "list"])).await?;
    r.expect_ok()?;
    let rows = r.table_rows("SERIAL")?;
    let row = rows
        .iter()
        .find(|row| row.first() == Some(&cert.serial))
        .with_context(|| format!("issued certificate {} not listed; {r}", cert.serial))?;
    let token_id = token
        .strip_prefix("trellis-")
        .and_then(|t| t.split('.').next())
        .context("token id")?;
    ensure!(
        row.get(1)
            .is_some_and(|s| s.ends_with("/ns/default/svc/reviews"))
            && row.get(3).map(String::as_str) == Some("join")
            && row.get(5).map(String::as_str) == Some(token_id),
        "{r}"
    );
    let r = run(&ctl, &ops(&["cert", "list", "-o", "json"])).await?;
    r.expect_ok()?;
    let doc = r.json()?;
    ensure!(
        array_field(&doc, "certificates")?
            .iter()
            .any(|c| c.get("serial").and_then(Value::as_str) == Some(cert.serial.as_str())),
        "{r}"
    );
    let r = run(&ctl, &ops(&["token", "list"])).await?;
    r.expect_ok()?;
    ensure!(
        r.table_rows("ID")?.iter().any(|row| {
            row.first().map(String::as_str) == Some(token_id)
                && row.get(3).map(String::as_str) == Some("1")
        }),
        "token uses not counted; {r}"
    );

    // A session that applied only revision 1: STALE in proxy-status.
    let ep = client_endpoint(&ca_pem, Some((&cert.cert_pem, &sidecar_key)))?;
    let conn = connect(&ep, cluster.quic_addr(2)).await?;
    let (mut send, mut recv) = quic::open(
        &conn,
        sc::open::Kind::Session(sc::SessionRequest {
            instance: None,
            ttl_ms: 0,
            resume_lease_id: 0,
            applied_revision: 1,
            sidecar_name: "cli-sidecar".into(),
        }),
    )
    .await?;
    match quic::next::<sc::SessionMessage>(&mut recv)
        .await?
        .and_then(|m| m.kind)
    {
        Some(sc::session_message::Kind::Accepted(_)) => {}
        other => bail!("expected SessionAccepted, got {other:?}"),
    }
    let r = run(&ctl, &ops(&["proxy-status"])).await?;
    r.expect_ok()?;
    let (revision, rows) = proxy_table(&r)?;
    ensure!(revision > 1, "{r}");
    let row = rows
        .iter()
        .find(|row| row.first().map(String::as_str) == Some("cli-sidecar"))
        .with_context(|| format!("the sidecar is missing; {r}"))?;
    ensure!(
        row.get(1)
            .is_some_and(|s| s.ends_with("/ns/default/svc/reviews"))
            && row.get(2).map(String::as_str) == Some("2")
            && row.get(3).map(String::as_str) == Some("-")
            && row.get(4).map(String::as_str) == Some("1")
            && row.get(5).map(String::as_str) == Some("STALE"),
        "{r}"
    );
    let r = run(&ctl, &ops(&["proxy-status", "-o", "json"])).await?;
    r.expect_ok()?;
    let doc = r.json()?;
    let rev = u64_field(&doc, "revision")?;
    let me = array_field(&doc, "sidecars")?
        .iter()
        .find(|s| s.get("sidecar_name").and_then(Value::as_str) == Some("cli-sidecar"))
        .with_context(|| format!("the sidecar is missing; {r}"))?
        .clone();
    ensure!(str_field(&me, "status")? == "STALE", "{r}");
    ensure!(u64_field(&me, "behind")? == rev - 1, "{r}");
    ensure!(u64_field(&me, "applied_revision")? == 1, "{r}");

    // Once it reports the current revision: SYNCED (the revision may move
    // on meanwhile, so report until it matches).
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let r = run(&ctl, &ops(&["proxy-status", "-o", "json"])).await?;
        r.expect_ok()?;
        let doc = r.json()?;
        let rev = u64_field(&doc, "revision")?;
        let synced = array_field(&doc, "sidecars")?.iter().any(|s| {
            s.get("sidecar_name").and_then(Value::as_str) == Some("cli-sidecar")
                && s.get("status").and_then(Value::as_str) == Some("SYNCED")
        });
        if synced {
            let r = run(&ctl, &ops(&["proxy-status"])).await?;
            r.expect_ok()?;
            let (_, rows) = proxy_table(&r)?;
            ensure!(
                rows.iter()
                    .any(|row| row.first().map(String::as_str) == Some("cli-sidecar")
                        && row.get(5).map(String::as_str) == Some("SYNCED")),
                "{r}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the sidecar never showed SYNCED; {r}"
        );
        trellis_proto::frame::write_frame(
            &mut send,
            &sc::SessionUpdate {
                applied_revision: rev,
                goodbye: false,
                health: 0,
            },
        )
        .await?;
        match quic::next::<sc::SessionMessage>(&mut recv)
            .await?
            .and_then(|m| m.kind)
        {
            Some(sc::session_message::Kind::Ack(_)) => {}
            other => bail!("expected an ack, got {other:?}"),
        }
    }
    Ok(())
}
