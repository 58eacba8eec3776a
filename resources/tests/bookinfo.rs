//! The example mesh in deploy/examples/bookinfo parses, validates and has
//! consistent references — both as applied (the directory) and with the
//! A/B alternative in place of the canary.

use std::path::{Path, PathBuf};

use trellis_resources::{check_references, parse_documents, Kind, Resource, Spec};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/bookinfo")
}

/// Every .yaml file directly in `dir`, sorted, parsed.
fn load(dir: &Path) -> Vec<(String, Resource)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("deploy/examples/bookinfo is readable")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut out = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&f).expect("example file is UTF-8");
        let resources = parse_documents(&name, &text).unwrap_or_else(|errs| {
            panic!(
                "{}",
                errs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(!resources.is_empty(), "{name} has no documents");
        out.extend(resources.into_iter().map(|r| (name.clone(), r)));
    }
    out
}

fn no_store(_: Kind, _: &str, _: &str) -> Option<Resource> {
    None
}

fn render(set: &[(String, Resource)]) -> Vec<String> {
    check_references(set, &no_store)
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn the_directory_is_a_consistent_mesh() {
    let set = load(&dir());
    let names: Vec<String> = set.iter().map(|(_, r)| r.display_name()).collect();
    for want in [
        "Service default/productpage",
        "Service default/details",
        "Service default/reviews",
        "Service default/ratings",
        "DestinationPolicy default/productpage",
        "DestinationPolicy default/details",
        "DestinationPolicy default/reviews",
        "DestinationPolicy default/ratings",
        "Route default/reviews",
        "Route default/ratings",
        "Route default/details",
        "Quota default/request-count",
        "AccessPolicy default/ratings-deny-reviews-v3",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    assert_eq!(render(&set), Vec::<String>::new());

    // No two resources share a key, and only one Route claims each host.
    let mut keys: Vec<String> = set.iter().map(|(_, r)| r.key()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), set.len());
    let mut hosts: Vec<&String> = set
        .iter()
        .filter_map(|(_, r)| match &r.spec {
            Spec::Route(rt) => Some(&rt.hosts),
            _ => None,
        })
        .flatten()
        .collect();
    let n = hosts.len();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), n, "two Routes claim one host");

    // The canary is 90/10.
    let canary = set
        .iter()
        .find(|(f, _)| f == "reviews-canary.yaml")
        .map(|(_, r)| r)
        .unwrap();
    let Spec::Route(rt) = &canary.spec else {
        panic!()
    };
    let weights: Vec<(Option<&str>, u32)> = rt.http[0]
        .route
        .iter()
        .map(|w| (w.destination.subset.as_deref(), w.effective_weight()))
        .collect();
    assert_eq!(weights, [(Some("v1"), 90), (Some("v2"), 10)]);
}

#[test]
fn the_ab_alternative_replaces_the_canary_consistently() {
    let alternatives = load(&dir().join("alternatives"));
    assert_eq!(alternatives.len(), 1);
    assert_eq!(alternatives[0].1.display_name(), "Route default/reviews-ab");
    let mut set: Vec<(String, Resource)> = load(&dir())
        .into_iter()
        .filter(|(f, _)| f != "reviews-canary.yaml")
        .collect();
    set.extend(alternatives);
    assert_eq!(render(&set), Vec::<String>::new());
}

#[test]
fn references_fail_without_the_policies() {
    // The same files minus destination-policies.yaml: every subset use is
    // reported, which shows the check above is not vacuous.
    let set: Vec<(String, Resource)> = load(&dir())
        .into_iter()
        .filter(|(f, _)| f != "destination-policies.yaml")
        .collect();
    let errors = render(&set);
    assert_eq!(
        errors,
        [
            "ratings-fault.yaml: Route default/ratings: spec.http[0].route[0].destination.subset: no DestinationPolicy for service \"ratings\" defines subsets",
            "ratings-fault.yaml: Route default/ratings: spec.http[1].route[0].destination.subset: no DestinationPolicy for service \"ratings\" defines subsets",
            "reviews-canary.yaml: Route default/reviews: spec.http[0].route[0].destination.subset: no DestinationPolicy for service \"reviews\" defines subsets",
            "reviews-canary.yaml: Route default/reviews: spec.http[0].route[1].destination.subset: no DestinationPolicy for service \"reviews\" defines subsets",
        ]
    );
}
