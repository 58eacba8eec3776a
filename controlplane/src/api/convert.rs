//! Protobuf ⇄ domain conversions. Requests are validated here, once, and
//! every error names the field path that is wrong.

use trellis_proto::admin as pb;
use trellis_raft_store::{
    Command, Compare, CompareOp, CompareTarget, KeyValue, TxnOp, TxnOpResult,
};

use crate::error::{ApiError, MAX_KEY_BYTES, MAX_VALUE_BYTES};

/// Most operations in one txn (per branch), as etcd's `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Most bytes of keys and values in one txn (all branches and compares):
/// bounds the size of a Raft entry and of its replication messages.
pub const MAX_TXN_BYTES: usize = 4 * 1024 * 1024;
/// Most compares in one txn.
pub const MAX_TXN_COMPARES: usize = 128;

/// Check a key: non-empty, at most [`MAX_KEY_BYTES`], not one of the
/// control plane's own ([`crate::system::RESERVED_PREFIX`]).
pub fn check_key(field: &str, key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if crate::system::is_reserved(key) {
        return Err(ApiError::invalid(
            field,
            format!(
                "{key:?} is under {}, which the control plane keeps for itself (CA, join tokens, certificates); use the Identity API (`trellisctl token`, `trellisctl cert`)",
                crate::system::RESERVED_PREFIX
            ),
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_KEY_BYTES}", key.len()),
        ));
    }
    Ok(())
}

/// Check a value: at most [`MAX_VALUE_BYTES`].
pub fn check_value(field: &str, value: &[u8]) -> Result<(), ApiError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_VALUE_BYTES}", value.len()),
        ));
    }
    Ok(())
}

/// Validate a put (before routing: bad input is not forwarded).
pub fn check_put(r: &pb::PutRequest) -> Result<(), ApiError> {
    check_key("key", &r.key)?;
    check_not_resource("key", &r.key)?;
    check_value("value", &r.value)
}

/// Mesh resources are written only through `Resources.Apply`, which
/// validates them: a raw put there could hand sidecars a document that
/// does not parse.
pub fn check_not_resource(field: &str, key: &str) -> Result<(), ApiError> {
    for kind in trellis_resources::Kind::ALL {
        let prefix = trellis_resources::key_prefix(kind, None);
        if key.starts_with(&prefix) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "{key:?} is under {prefix}, where {} resources live; write them with Resources.Apply (`trellisctl apply`), which validates them",
                    kind.as_str()
                ),
            ));
        }
    }
    Ok(())
}

/// A validated `Put` command, taking the request's buffers (the domain
/// type lives in the store crate, so these are functions rather than
/// `TryFrom` impls).
pub fn put_command(r: pb::PutRequest) -> Result<Command, ApiError> {
    check_put(&r)?;
    Ok(Command::Put {
        key: r.key,
        value: r.value,
        expected_mod_revision: r.expected_mod_revision,
        prev_kv: r.prev_kv,
        lease: r.lease,
    })
}

/// A validated `Delete` command.
pub fn delete_command(r: pb::DeleteRequest) -> Result<Command, ApiError> {
    check_key("key", &r.key)?;
    Ok(Command::Delete {
        key: r.key,
        expected_mod_revision: r.expected_mod_revision,
        prev_kv: r.prev_kv,
    })
}

fn txn_op(field: &str, op: &pb::TxnOp) -> Result<TxnOp, ApiError> {
    match &op.op {
        None => Err(ApiError::invalid(
            field,
            "no operation set (put, delete or get)",
        )),
        Some(pb::txn_op::Op::Put(p)) => {
            check_key(&format!("{field}.put.key"), &p.key)?;
            check_not_resource(&format!("{field}.put.key"), &p.key)?;
            check_value(&format!("{field}.put.value"), &p.value)?;
            if p.expected_mod_revision.is_some() {
                return Err(ApiError::invalid(
                    format!("{field}.put.expected_mod_revision"),
                    "not allowed inside a txn; use a compare",
                ));
            }
            Ok(TxnOp::Put {
                key: p.key.clone(),
                value: p.value.clone(),
                lease: p.lease,
            })
        }
        Some(pb::txn_op::Op::Delete(d)) => {
            check_key(&format!("{field}.delete.key"), &d.key)?;
            if d.expected_mod_revision.is_some() {
                return Err(ApiError::invalid(
                    format!("{field}.delete.expected_mod_revision"),
                    "not allowed inside a txn; use a compare",
                ));
            }
            Ok(TxnOp::Delete { key: d.key.clone() })
        }
        Some(pb::txn_op::Op::Get(g)) => {
            check_key(&format!("{field}.get.key"), &g.key)?;
            Ok(TxnOp::Get { key: g.key.clone() })
        }
    }
}

fn txn_ops(branch: &str, ops: &[pb::TxnOp]) -> Result<Vec<TxnOp>, ApiError> {
    if ops.len() > MAX_TXN_OPS {
        return Err(ApiError::invalid(
            branch,
            format!("{} operations; the limit is {MAX_TXN_OPS}", ops.len()),
        ));
    }
    let ops: Vec<TxnOp> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| txn_op(&format!("{branch}[{i}]"), op))
        .collect::<Result<_, _>>()?;
    // Like etcd: a branch may change a key at most once, so one revision
    // holds at most one event per key.
    let mut written = std::collections::HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let (kind, key) = match op {
            TxnOp::Put { key, .. } => ("put", key),
            TxnOp::Delete { key } => ("delete", key),
            TxnOp::Get { .. } => continue,
        };
        if let Some(first) = written.insert(key.as_str(), i) {
            return Err(ApiError::invalid(
                format!("{branch}[{i}].{kind}.key"),
                format!("{key:?} is already changed by {branch}[{first}]; a txn branch may change a key once"),
            ));
        }
    }
    Ok(ops)
}

/// A validated `Txn` command.
pub fn txn_command(r: &pb::TxnRequest) -> Result<Command, ApiError> {
    {
        if r.compare.len() > MAX_TXN_COMPARES {
            return Err(ApiError::invalid(
                "compare",
                format!(
                    "{} compares; the limit is {MAX_TXN_COMPARES}",
                    r.compare.len()
                ),
            ));
        }
        let mut compare = Vec::with_capacity(r.compare.len());
        for (i, c) in r.compare.iter().enumerate() {
            let field = format!("compare[{i}]");
            check_key(&format!("{field}.key"), &c.key)?;
            let target = match pb::compare::Target::try_from(c.target) {
                Ok(pb::compare::Target::ModRevision) => CompareTarget::ModRevision(c.number),
                Ok(pb::compare::Target::CreateRevision) => CompareTarget::CreateRevision(c.number),
                Ok(pb::compare::Target::Version) => CompareTarget::Version(c.number),
                Ok(pb::compare::Target::Value) => CompareTarget::Value(c.value.clone()),
                Err(_) => {
                    return Err(ApiError::invalid(
                        format!("{field}.target"),
                        format!("unknown target {}", c.target),
                    ))
                }
            };
            let op = match pb::compare::Op::try_from(c.op) {
                Ok(pb::compare::Op::Equal) => CompareOp::Equal,
                Ok(pb::compare::Op::NotEqual) => CompareOp::NotEqual,
                Ok(pb::compare::Op::Greater) => CompareOp::Greater,
                Ok(pb::compare::Op::Less) => CompareOp::Less,
                Err(_) => {
                    return Err(ApiError::invalid(
                        format!("{field}.op"),
                        format!("unknown op {}", c.op),
                    ))
                }
            };
            compare.push(Compare {
                key: c.key.clone(),
                target,
                op,
            });
        }
        let op_bytes = |op: &pb::TxnOp| match &op.op {
            Some(pb::txn_op::Op::Put(p)) => p.key.len() + p.value.len(),
            Some(pb::txn_op::Op::Delete(d)) => d.key.len(),
            Some(pb::txn_op::Op::Get(g)) => g.key.len(),
            None => 0,
        };
        let total: usize = r
            .compare
            .iter()
            .map(|c| c.key.len() + c.value.len())
            .sum::<usize>()
            + r.success
                .iter()
                .chain(&r.failure)
                .map(op_bytes)
                .sum::<usize>();
        if total > MAX_TXN_BYTES {
            return Err(ApiError::invalid(
                "txn",
                format!("{total} bytes of keys and values; the limit is {MAX_TXN_BYTES}"),
            ));
        }
        Ok(Command::Txn {
            compare,
            success: txn_ops("success", &r.success)?,
            failure: txn_ops("failure", &r.failure)?,
        })
    }
}

/// Domain value → protobuf.
pub fn kv_to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

/// Domain txn result → protobuf, given the header for nested responses.
pub fn txn_result_to_pb(r: TxnOpResult, header: &pb::ResponseHeader) -> pb::TxnOpResult {
    use pb::txn_op_result::Result as R;
    let result = match r {
        TxnOpResult::Put { prev } => R::Put(pb::PutResponse {
            header: Some(*header),
            prev_kv: prev.map(kv_to_pb),
        }),
        TxnOpResult::Delete { prev } => R::Delete(pb::DeleteResponse {
            header: Some(*header),
            deleted: prev.is_some(),
            prev_kv: prev.map(kv_to_pb),
        }),
        TxnOpResult::Get { kv } => R::Get(pb::GetResponse {
            header: Some(*header),
            kv: kv.map(kv_to_pb),
        }),
    };
    pb::TxnOpResult {
        result: Some(result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_validation_names_fields() {
        let err = put_command(pb::PutRequest::default()).unwrap_err();
        assert_eq!(err.to_string(), "invalid argument: key: must not be empty");
        let big_key = pb::PutRequest {
            key: "k".repeat(MAX_KEY_BYTES + 1),
            ..Default::default()
        };
        assert!(put_command(big_key)
            .unwrap_err()
            .to_string()
            .contains("limit is 1024"));
        let big_value = pb::PutRequest {
            key: "k".into(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            ..Default::default()
        };
        assert!(put_command(big_value)
            .unwrap_err()
            .to_string()
            .starts_with("invalid argument: value:"));
    }

    #[test]
    fn raw_puts_into_resource_keys_are_refused() {
        let req = pb::PutRequest {
            key: "/route/default/ratings".into(),
            value: b"{}".to_vec(),
            ..Default::default()
        };
        let err = put_command(req).unwrap_err().to_string();
        assert!(
            err.contains("Resources.Apply") && err.contains("/route/"),
            "{err}"
        );
        let ok = pb::PutRequest {
            key: "/routes-are-not-here".into(),
            ..Default::default()
        };
        assert!(put_command(ok).is_ok());
    }

    #[test]
    fn txn_validation_names_nested_fields() {
        let req = pb::TxnRequest {
            compare: vec![],
            success: vec![
                pb::TxnOp {
                    op: Some(pb::txn_op::Op::Get(pb::GetRequest {
                        key: "a".into(),
                        serializable: false,
                    })),
                },
                pb::TxnOp {
                    op: Some(pb::txn_op::Op::Put(pb::PutRequest::default())),
                },
            ],
            failure: vec![],
        };
        let err = txn_command(&req).unwrap_err().to_string();
        assert!(err.contains("success[1].put.key"), "{err}");
        let req = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: "a".into(),
                target: 9,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(txn_command(&req)
            .unwrap_err()
            .to_string()
            .contains("compare[0].target"));
        let big = |i: usize| pb::TxnOp {
            op: Some(pb::txn_op::Op::Put(pb::PutRequest {
                key: format!("k{i}"),
                value: vec![0; MAX_VALUE_BYTES],
                ..Default::default()
            })),
        };
        let req = pb::TxnRequest {
            success: (0..5).map(big).collect(),
            ..Default::default()
        };
        let err = txn_command(&req).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid argument: txn:") && err.contains("limit is 4194304"),
            "{err}"
        );
    }
}
