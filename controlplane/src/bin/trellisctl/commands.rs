//! Dispatch of the parsed command line to the command implementations, and
//! the context they share (endpoints with failover, output format).

use crate::args::{Cli, ClusterCommand, Command, Format, LeaderCommand, MemberCommand};
use crate::client::{endpoint_uri, Client};
use crate::error::CliError;
use crate::{cluster, kv, watch};

/// What every command gets.
pub struct Ctx {
    pub client: Client,
    pub format: Format,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let ctx = Ctx {
        client: Client::new(dedup_endpoints(cli.endpoints), cli.timeout),
        format: cli.output,
    };
    match cli.command {
        Command::Put(args) => kv::put(&ctx, args).await,
        Command::Get(args) => kv::get(&ctx, args).await,
        Command::List(args) => kv::list(&ctx, args).await,
        Command::Delete(args) => kv::delete(&ctx, args).await,
        Command::Compact(args) => kv::compact(&ctx, args).await,
        Command::Watch(args) => watch::watch(&ctx, args).await,
        Command::Cluster(ClusterCommand::Init) => cluster::init(&ctx).await,
        Command::Cluster(ClusterCommand::Status) => cluster::status(&ctx).await,
        Command::Cluster(ClusterCommand::Snapshot) => cluster::snapshot(&ctx).await,
        Command::Member(MemberCommand::List) => cluster::member_list(&ctx).await,
        Command::Member(MemberCommand::Add(args)) => cluster::member_add(&ctx, args).await,
        Command::Member(MemberCommand::Remove(args)) => cluster::member_remove(&ctx, args).await,
        Command::Leader(LeaderCommand::Transfer(args)) => {
            cluster::leader_transfer(&ctx, args).await
        }
    }
}

/// Drops repeated endpoints (same address with or without `http://`),
/// keeping the first occurrence and the order.
fn dedup_endpoints(endpoints: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    endpoints
        .into_iter()
        .filter(|e| seen.insert(endpoint_uri(e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_deduplicated_in_order() {
        let got = dedup_endpoints(vec![
            "b:1".into(),
            "a:1".into(),
            "http://b:1".into(),
            "a:1".into(),
        ]);
        assert_eq!(got, vec!["b:1".to_string(), "a:1".to_string()]);
    }
}
