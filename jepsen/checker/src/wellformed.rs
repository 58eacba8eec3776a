//! The `history` checker: does the history follow the format's rules?
//! Record indices strictly increase; every completion pairs with an open
//! invoke of the same process, function, key and value; `ok` client
//! completions carry a revision; `watch` records are `ok` with a revision,
//! `watch-start` and `nemesis` records are `info`. Anything else means the
//! runner and the checkers disagree about the format, so the other
//! checkers' verdicts could not be trusted: it fails.

use crate::history::{Function, Record, RecordType};
use crate::ops::{client_ops, Outcome};
use crate::report::CheckerResult;

/// Check the format rules.
pub fn check(records: &[Record]) -> CheckerResult {
    let mut anomalies = Vec::new();
    let mut prev: Option<u64> = None;
    for r in records {
        if let Some(p) = prev {
            if r.index <= p {
                anomalies.push(format!(
                    "[#{}] record index does not increase (previous #{p})",
                    r.index
                ));
            }
        }
        prev = Some(r.index);
        match r.f {
            Function::Watch => {
                if r.kind != RecordType::Ok {
                    anomalies.push(format!(
                        "[#{}] watch record of type {} (expected ok)",
                        r.index,
                        r.kind.as_str()
                    ));
                } else if r.revision.is_none() {
                    anomalies.push(format!("[#{}] watch delivery without a revision", r.index));
                }
            }
            Function::WatchStart => {
                if r.kind != RecordType::Info {
                    anomalies.push(format!(
                        "[#{}] watch-start record of type {} (expected info)",
                        r.index,
                        r.kind.as_str()
                    ));
                }
                if r.revision.is_none() {
                    anomalies.push(format!("[#{}] watch-start without a revision", r.index));
                }
            }
            Function::Nemesis => {
                if r.kind != RecordType::Info {
                    anomalies.push(format!(
                        "[#{}] nemesis record of type {} (expected info)",
                        r.index,
                        r.kind.as_str()
                    ));
                }
            }
            Function::Read | Function::Write | Function::Cas => {}
        }
    }
    let ops = client_ops(records);
    anomalies.extend(ops.problems);
    let pending = ops
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Pending)
        .count();
    let mut notes = Vec::new();
    if pending > 0 {
        notes.push(format!(
            "{pending} operations never completed (treated as info)"
        ));
    }
    CheckerResult::from_anomalies("history", anomalies, notes)
}
