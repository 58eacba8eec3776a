//! Lease commands: `lease grant`, `lease keepalive`, `lease revoke` and
//! `lease list`, on the admin API's `Lease` service.
//!
//! Grants and revokes are writes (resent to another endpoint only when
//! provably not applied); keepalives and lists are idempotent and fail over
//! like reads. `lease keepalive` without `--once` renews every TTL/3 until
//! it is interrupted or the lease is gone (exit 3); when no endpoint
//! answers it keeps trying until a whole TTL passed without a renewal, by
//! then the lease has expired (exit 5).

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use trellis_proto::admin::lease_client::LeaseClient;
use trellis_proto::admin::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseListRequest,
    LeaseRevokeRequest,
};

use crate::args::{LeaseGrantArgs, LeaseIdArgs, LeaseKeepAliveArgs};
use crate::client::with_deadline;
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::output::{
    escape_text, note, print_json, print_json_line, print_line, write_stdout, Table,
};

/// Shortest pause between keepalives.
const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest pause before retrying a keepalive no endpoint answered.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

pub async fn grant(ctx: &Ctx, args: LeaseGrantArgs) -> Result<(), CliError> {
    let ttl_ms = u64::try_from(args.ttl.as_millis()).unwrap_or(u64::MAX);
    let request = LeaseGrantRequest {
        ttl_ms,
        id: args.id.unwrap_or(0),
    };
    let answer = ctx
        .client
        .unary_write("lease grant", |channel, deadline| {
            let request = with_deadline(request, deadline);
            async move { LeaseClient::new(channel).grant(request).await }
        })
        .await?;
    let response = answer.value;
    if ctx.json() {
        return print_json(&json!({
            "id": response.id,
            "ttl_ms": response.ttl_ms,
            "revision": response.header.map_or(0, |h| h.revision),
        }));
    }
    // Just the id, for `ID=$(trellisctl lease grant 10s)`.
    print_line(&response.id.to_string())
}

async fn keep_alive_once(ctx: &Ctx, id: u64) -> Result<LeaseKeepAliveResponse, CliError> {
    let what = format!("lease keepalive {id}");
    let request = LeaseKeepAliveRequest { id };
    let answer = ctx
        .client
        .unary(&what, |channel, deadline| {
            let request = with_deadline(request, deadline);
            async move { LeaseClient::new(channel).keep_alive(request).await }
        })
        .await?;
    Ok(answer.value)
}

fn print_kept_alive(
    ctx: &Ctx,
    response: &LeaseKeepAliveResponse,
    stream: bool,
) -> Result<(), CliError> {
    if ctx.json() {
        let doc = json!({ "id": response.id, "ttl_ms": response.ttl_ms });
        return if stream {
            print_json_line(&doc)
        } else {
            print_json(&doc)
        };
    }
    print_line(&format!(
        "lease {} kept alive (TTL {})",
        response.id,
        fmt_ms(response.ttl_ms)
    ))
}

pub async fn keep_alive(ctx: &Ctx, args: LeaseKeepAliveArgs) -> Result<(), CliError> {
    let first = keep_alive_once(ctx, args.id).await?;
    print_kept_alive(ctx, &first, !args.once)?;
    if args.once {
        return Ok(());
    }
    let mut ttl = Duration::from_millis(first.ttl_ms);
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep_until(last_ok + (ttl / 3).max(MIN_KEEPALIVE_INTERVAL)).await;
        loop {
            match keep_alive_once(ctx, args.id).await {
                Ok(response) => {
                    last_ok = Instant::now();
                    ttl = Duration::from_millis(response.ttl_ms);
                    print_kept_alive(ctx, &response, true)?;
                    break;
                }
                Err(e) if e.code == exit::UNAVAILABLE => {
                    if last_ok.elapsed() >= ttl {
                        let message = e.message.unwrap_or_default();
                        return Err(CliError::new(
                            exit::UNAVAILABLE,
                            format!(
                                "{message}; no keepalive succeeded for a whole TTL ({}), \
                                 so lease {} has expired",
                                fmt_ms(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                                args.id
                            ),
                        ));
                    }
                    note(&format!(
                        "{}; retrying",
                        e.message.as_deref().unwrap_or("keepalive failed")
                    ));
                    tokio::time::sleep((ttl / 6).clamp(MIN_KEEPALIVE_INTERVAL, MAX_RETRY_PAUSE))
                        .await;
                }
                // NOT_FOUND (expired or revoked: exit 3) and anything else.
                Err(e) => return Err(e),
            }
        }
    }
}

pub async fn revoke(ctx: &Ctx, args: LeaseIdArgs) -> Result<(), CliError> {
    let what = format!("lease revoke {}", args.id);
    let request = LeaseRevokeRequest { id: args.id };
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request, deadline);
            async move { LeaseClient::new(channel).revoke(request).await }
        })
        .await?;
    let response = answer.value;
    if ctx.json() {
        return print_json(&json!({
            "id": args.id,
            "deleted_keys": response.deleted_keys,
            "revision": response.header.map_or(0, |h| h.revision),
        }));
    }
    let keys = if response.deleted_keys == 1 {
        "key"
    } else {
        "keys"
    };
    print_line(&format!(
        "lease {} revoked ({} {keys} deleted)",
        args.id, response.deleted_keys
    ))
}

pub async fn list(ctx: &Ctx) -> Result<(), CliError> {
    let answer = ctx
        .client
        .unary("lease list", |channel, deadline| {
            let request = with_deadline(LeaseListRequest {}, deadline);
            async move { LeaseClient::new(channel).list(request).await }
        })
        .await?;
    let response = answer.value;
    if ctx.json() {
        let leases: Vec<_> = response
            .leases
            .iter()
            .map(|l| {
                json!({
                    "id": l.id,
                    "ttl_ms": l.ttl_ms,
                    "remaining_ms": l.remaining_ms,
                    "keys": l.keys,
                })
            })
            .collect();
        return print_json(&json!({
            "revision": response.header.map_or(0, |h| h.revision),
            "leases": leases,
        }));
    }
    let mut table = Table::new(&["ID", "TTL", "REMAINING", "KEYS"]);
    for l in &response.leases {
        let keys = if l.keys.is_empty() {
            "-".to_string()
        } else {
            l.keys
                .iter()
                .map(|k| escape_text(k))
                .collect::<Vec<_>>()
                .join(",")
        };
        table.row(vec![
            l.id.to_string(),
            fmt_ms(l.ttl_ms),
            fmt_ms(l.remaining_ms),
            keys,
        ]);
    }
    write_stdout(table.render().as_bytes())
}

/// Milliseconds for people: `250ms`, `7.3s`, `10s`, `2m30s`, `24h`.
fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if !ms.is_multiple_of(1000) {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millisecond_formatting() {
        assert_eq!(fmt_ms(0), "0ms");
        assert_eq!(fmt_ms(250), "250ms");
        assert_eq!(fmt_ms(10_000), "10s");
        assert_eq!(fmt_ms(7_300), "7.3s");
        assert_eq!(fmt_ms(60_000), "1m");
        assert_eq!(fmt_ms(150_000), "2m30s");
        assert_eq!(fmt_ms(86_400_000), "24h");
        assert_eq!(fmt_ms(3_661_000), "1h1m1s");
    }
}
