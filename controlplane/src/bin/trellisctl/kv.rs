//! Key-value commands: `put`, `get`, `list`, `delete` and `compact`, each a
//! unary call (or a series of `List` pages) with endpoint failover.

use std::io::Read as _;

use serde_json::{json, Value};
use trellis_proto::admin::kv_client::KvClient;
use trellis_proto::admin::{
    CompactRequest, DeleteRequest, GetRequest, KeyValue, ListRequest, PutRequest,
};

use crate::args::{CompactArgs, DeleteArgs, GetArgs, ListArgs, PutArgs};
use crate::client::with_deadline;
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::output::{
    display_value, escape_text, kv_json, print_json, print_line, write_stdout, Table,
};

/// Largest page the server accepts.
const MAX_PAGE: u64 = 10_000;

pub async fn put(ctx: &Ctx, args: PutArgs) -> Result<(), CliError> {
    let value = if args.value == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| {
            CliError::new(
                exit::OTHER,
                format!("cannot read the value from stdin: {e}"),
            )
        })?;
        buf
    } else {
        args.value.into_bytes()
    };
    let request = PutRequest {
        key: args.key.clone(),
        value,
        expected_mod_revision: args.expected_revision,
        prev_kv: args.prev_kv,
        lease: args.lease,
    };
    let what = format!("put {}", shown_key(&args.key));
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { KvClient::new(channel).put(request).await }
        })
        .await?;
    let response = answer.value;
    let revision = response.header.map_or(0, |h| h.revision);
    if ctx.json() {
        let mut doc = json!({ "key": args.key, "revision": revision });
        if args.prev_kv {
            doc["prev_kv"] = response
                .prev_kv
                .as_ref()
                .map_or(Value::Null, |kv| Value::Object(kv_json(kv, true)));
        }
        return print_json(&doc);
    }
    print_line(&format!("OK revision={revision}"))?;
    if args.prev_kv {
        match &response.prev_kv {
            Some(kv) => print_line(&format!(
                "prev: {} (mod_revision={}, version={})",
                display_value(&kv.value),
                kv.mod_revision,
                kv.version
            ))?,
            None => print_line("prev: (none)")?,
        }
    }
    Ok(())
}

pub async fn get(ctx: &Ctx, args: GetArgs) -> Result<(), CliError> {
    let request = GetRequest {
        key: args.key.clone(),
        serializable: args.serializable,
    };
    let what = format!("get {}", shown_key(&args.key));
    let answer = ctx
        .client
        .unary(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { KvClient::new(channel).get(request).await }
        })
        .await?;
    let Some(kv) = answer.value.kv else {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("{what}: key not found (endpoint {})", answer.endpoint),
        ));
    };
    if ctx.json() {
        let mut doc = kv_json(&kv, true);
        doc.insert(
            "revision".into(),
            json!(answer.value.header.map_or(0, |h| h.revision)),
        );
        return print_json(&Value::Object(doc));
    }
    // The raw value, byte for byte, then a newline.
    let mut out = kv.value;
    out.push(b'\n');
    write_stdout(&out)
}

pub async fn list(ctx: &Ctx, args: ListArgs) -> Result<(), CliError> {
    let what = format!("list {:?}", args.prefix);
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut token = String::new();
    let mut revision = None;
    let mut more = false;
    loop {
        let page_limit = match args.limit {
            Some(limit) => limit.saturating_sub(kvs.len() as u64).min(MAX_PAGE) as u32,
            None => 0,
        };
        let request = ListRequest {
            prefix: args.prefix.clone(),
            limit: page_limit,
            page_token: token.clone(),
            serializable: args.serializable,
            keys_only: args.keys_only,
        };
        let answer = ctx
            .client
            .unary(&what, |channel, deadline| {
                let request = with_deadline(request.clone(), deadline);
                async move { KvClient::new(channel).list(request).await }
            })
            .await?;
        let page = answer.value;
        revision.get_or_insert(page.header.map_or(0, |h| h.revision));
        kvs.extend(page.kvs);
        if page.next_page_token.is_empty() {
            break;
        }
        if page.next_page_token == token {
            return Err(CliError::new(
                exit::OTHER,
                format!(
                    "{what}: the server returned the same page token twice (endpoint {})",
                    answer.endpoint
                ),
            ));
        }
        token = page.next_page_token;
        if args.limit.is_some_and(|limit| kvs.len() as u64 >= limit) {
            more = true;
            break;
        }
    }
    if let Some(limit) = args.limit {
        if kvs.len() as u64 > limit {
            kvs.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            more = true;
        }
    }
    if ctx.json() {
        let items: Vec<Value> = kvs
            .iter()
            .map(|kv| Value::Object(kv_json(kv, !args.keys_only)))
            .collect();
        let mut doc = json!({
            "revision": revision.unwrap_or(0),
            "count": items.len(),
            "kvs": items,
            "more": more,
        });
        if more {
            doc["next_page_token"] = json!(token);
        }
        return print_json(&doc);
    }
    let table = if args.keys_only {
        let mut table = Table::new(&["KEY"]);
        for kv in &kvs {
            table.row(vec![escape_text(&kv.key)]);
        }
        table
    } else {
        let mut table = Table::new(&["KEY", "MOD-REV", "VERSION", "VALUE"]);
        for kv in &kvs {
            table.row(vec![
                escape_text(&kv.key),
                kv.mod_revision.to_string(),
                kv.version.to_string(),
                display_value(&kv.value),
            ]);
        }
        table
    };
    write_stdout(table.render().as_bytes())
}

pub async fn delete(ctx: &Ctx, args: DeleteArgs) -> Result<(), CliError> {
    let request = DeleteRequest {
        key: args.key.clone(),
        expected_mod_revision: args.expected_revision,
        prev_kv: false,
    };
    let what = format!("delete {}", shown_key(&args.key));
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { KvClient::new(channel).delete(request).await }
        })
        .await?;
    let response = answer.value;
    let revision = response.header.map_or(0, |h| h.revision);
    if ctx.json() {
        print_json(&json!({
            "key": args.key,
            "deleted": response.deleted,
            "revision": revision,
        }))?;
    } else if response.deleted {
        print_line(&format!("deleted revision={revision}"))?;
    }
    if !response.deleted {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("{what}: key not found (endpoint {})", answer.endpoint),
        ));
    }
    Ok(())
}

pub async fn compact(ctx: &Ctx, args: CompactArgs) -> Result<(), CliError> {
    let request = CompactRequest {
        revision: args.revision,
    };
    let what = format!("compact {}", args.revision);
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request, deadline);
            async move { KvClient::new(channel).compact(request).await }
        })
        .await?;
    let revision = answer.value.header.map_or(0, |h| h.revision);
    if ctx.json() {
        return print_json(&json!({
            "compact_revision": args.revision,
            "revision": revision,
        }));
    }
    print_line(&format!(
        "compacted at revision {} (current revision {revision})",
        args.revision
    ))
}

/// A key as shown in messages: quoted, and cut short when very long (the
/// server's error already says how long it is).
fn shown_key(key: &str) -> String {
    const MAX: usize = 64;
    if key.len() <= MAX {
        return format!("{key:?}");
    }
    let mut end = MAX;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &key[..end], key.len())
}
