//! Broken documents and the exact errors they produce.

use trellis_resources::{check_references, parse_documents, Kind, Resource, MAX_DOCUMENT_BYTES};

/// Parses `text` as `source` and renders every error, one per line.
fn errors(source: &str, text: &str) -> String {
    match parse_documents(source, text) {
        Ok(r) => panic!("expected errors, parsed {} resources", r.len()),
        Err(errs) => errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

const ROUTE_HEAD: &str =
    "apiVersion: trellis/v1\nkind: Route\nmetadata:\n  name: ratings\nspec:\n  hosts: [ratings]\n";

fn route(http: &str) -> String {
    format!("{ROUTE_HEAD}  http:\n{http}")
}

const POLICY_HEAD: &str =
    "apiVersion: trellis/v1\nkind: DestinationPolicy\nmetadata:\n  name: reviews\nspec:\n  host: reviews\n";

#[test]
fn table_of_broken_documents() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "weights sum to 99",
            route(
                "    - route:\n        - destination: {service: ratings, subset: v1}\n          weight: 90\n        - destination: {service: ratings, subset: v2}\n          weight: 9\n",
            ),
            "route.yaml: Route default/ratings: spec.http[0].route: weights sum to 99, expected 100",
        ),
        (
            "unknown field, with line and column",
            route("    - rout:\n        - destination: {service: ratings}\n"),
            "route.yaml:8:7: spec.http[0]: unknown field `rout`, expected one of `name`, `match`, `route`, `degrade`, `timeout`, `retries`, `fault`, `mirror`, `headers`",
        ),
        (
            "wrong type",
            format!("{ROUTE_HEAD}  http: yes\n"),
            "route.yaml:7:9: spec.http: invalid type: string \"yes\", expected a sequence",
        ),
        (
            "out-of-range number",
            "apiVersion: trellis/v1\nkind: Service\nmetadata:\n  name: big\nspec:\n  ports:\n    - {name: http, port: 70000, protocol: http}\n".to_string(),
            "route.yaml:7:26: spec.ports[0].port: invalid value: integer `70000`, expected u16",
        ),
        (
            "out-of-range weight",
            route("    - route:\n        - destination: {service: ratings}\n          weight: 101\n"),
            "route.yaml: Route default/ratings: spec.http[0].route[0].weight: must be in 0..=100, got 101",
        ),
        (
            "bad regex",
            route("    - match:\n        - path: {regex: \"/api/(v1\"}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml: Route default/ratings: spec.http[0].match[0].path.regex: invalid regex \"/api/(v1\": unclosed group",
        ),
        (
            "bad duration",
            route("    - timeout: 1.5s\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml:8:16: spec.http[0].timeout: invalid duration \"1.5s\": fractions are not supported; use a smaller unit (e.g. 1500ms instead of 1.5s)",
        ),
        (
            "duration without unit",
            route("    - timeout: 15\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml:8:16: spec.http[0].timeout: invalid duration \"15\": missing unit (ms, s, m, h)",
        ),
        (
            "bad name",
            "apiVersion: trellis/v1\nkind: Quota\nmetadata:\n  name: Request_Count\n  namespace: prod\nspec:\n  maxAmount: 1\n  validDuration: 1s\n".to_string(),
            "route.yaml: Quota prod/Request_Count: metadata.name: invalid name \"Request_Count\": must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)",
        ),
        (
            "missing spec",
            "apiVersion: trellis/v1\nkind: Service\nmetadata:\n  name: details\n".to_string(),
            "route.yaml:1:1: missing field `spec`",
        ),
        (
            "wrong apiVersion",
            "# comment\napiVersion: trellis/v2\nkind: Service\nmetadata: {name: a}\nspec: {ports: []}\n".to_string(),
            "route.yaml:2: apiVersion: unsupported apiVersion \"trellis/v2\", expected \"trellis/v1\"",
        ),
        (
            "unknown kind",
            "apiVersion: trellis/v1\nkind: route\nmetadata: {name: a}\nspec: {}\n".to_string(),
            "route.yaml:2: kind: unknown kind \"route\", expected one of Service, Instance, Route, DestinationPolicy, Quota, AccessPolicy (did you mean Route?)",
        ),
        (
            "consistentHash without hashHeader",
            format!("{POLICY_HEAD}  loadBalancer:\n    policy: consistentHash\n"),
            "route.yaml: DestinationPolicy default/reviews: spec.loadBalancer.hashHeader: required when policy is consistentHash",
        ),
        (
            "perTryTimeout longer than the timeout",
            route("    - timeout: 2s\n      retries: {attempts: 2, perTryTimeout: 3s}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml: Route default/ratings: spec.http[0].retries.perTryTimeout: 3s exceeds the rule's timeout of 2s",
        ),
        (
            "perTryTimeout longer than the default timeout",
            route("    - retries: {attempts: 2, perTryTimeout: 1m}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml: Route default/ratings: spec.http[0].retries.perTryTimeout: 1m exceeds the rule's timeout of 15s",
        ),
        (
            "fault abort with both statuses",
            route("    - fault:\n        abort: {percent: 10, httpStatus: 503, grpcStatus: UNAVAILABLE}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml: Route default/ratings: spec.http[0].fault.abort: exactly one of `httpStatus` or `grpcStatus` must be set, found both",
        ),
        (
            "route and degrade",
            route("    - degrade: {}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml: Route default/ratings: spec.http[0]: exactly one of `route` or `degrade` must be set, found both",
        ),
        (
            "string match with two operators",
            route("    - match:\n        - path: {exact: /a, prefix: /b}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml:9:17: spec.http[0].match[0].path: exactly one of `exact`, `prefix` or `regex` must be set, found `exact` and `prefix`",
        ),
        (
            "unknown gRPC status",
            route("    - fault:\n        abort: {percent: 10, grpcStatus: 17}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml:9:42: spec.http[0].fault.abort.grpcStatus: unknown gRPC status 17, expected a code 1..=16 or a name like UNAVAILABLE",
        ),
        (
            "several problems in one document are all reported",
            route("    - timeout: 0s\n      fault: {}\n      route:\n        - destination: {service: Ratings, port: 0}\n"),
            "route.yaml: Route default/ratings: spec.http[0].route[0].destination.service: invalid service \"Ratings\": must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)\n\
             route.yaml: Route default/ratings: spec.http[0].route[0].destination.port: port must be in 1..=65535, got 0\n\
             route.yaml: Route default/ratings: spec.http[0].timeout: must be greater than 0s\n\
             route.yaml: Route default/ratings: spec.http[0].fault: at least one of `delay` or `abort` is required",
        ),
        (
            "YAML syntax error",
            "apiVersion: trellis/v1\nkind: Service\nmetadata:\n  name: a\n spec: {}\n".to_string(),
            "route.yaml:5:2: did not find expected key, while parsing a block mapping",
        ),
        (
            "not a mapping",
            "just a string\n".to_string(),
            "route.yaml:1:1: invalid type: string \"just a string\", expected a resource document (a mapping with apiVersion, kind, metadata and spec)",
        ),
        (
            "quota override duplicates and shadowing",
            "apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: q}\nspec:\n  maxAmount: 10\n  validDuration: 1s\n  overrides:\n    - {dimensions: {destination: ratings}, maxAmount: 5}\n    - {dimensions: {destination: ratings}, maxAmount: 1}\n    - {dimensions: {destination: ratings, source: reviews}, maxAmount: 1}\n    - {dimensions: {}, maxAmount: 1}\n".to_string(),
            "route.yaml: Quota default/q: spec.overrides[1].dimensions: same dimensions as spec.overrides[0]\n\
             route.yaml: Quota default/q: spec.overrides[2].dimensions: never applies: spec.overrides[0] matches every request this one does and comes first (list more specific overrides first)\n\
             route.yaml: Quota default/q: spec.overrides[3].dimensions: at least one dimension is required",
        ),
        (
            "health check timeout not below interval",
            format!("{POLICY_HEAD}  healthCheck:\n    http: {{path: health}}\n    interval: 1s\n    timeout: 1s\n"),
            "route.yaml: DestinationPolicy default/reviews: spec.healthCheck.http.path: must start with \"/\", got \"health\"\n\
             route.yaml: DestinationPolicy default/reviews: spec.healthCheck.timeout: must be shorter than the interval (1s), got 1s",
        ),
        (
            "locality failover to itself",
            format!("{POLICY_HEAD}  locality:\n    failover:\n      - {{from: a, to: [b, a]}}\n      - {{from: a, to: [c]}}\n"),
            "route.yaml: DestinationPolicy default/reviews: spec.locality.failover[0].to[1]: zone \"a\" cannot fail over to itself\n\
             route.yaml: DestinationPolicy default/reviews: spec.locality.failover[1].from: zone \"a\" already has failover at spec.locality.failover[0]",
        ),
        (
            "locality shift and min healthy",
            format!("{POLICY_HEAD}  locality:\n    minHealthyPercent: 0\n    shift:\n      - {{from: a, to: a}}\n      - {{from: b, to: a}}\n      - {{from: b, to: c}}\n"),
            "route.yaml: DestinationPolicy default/reviews: spec.locality.minHealthyPercent: must be in 1..=100, got 0\n\
             route.yaml: DestinationPolicy default/reviews: spec.locality.shift[0].to: zone \"a\" cannot shift to itself\n\
             route.yaml: DestinationPolicy default/reviews: spec.locality.shift[1].to: zone \"a\" is itself shifted away\n\
             route.yaml: DestinationPolicy default/reviews: spec.locality.shift[2].from: zone \"b\" is already shifted at spec.locality.shift[1]",
        ),
        (
            "outlier max ejection time below base, backup min delay zero",
            format!("{POLICY_HEAD}  outlierDetection:\n    baseEjectionTime: 30s\n    maxEjectionTime: 10s\n  backupRequest:\n    minDelay: 0s\n"),
            "route.yaml: DestinationPolicy default/reviews: spec.outlierDetection.maxEjectionTime: must be at least baseEjectionTime (30s), got 10s\n\
             route.yaml: DestinationPolicy default/reviews: spec.backupRequest.minDelay: must be greater than 0s",
        ),
        (
            "access source identity",
            "apiVersion: trellis/v1\nkind: AccessPolicy\nmetadata: {name: p}\nspec:\n  rules:\n    - action: deny\n      sources: [{identity: \"https://x\"}, {}]\n      methods: [get]\n".to_string(),
            "route.yaml: AccessPolicy default/p: spec.rules[0].sources[0].identity: invalid SPIFFE ID \"https://x\": must start with spiffe://\n\
             route.yaml: AccessPolicy default/p: spec.rules[0].sources[1]: at least one of `identity`, `service`, `namespace` or `labels` is required\n\
             route.yaml: AccessPolicy default/p: spec.rules[0].methods[0]: invalid method \"get\": expected an upper-case HTTP method such as GET or POST",
        ),
        (
            "header names must be lower case",
            route("    - match:\n        - headers: {End-User: {exact: jason}}\n      route:\n        - destination: {service: ratings}\n"),
            "route.yaml: Route default/ratings: spec.http[0].match[0].headers: invalid header name \"End-User\": expected a lower-case HTTP token (e.g. x-request-id)",
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, want) in &cases {
        let got = errors("route.yaml", text);
        if got != *want {
            failures.push(format!("{what}:\n  want: {want}\n  got:  {got}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn errors_carry_file_lines_across_documents() {
    let text = format!(
        "apiVersion: trellis/v1\nkind: Service\nmetadata: {{name: a}}\nspec:\n  ports: [{{name: http, port: 80, protocol: http}}]\n---\n{}",
        route("    - rout: []\n")
    );
    assert_eq!(
        errors("two.yaml", &text),
        "two.yaml:14:7: spec.http[0]: unknown field `rout`, expected one of `name`, `match`, `route`, `degrade`, `timeout`, `retries`, `fault`, `mirror`, `headers`"
    );
}

#[test]
fn every_document_is_reported_not_only_the_first() {
    let text = format!(
        "{}---\napiVersion: trellis/v1\nkind: Nope\n---\n{}",
        route("    - rout: []\n"),
        route("    - route: [{destination: {service: ratings}, weight: 50}]\n"),
    );
    assert_eq!(
        errors("many.yaml", &text),
        "many.yaml:8:7: spec.http[0]: unknown field `rout`, expected one of `name`, `match`, `route`, `degrade`, `timeout`, `retries`, `fault`, `mirror`, `headers`\n\
         many.yaml:11: kind: unknown kind \"Nope\", expected one of Service, Instance, Route, DestinationPolicy, Quota, AccessPolicy\n\
         many.yaml: Route default/ratings: spec.http[0].route: weights sum to 50, expected 100"
    );
}

#[test]
fn duplicate_name_in_one_text() {
    let one = route("    - route: [{destination: {service: ratings}}]\n");
    let text = format!("{one}---\n# again\n{one}");
    assert_eq!(
        errors("dup.yaml", &text),
        "dup.yaml:11: Route default/ratings: metadata.name: defined twice in this input (first at line 1)"
    );
    // Same name, other namespace or other kind: no conflict.
    let other_ns = one.replace("name: ratings", "name: ratings\n  namespace: test");
    assert_eq!(
        parse_documents("ok.yaml", &format!("{one}---\n{other_ns}"))
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn oversize_document() {
    let filler = format!("# {}\n", "x".repeat(MAX_DOCUMENT_BYTES));
    let text = format!(
        "apiVersion: trellis/v1\nkind: Service\nmetadata: {{name: a}}\nspec:\n  ports: [{{name: http, port: 80, protocol: http}}]\n---\n{filler}{}",
        route("    - route: [{destination: {service: ratings}}]\n")
    );
    let got = errors("big.yaml", &text);
    let doc_bytes = text.len() - text.find("---").unwrap();
    assert_eq!(
        got,
        format!("big.yaml:8: document is {doc_bytes} bytes, over the limit of 262144 bytes")
    );
}

#[test]
fn json_errors_have_positions() {
    assert_eq!(
        errors(
            "x.json",
            "[\n  {\"apiVersion\": \"trellis/v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}, \"spec\": {\"ports\": [], \"extra\": 1}}\n]"
        ),
        "x.json:2:100: spec: unknown field `extra`, expected `ports`"
    );
    assert_eq!(
        errors("x.json", "[1, 2"),
        "x.json:1:5: EOF while parsing a list"
    );
}

#[test]
fn from_json_errors() {
    let err = Resource::from_json(br#"{"apiVersion":"trellis/v1","kind":"Route","metadata":{"name":"a"},"spec":{"hosts":["a"],"htp":[]}}"#)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "<json>:1:93: unknown field `htp`, expected one of `hosts`, `http`, `tcp`"
    );
    let err = Resource::from_json(b"{\"apiVersion\":\"v0\"}").unwrap_err();
    assert_eq!(
        err.to_string(),
        "<json>: apiVersion: unsupported apiVersion \"v0\", expected \"trellis/v1\""
    );
    assert!(Resource::from_json(b"").is_err());
    assert!(Resource::from_json(b"\xff\xfe").is_err());
}

fn reviews_policy() -> Resource {
    parse_documents(
        "dp.yaml",
        &format!("{POLICY_HEAD}  subsets:\n    - {{name: v1, labels: {{version: v1}}}}\n    - {{name: v2, labels: {{version: v2}}}}\n    - {{name: v3, labels: {{version: v3}}}}\n"),
    )
    .expect("valid policy")
    .remove(0)
}

fn reviews_route(subsets: &[&str]) -> Resource {
    let mut http = String::from("    - route: [{destination: {service: reviews}}]\n");
    http.push_str("    - route:\n");
    for s in subsets {
        http.push_str(&format!(
            "        - {{destination: {{service: reviews, subset: {s}}}, weight: {}}}\n",
            100 / subsets.len()
        ));
    }
    let text = format!(
        "apiVersion: trellis/v1\nkind: Route\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    );
    parse_documents("route.yaml", &text)
        .expect("valid route")
        .remove(0)
}

#[test]
fn subset_missing_via_check_references() {
    let nothing = |_: Kind, _: &str, _: &str| None;
    let set = vec![
        ("route.yaml".to_string(), reviews_route(&["v1", "v4"])),
        ("dp.yaml".to_string(), reviews_policy()),
    ];
    let got: Vec<String> = check_references(&set, &nothing)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        ["route.yaml: Route default/reviews: spec.http[1].route[1].destination.subset: subset \"v4\" is not defined in DestinationPolicy default/reviews (defined: v1, v2, v3)"]
    );

    // No policy anywhere.
    let set = vec![("route.yaml".to_string(), reviews_route(&["v1", "v2"]))];
    let got: Vec<String> = check_references(&set, &nothing)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        [
            "route.yaml: Route default/reviews: spec.http[1].route[0].destination.subset: no DestinationPolicy for service \"reviews\" defines subsets",
            "route.yaml: Route default/reviews: spec.http[1].route[1].destination.subset: no DestinationPolicy for service \"reviews\" defines subsets",
        ]
    );

    // The policy is in the store, found by the naming convention.
    let stored = reviews_policy();
    let store = |k: Kind, ns: &str, name: &str| {
        (k == Kind::DestinationPolicy && ns == "default" && name == "reviews")
            .then(|| stored.clone())
    };
    assert!(check_references(&set, &store).is_empty());

    // A policy in the set with the same name replaces the stored one.
    let mut emptied = reviews_policy();
    if let trellis_resources::Spec::DestinationPolicy(p) = &mut emptied.spec {
        p.subsets.clear();
    }
    let set2 = vec![set[0].clone(), ("dp.yaml".to_string(), emptied)];
    let got: Vec<String> = check_references(&set2, &store)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got[0],
        "route.yaml: Route default/reviews: spec.http[1].route[0].destination.subset: subset \"v1\" is not defined in DestinationPolicy default/reviews (defined: none)"
    );
}

#[test]
fn one_default_action_per_namespace() {
    let text = "apiVersion: trellis/v1\nkind: AccessPolicy\nmetadata: {name: a}\nspec: {defaultAction: deny}\n---\napiVersion: trellis/v1\nkind: AccessPolicy\nmetadata: {name: b}\nspec: {defaultAction: allow}\n---\napiVersion: trellis/v1\nkind: AccessPolicy\nmetadata: {name: c, namespace: other}\nspec: {defaultAction: allow}\n";
    let set: Vec<(String, Resource)> = parse_documents("ap.yaml", text)
        .unwrap()
        .into_iter()
        .map(|r| ("ap.yaml".to_string(), r))
        .collect();
    let got: Vec<String> = check_references(&set, &|_, _, _| None)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        ["ap.yaml: AccessPolicy default/b: spec.defaultAction: AccessPolicy default/a already sets the default action of namespace \"default\"; at most one AccessPolicy per namespace may set it"]
    );
}
