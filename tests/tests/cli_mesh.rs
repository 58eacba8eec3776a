//! End-to-end tests of `trellisctl`'s mesh-resource and lease commands
//! (`apply`, `diff`, `get KIND`, `delete KIND`/`-f`, `watch KIND`, `lease`)
//! and of the rule that keeps the raw key forms working: every test starts
//! a real 3-node `trellisd` cluster and runs the real `trellisctl` binary.
//!
//! Build the binaries first, in the same profile as the tests:
//! `cargo build --release --bins && cargo test --release -p trellis-tests --test cli_mesh`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::time::Instant;
use trellis_resources::{parse_documents, Kind, Resource};
use trellis_tests::Cluster;

use common::{array_field, str_field, u64_field, Ctl, Run};

/// How long a watcher may take to print the events we wait for.
const WATCH_TIMEOUT: Duration = Duration::from_secs(15);

/// `deploy/examples/bookinfo` of this repository.
fn bookinfo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("examples")
        .join("bookinfo")
}

/// The resources of the `*.yaml` files directly in `dir` (what `apply -f
/// dir` sends), parsed here independently of the CLI.
fn parse_dir(dir: &Path) -> Result<Vec<Resource>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    let mut all = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let name = path.display().to_string();
        let parsed = parse_documents(&name, &text)
            .map_err(|e| anyhow::anyhow!("{name} does not parse: {e:?}"))?;
        all.extend(parsed);
    }
    Ok(all)
}

/// Parses what `get KIND -o yaml` printed.
fn parse_output(run: &Run) -> Result<Vec<Resource>> {
    parse_documents("stdout", &run.stdout())
        .map_err(|e| anyhow::anyhow!("`get -o yaml` output does not parse back: {e:?}; {run}"))
}

fn lines(run: &Run) -> Vec<String> {
    run.stdout().lines().map(str::to_string).collect()
}

/// One cell of a parsed table (empty if there is no such cell).
fn cell(rows: &[Vec<String>], row: usize, column: usize) -> String {
    rows.get(row)
        .and_then(|r| r.get(column))
        .cloned()
        .unwrap_or_default()
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

const RATINGS_SERVICE: &str = "\
apiVersion: trellis/v1
kind: Service
metadata: {name: ratings}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: ratings}
spec:
  host: ratings
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
";

/// A Route splitting ratings between v1 and v2.
fn ratings_route(name: &str, v1: u32, v2: u32) -> String {
    format!(
        "\
apiVersion: trellis/v1
kind: Route
metadata:
  name: {name}
  namespace: default
spec:
  hosts: [ratings]
  http:
    - route:
        - destination: {{service: ratings, subset: v1}}
          weight: {v1}
        - destination: {{service: ratings, subset: v2}}
          weight: {v2}
"
    )
}

// ---------------------------------------------------------------------------
// 1. apply the Bookinfo example, apply again, read it back
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_bookinfo_then_unchanged_and_get_round_trips() -> Result<()> {
    let dir = bookinfo_dir();
    ensure!(dir.is_dir(), "{} is missing", dir.display());
    let dir_arg = path_str(&dir)?;
    let source = parse_dir(&dir)?;
    ensure!(
        source.len() >= 10,
        "bookinfo has only {} resources",
        source.len()
    );
    let mut want_created: Vec<String> = source
        .iter()
        .map(|r| format!("{} created", r.display_name()))
        .collect();
    want_created.sort();

    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // A dry run says what would happen and changes nothing.
    let run = ctl.run(&["apply", "-f", dir_arg, "--dry-run"]).await?;
    run.expect_ok()?;
    ensure!(
        lines(&run)
            .iter()
            .all(|l| l.ends_with(" created (dry run)")),
        "{run}"
    );
    ctl.run(&["get", "svc", "ratings"]).await?.expect_code(3)?;

    // Every resource created, one line each, nothing else on stdout.
    let run = ctl.run(&["apply", "-f", dir_arg]).await?;
    run.expect_ok()?;
    let mut got = lines(&run);
    got.sort();
    ensure!(
        got == want_created,
        "apply printed {got:?}, expected {want_created:?}; {run}"
    );

    // Again: every resource unchanged, no new revision.
    let run = ctl.run(&["apply", "-f", dir_arg]).await?;
    run.expect_ok()?;
    let got = lines(&run);
    ensure!(
        got.len() == source.len() && got.iter().all(|l| l.ends_with(" unchanged")),
        "second apply: {run}"
    );
    let run = ctl.run(&["apply", "-f", dir_arg, "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(
        u64_field(&doc, "revision")? == 0,
        "nothing changed yet a revision: {run}"
    );
    let results = array_field(&doc, "results")?;
    ensure!(results.len() == source.len(), "{run}");
    for r in results {
        ensure!(str_field(r, "action")? == "unchanged", "{r}");
        ensure!(u64_field(r, "mod_revision")? > 0, "{r}");
        str_field(r, "kind")?;
        str_field(r, "namespace")?;
        str_field(r, "name")?;
    }

    // `get KIND -o yaml` parses back into exactly the source documents,
    // for every kind (list order: namespace, then name).
    for kind in Kind::ALL {
        let mut want: Vec<Resource> = source
            .iter()
            .filter(|r| r.kind() == kind)
            .cloned()
            .collect();
        want.sort_by_key(Resource::key);
        let run = ctl.run(&["get", kind.key_segment(), "-o", "yaml"]).await?;
        run.expect_ok()?;
        let got = parse_output(&run)?;
        ensure!(got == want, "{kind}: get -o yaml round trip differs; {run}");
    }
    // Plural and short names too.
    let run = ctl.run(&["get", "routes", "-o", "yaml"]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout().matches("kind: Route\n").count() == 3,
        "three Routes expected; {run}"
    );

    // One resource as JSON: the document itself.
    let reviews = source
        .iter()
        .find(|r| r.kind() == Kind::Route && r.metadata.name == "reviews")
        .context("bookinfo has no Route reviews")?;
    let run = ctl.run(&["get", "rt", "reviews", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(str_field(&doc, "kind")? == "Route", "{run}");
    let parsed = Resource::from_json(&run.stdout)
        .map_err(|e| anyhow::anyhow!("get -o json is not a document: {e}; {run}"))?;
    ensure!(
        &parsed == reviews,
        "get rt reviews -o json differs from the file; {run}"
    );
    // Several as JSON: an array of documents.
    let run = ctl.run(&["get", "svc", "-o", "json"]).await?;
    run.expect_ok()?;
    let services = run.json()?;
    let services = services
        .as_array()
        .context("get svc -o json is not an array")?;
    ensure!(services.len() == 4, "{run}");

    // Tables: NAME, kind columns, REVISION; NAMESPACE only with -A.
    let run = ctl.run(&["get", "routes"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NAME")?;
    let names: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.first().map(String::as_str))
        .collect();
    ensure!(names == ["details", "ratings", "reviews"], "{run}");
    ensure!(
        run.stdout()
            .lines()
            .next()
            .is_some_and(|h| h.contains("HOSTS") && h.contains("REVISION")),
        "{run}"
    );
    ensure!(
        rows.iter().all(|r| r.get(1) == r.first()),
        "HOSTS column; {run}"
    );
    let run = ctl.run(&["get", "rt", "-A"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NAMESPACE")?;
    ensure!(
        rows.len() == 3 && rows.iter().all(|r| r[0] == "default"),
        "{run}"
    );
    let run = ctl.run(&["get", "dp", "reviews"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NAME")?;
    ensure!(
        rows == [vec![
            "reviews",
            "reviews",
            "v1,v2,v3",
            "leastRequest",
            &cell(&rows, 0, 4)
        ]],
        "{run}"
    );
    // Another namespace is empty; a missing name is exit 3.
    let run = ctl.run(&["get", "rt", "-n", "other"]).await?;
    run.expect_ok()?;
    ensure!(run.stdout.is_empty(), "{run}");
    ctl.run(&["get", "rt", "nope"])
        .await?
        .expect_code(3)?
        .expect_stderr("not found")?;
    // YAML output is for `get KIND` only.
    ctl.run(&["lease", "list", "-o", "yaml"])
        .await?
        .expect_code(2)?
        .expect_stderr("-o yaml")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. invalid documents: every problem reported, nothing applied
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_reported_and_change_nothing() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;

    let base = tmp.path().join("base");
    write(&base, "a-ratings.yaml", RATINGS_SERVICE)?;
    write(&base, "b-route.yaml", &ratings_route("ratings", 90, 10))?;
    ctl.run(&["apply", "-f", path_str(&base)?])
        .await?
        .expect_ok()?;
    let before = ctl.run(&["get", "routes", "-o", "json"]).await?;
    before.expect_ok()?;

    // A directory with a good file (a new Service, a changed Route) and a
    // broken one: weights summing to 99 in one document, an unknown field
    // in the next.
    let set = tmp.path().join("set");
    write(
        &set,
        "a-good.yaml",
        &format!(
            "apiVersion: trellis/v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  ports: [{{name: http, port: 80, protocol: http}}]\n---\n{}",
            ratings_route("ratings", 50, 50)
        ),
    )?;
    let broken = format!(
        "{}---\napiVersion: trellis/v1\nkind: Route\nmetadata: {{name: typo}}\nspec:\n  hosts: [web]\n  http:\n    - rout:\n        - destination: {{service: web}}\n",
        ratings_route("ratings-split", 90, 9)
    );
    let typo_line = broken
        .lines()
        .position(|l| l == "    - rout:")
        .context("no typo line")?
        + 1;
    write(&set, "broken.yaml", &broken)?;
    let run = ctl.run(&["apply", "-f", path_str(&set)?]).await?;
    run.expect_code(2)?
        // weights: file, resource, field path, problem
        .expect_stderr("broken.yaml: Route default/ratings-split: spec.http[0].route: weights sum to 99, expected 100")?
        // unknown field: file with line and column, field path, problem
        .expect_stderr(&format!("broken.yaml:{typo_line}:7: "))?
        .expect_stderr("spec.http[0]: unknown field `rout`")?;
    ensure!(run.stdout.is_empty(), "{run}");
    ensure!(
        !run.stderr.contains("a-good.yaml"),
        "the good file was blamed; {run}"
    );

    // Nothing of the set was applied: not the new Service, not the Route change.
    ctl.run(&["get", "svc", "web"]).await?.expect_code(3)?;
    let after = ctl.run(&["get", "routes", "-o", "json"]).await?;
    after.expect_ok()?;
    ensure!(
        after.stdout == before.stdout,
        "the store changed: {before} vs {after}"
    );
    let run = ctl.run(&["get", "routes"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NAME")?;
    ensure!(rows.len() == 1 && rows[0][0] == "ratings", "{run}");

    // `delete -f` parses the files itself: the same problems, exit 2.
    ctl.run(&["delete", "-f", path_str(&set)?])
        .await?
        .expect_code(2)?
        .expect_stderr("weights sum to 99")?
        .expect_stderr("unknown field `rout`")?;

    // Paths: a missing one and an empty directory are usage errors.
    ctl.run(&["apply", "-f", path_str(&tmp.path().join("missing.yaml"))?])
        .await?
        .expect_code(2)?
        .expect_stderr("missing.yaml")?;
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty)?;
    ctl.run(&["apply", "-f", path_str(&empty)?])
        .await?
        .expect_code(2)?
        .expect_stderr("no *.yaml")?;

    // -R reads subdirectories; without it they are skipped.
    let tree = tmp.path().join("tree");
    write(&tree, "top.yaml", "apiVersion: trellis/v1\nkind: Service\nmetadata: {name: top}\nspec:\n  ports: [{name: http, port: 80, protocol: http}]\n")?;
    write(
        &tree,
        "sub/deep.json",
        r#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"deep"},"spec":{"ports":[{"name":"http","port":80,"protocol":"http"}]}}"#,
    )?;
    write(&tree, "sub/notes.txt", "not a document")?;
    let run = ctl
        .run(&["apply", "-f", path_str(&tree)?, "--dry-run"])
        .await?;
    run.expect_ok()?;
    ensure!(
        lines(&run) == ["Service default/top created (dry run)"],
        "{run}"
    );
    let run = ctl.run(&["apply", "-R", "-f", path_str(&tree)?]).await?;
    run.expect_ok()?;
    ensure!(
        lines(&run)
            == [
                "Service default/deep created",
                "Service default/top created"
            ]
            || lines(&run)
                == [
                    "Service default/top created",
                    "Service default/deep created"
                ],
        "{run}"
    );

    // Standard input, named `-` in messages.
    let run = ctl
        .run_with_stdin(
            &["apply", "-f", "-"],
            b"apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: q}\nspec: {maxAmount: 0, validDuration: 1s}\n",
        )
        .await?;
    run.expect_code(2)?
        .expect_stderr("-: Quota default/q: spec.maxAmount")?;
    let run = ctl
        .run_with_stdin(
            &["apply", "-f", "-"],
            b"apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: q}\nspec: {maxAmount: 10, validDuration: 1s}\n",
        )
        .await?;
    run.expect_ok()?;
    ensure!(lines(&run) == ["Quota default/q created"], "{run}");
    let run = ctl.run(&["get", "quota"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NAME")?;
    ensure!(
        rows == [vec!["q", "10", "1s", "0", &cell(&rows, 0, 4)]],
        "{run}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. diff, and --expected-revision
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_exits_1_on_changes_and_0_without() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;
    let services = write(tmp.path(), "services.yaml", RATINGS_SERVICE)?;
    let route = write(tmp.path(), "route.yaml", &ratings_route("ratings", 90, 10))?;
    let services = path_str(&services)?;
    let route = path_str(&route)?;

    // Before anything exists: everything is new, shown as added lines.
    let run = ctl.run(&["diff", "-f", route, "-f", services]).await?;
    run.expect_code(1)?;
    let text = run.stdout();
    ensure!(text.contains("--- current Route default/ratings"), "{run}");
    ensure!(text.contains("+++ applied Route default/ratings"), "{run}");
    ensure!(text.contains("@@ -0,0 +1,"), "{run}");
    ensure!(
        text.lines()
            .filter(|l| !l.starts_with("---") && !l.starts_with("+++") && !l.starts_with("@@"))
            .all(|l| l.starts_with('+')),
        "a created resource must be all additions; {run}"
    );
    ctl.run(&["get", "rt", "ratings"]).await?.expect_code(3)?;

    let run = ctl
        .run(&["apply", "-f", services, "-f", route, "-o", "json"])
        .await?;
    run.expect_ok()?;
    let applied_at = u64_field(&run.json()?, "revision")?;
    ensure!(applied_at > 0, "{run}");

    // Unchanged set: exit 0, no output.
    let run = ctl.run(&["diff", "-f", services, "-f", route]).await?;
    run.expect_ok()?;
    ensure!(run.stdout.is_empty(), "{run}");

    // A modified Route: exit 1, the changed lines as -/+ with context.
    let modified = write(
        tmp.path(),
        "modified/route.yaml",
        &ratings_route("ratings", 80, 20),
    )?;
    let modified = path_str(&modified)?;
    let run = ctl.run(&["diff", "-f", services, "-f", modified]).await?;
    run.expect_code(1)?;
    let text = run.stdout();
    ensure!(
        text.starts_with(
            "--- current Route default/ratings\n+++ applied Route default/ratings\n@@ -"
        ),
        "{run}"
    );
    ensure!(
        text.contains("\n-      weight: 90\n+      weight: 80\n"),
        "{run}"
    );
    ensure!(
        text.contains("\n-      weight: 10\n+      weight: 20\n"),
        "{run}"
    );
    ensure!(
        !text.contains("Service"),
        "unchanged resources have no diff; {run}"
    );
    let run = ctl.run(&["diff", "-f", modified, "-o", "json"]).await?;
    run.expect_code(1)?;
    let doc = run.json()?;
    ensure!(doc.get("changed") == Some(&Value::Bool(true)), "{run}");
    let results = array_field(&doc, "results")?;
    ensure!(
        results.len() == 1 && str_field(&results[0], "action")? == "configured",
        "{run}"
    );
    ensure!(
        str_field(&results[0], "diff")?.contains("+      weight: 80"),
        "{run}"
    );
    // diff applied nothing.
    let run = ctl.run(&["get", "rt", "ratings", "-o", "yaml"]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout().contains("weight: 90"),
        "diff changed the store; {run}"
    );

    // An invalid document: exit 2, not 1.
    let bad = write(
        tmp.path(),
        "bad/route.yaml",
        &ratings_route("ratings", 80, 19),
    )?;
    ctl.run(&["diff", "-f", path_str(&bad)?])
        .await?
        .expect_code(2)?
        .expect_stderr("weights sum to 99")?;

    // --expected-revision: older than the Route's change → conflict (4),
    // nothing applied; the current revision → applied.
    ctl.run(&[
        "apply",
        "-f",
        modified,
        "--expected-revision",
        &(applied_at - 1).to_string(),
    ])
    .await?
    .expect_code(4)?
    .expect_stderr("Route default/ratings")?;
    let run = ctl
        .run(&[
            "apply",
            "-f",
            modified,
            "--expected-revision",
            &applied_at.to_string(),
        ])
        .await?;
    run.expect_ok()?;
    ensure!(lines(&run) == ["Route default/ratings configured"], "{run}");
    let run = ctl.run(&["diff", "-f", modified]).await?;
    run.expect_ok()?;
    ensure!(run.stdout.is_empty(), "{run}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. delete and watch
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_watch_resources() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;

    // From revision 1 every event is replayed, so the watchers may open
    // before or after the writes below.
    let mut table_watch = ctl.spawn(&["watch", "routes", "--rev", "1"])?;
    let mut json_watch = ctl.spawn(&["watch", "rt", "-A", "--rev", "1", "-o", "json"])?;

    let services = write(tmp.path(), "services.yaml", RATINGS_SERVICE)?;
    let v1 = write(
        tmp.path(),
        "v1/route.yaml",
        &ratings_route("ratings", 90, 10),
    )?;
    let v2 = write(
        tmp.path(),
        "v2/route.yaml",
        &ratings_route("ratings", 50, 50),
    )?;
    ctl.run(&["apply", "-f", path_str(&services)?, "-f", path_str(&v1)?])
        .await?
        .expect_ok()?;
    ctl.run(&["apply", "-f", path_str(&v2)?])
        .await?
        .expect_ok()?;
    // Raw writes under a kind's prefix are refused (resources are
    // validated documents), so the watch sees only resource events.
    ctl.run(&["kv", "put", "/route/default/raw", "x"])
        .await?
        .expect_code(2)?
        .expect_stderr("apply")?;
    let run = ctl
        .run(&["delete", "route", "ratings", "-o", "json"])
        .await?;
    run.expect_ok()?;
    let deleted_at = u64_field(&run.json()?, "revision")?;
    ctl.run(&["delete", "route", "ratings"])
        .await?
        .expect_code(3)?
        .expect_stderr("not found")?;
    ctl.run(&["delete", "route", "ratings", "--ignore-not-found"])
        .await?
        .expect_ok()?;

    let deadline = Instant::now() + WATCH_TIMEOUT;
    let mut revisions = Vec::new();
    for want in ["ADDED", "MODIFIED", "DELETED"] {
        let line = table_watch.next_line(deadline).await?;
        let prefix = format!("{want} Route default/ratings (revision ");
        let rev = line
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.parse::<u64>().ok())
            .with_context(|| format!("expected {prefix}N), got {line:?}"))?;
        revisions.push(rev);
    }
    ensure!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    ensure!(
        revisions[2] == deleted_at,
        "{revisions:?} vs delete at {deleted_at}"
    );
    for (want, rev) in ["ADDED", "MODIFIED", "DELETED"].iter().zip(&revisions) {
        let line = json_watch.next_line(deadline).await?;
        let event: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        ensure!(str_field(&event, "type")? == *want, "{line}");
        ensure!(str_field(&event, "kind")? == "Route", "{line}");
        ensure!(str_field(&event, "namespace")? == "default", "{line}");
        ensure!(str_field(&event, "name")? == "ratings", "{line}");
        ensure!(u64_field(&event, "revision")? == *rev, "{line}");
        let has_object = event.get("object").is_some();
        ensure!(has_object == (*want != "DELETED"), "{line}");
    }
    if let Some(object) = json_watch.seen.get(1) {
        ensure!(
            object.contains("\"weight\":50"),
            "MODIFIED carries the new document: {object}"
        );
    }
    ensure!(
        table_watch.is_running() && json_watch.is_running(),
        "a watcher exited"
    );
    table_watch.stop().await;
    json_watch.stop().await;

    // delete -f: the resources named in the files; a missing one → exit 3
    // after the others were deleted.
    ctl.run(&["apply", "-f", path_str(&v1)?])
        .await?
        .expect_ok()?;
    let run = ctl
        .run(&["delete", "-f", path_str(&services)?, "-f", path_str(&v1)?])
        .await?;
    run.expect_ok()?;
    let mut got = lines(&run);
    got.sort();
    ensure!(
        got == [
            "DestinationPolicy default/ratings deleted",
            "Route default/ratings deleted",
            "Service default/ratings deleted"
        ],
        "{run}"
    );
    let run = ctl.run(&["delete", "-f", path_str(&v1)?]).await?;
    run.expect_code(3)?.expect_stderr("Route default/ratings")?;
    ctl.run(&["delete", "-f", path_str(&v1)?, "--ignore-not-found"])
        .await?
        .expect_ok()?;
    let run = ctl.run(&["get", "rt", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(run.json()? == Value::Array(Vec::new()), "{run}");
    ctl.run(&["delete", "route"])
        .await?
        .expect_code(2)?
        .expect_stderr("NAME")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. leases
// ---------------------------------------------------------------------------

const INSTANCE: &str = "\
apiVersion: trellis/v1
kind: Instance
metadata: {name: ratings-1}
spec: {service: ratings, address: 10.0.0.7, port: 9080, labels: {version: v1}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_grant_attach_keepalive_revoke() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let tmp = tempfile::tempdir()?;
    let instance = write(tmp.path(), "instance.yaml", INSTANCE)?;
    let instance = path_str(&instance)?;

    // grant prints just the id.
    let run = ctl.run(&["lease", "grant", "2s"]).await?;
    run.expect_ok()?;
    let id: u64 = run
        .stdout()
        .trim()
        .parse()
        .with_context(|| format!("grant did not print an id; {run}"))?;
    let id_text = id.to_string();

    // Keep it alive in the background (every TTL/3) and attach an instance.
    let mut keepalive = ctl.spawn(&["lease", "keepalive", &id_text])?;
    let deadline = Instant::now() + WATCH_TIMEOUT;
    let line = keepalive.next_line(deadline).await?;
    ensure!(line == format!("lease {id} kept alive (TTL 2s)"), "{line}");
    let run = ctl
        .run(&["apply", "-f", instance, "--lease", &id_text])
        .await?;
    run.expect_ok()?;
    ensure!(
        lines(&run) == ["Instance default/ratings-1 created"],
        "{run}"
    );

    // Longer than the TTL: the keepalives hold the lease and the instance.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let run = ctl.run(&["lease", "list"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("ID")?;
    let row = rows
        .iter()
        .find(|r| r.first() == Some(&id_text))
        .with_context(|| format!("lease {id} not listed; {run}"))?;
    ensure!(row.get(1).map(String::as_str) == Some("2s"), "{run}");
    ensure!(
        row.get(3).map(String::as_str) == Some("/instance/default/ratings-1"),
        "{run}"
    );
    let run = ctl.run(&["lease", "list", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    let lease = array_field(&doc, "leases")?
        .iter()
        .find(|l| l.get("id").and_then(Value::as_u64) == Some(id))
        .with_context(|| format!("lease {id} not in JSON; {run}"))?;
    ensure!(u64_field(lease, "ttl_ms")? == 2000, "{run}");
    ensure!(u64_field(lease, "remaining_ms")? <= 2000, "{run}");
    ensure!(
        array_field(lease, "keys")? == &vec![Value::from("/instance/default/ratings-1")],
        "{run}"
    );
    let run = ctl.run(&["get", "inst"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NAME")?;
    ensure!(
        rows == [vec![
            "ratings-1",
            "ratings",
            "10.0.0.7",
            "9080",
            "healthy",
            &id_text,
            &cell(&rows, 0, 6)
        ]],
        "{run}"
    );
    ctl.run(&["lease", "keepalive", &id_text, "--once"])
        .await?
        .expect_ok()?;
    ensure!(keepalive.is_running(), "keepalive exited");

    // Revoke: the instance goes with the lease, and the running keepalive
    // ends with exit 3.
    let run = ctl.run(&["lease", "revoke", &id_text]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout() == format!("lease {id} revoked (1 key deleted)\n"),
        "{run}"
    );
    ctl.run(&["get", "inst", "ratings-1"])
        .await?
        .expect_code(3)?;
    let status = tokio::time::timeout(WATCH_TIMEOUT, keepalive.child.wait())
        .await
        .context("keepalive did not exit after the revoke")??;
    ensure!(status.code() == Some(3), "keepalive exited with {status}");
    ctl.run(&["lease", "revoke", &id_text])
        .await?
        .expect_code(3)?;
    ctl.run(&["lease", "keepalive", &id_text, "--once"])
        .await?
        .expect_code(3)?
        .expect_stderr("not found")?;

    // Without keepalives a lease expires and takes its instance along.
    let run = ctl.run(&["lease", "grant", "1s", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(u64_field(&doc, "ttl_ms")? == 1000, "{run}");
    let short = u64_field(&doc, "id")?.to_string();
    ctl.run(&["apply", "-f", instance, "--lease", &short])
        .await?
        .expect_ok()?;
    let deadline = Instant::now() + WATCH_TIMEOUT;
    loop {
        let run = ctl.run(&["get", "inst", "ratings-1"]).await?;
        if run.code == Some(3) {
            break;
        }
        run.expect_ok()?;
        if Instant::now() >= deadline {
            bail!("the instance outlived its 1s lease by {WATCH_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Bad TTLs: usage errors.
    ctl.run(&["lease", "grant", "500ms"])
        .await?
        .expect_code(2)?;
    ctl.run(&["lease", "grant", "ten"]).await?.expect_code(2)?;
    ctl.run(&["lease", "keepalive", "0"])
        .await?
        .expect_code(2)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. the raw key forms keep working
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_key_forms_and_the_kv_group() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // `get KEY` / `delete KEY` / `watch PREFIX` as before.
    ctl.run(&["put", "/some/key", "value"]).await?.expect_ok()?;
    let run = ctl.run(&["get", "/some/key"]).await?;
    run.expect_ok()?;
    ensure!(run.stdout == b"value\n", "{run}");
    let run = ctl.run(&["get", "/some/key", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(str_field(&run.json()?, "value")? == "value", "{run}");
    // Resource flags on a key: usage error naming the rule.
    ctl.run(&["get", "/some/key", "-n", "x"])
        .await?
        .expect_code(2)?
        .expect_stderr("not a resource kind")?;
    ctl.run(&["get", "/some/key", "-o", "yaml"])
        .await?
        .expect_code(2)?;

    // A key that is also a kind name: only through `kv`.
    ctl.run(&["kv", "put", "routes", "raw"])
        .await?
        .expect_ok()?;
    let run = ctl.run(&["kv", "get", "routes"]).await?;
    run.expect_ok()?;
    ensure!(run.stdout == b"raw\n", "{run}");
    let run = ctl.run(&["get", "routes"]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout.is_empty(),
        "`get routes` must be the resource form; {run}"
    );
    let run = ctl.run(&["kv", "list", "routes", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(u64_field(&run.json()?, "count")? == 1, "{run}");
    ctl.run(&["kv", "delete", "routes"]).await?.expect_ok()?;
    ctl.run(&["kv", "get", "routes"]).await?.expect_code(3)?;
    // A mistyped kind is a missing key, with a hint.
    ctl.run(&["get", "rotues"])
        .await?
        .expect_code(3)?
        .expect_stderr("not a resource kind either")?;

    let mut watch = ctl.spawn(&["watch", "/some/", "--rev", "1"])?;
    let mut kv_watch = ctl.spawn(&["kv", "watch", "/some/", "--rev", "1"])?;
    let run = ctl.run(&["delete", "/some/key"]).await?;
    run.expect_ok()?;
    ensure!(run.stdout().starts_with("deleted revision="), "{run}");
    ctl.run(&["kv", "del", "/some/key"]).await?.expect_code(3)?;
    let deadline = Instant::now() + WATCH_TIMEOUT;
    for w in [&mut watch, &mut kv_watch] {
        let put = w.next_line(deadline).await?;
        ensure!(
            put.starts_with("PUT /some/key rev=") && put.ends_with(" value"),
            "{put}"
        );
        let del = w.next_line(deadline).await?;
        ensure!(del.starts_with("DELETE /some/key rev="), "{del}");
        w.stop().await;
    }
    let run = ctl.run(&["kv", "compact", "1"]).await?;
    run.expect_ok()?;
    Ok(())
}
