//! Every kind, written with (nearly) every field, survives
//! YAML -> Resource -> JSON -> Resource -> YAML -> Resource unchanged, and
//! the canonical JSON is deterministic.

use trellis_resources::{parse_documents, Kind, Resource, Spec};

const SERVICE: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata:
  name: reviews
  labels:
    team: books
spec:
  ports:
    - name: http
      port: 9080
      protocol: http
    - name: grpc
      port: 9090
      protocol: grpc
    - name: raw
      port: 7000
      protocol: tcp
    - name: h2
      port: 8443
      protocol: http2
"#;

const INSTANCE: &str = r#"
apiVersion: trellis/v1
kind: Instance
metadata:
  name: reviews-v2-7f9c
  namespace: shop
spec:
  service: reviews
  address: "fd00::12"
  port: 9080
  labels:
    version: v2
    zone: us-east-1a
  weight: 50
  health: draining
"#;

const ROUTE: &str = r#"
apiVersion: trellis/v1
kind: Route
metadata:
  name: reviews
spec:
  hosts: [reviews, reviews-legacy]
  http:
    - name: api
      match:
        - path: {regex: "/api/v[0-9]+/.*"}
          method: [GET, HEAD]
          headers:
            end-user: {exact: jason}
            x-canary: {present: true}
            x-trace: {prefix: abc}
            x-id: {regex: "[0-9a-f]{8}"}
          sourceLabels: {app: productpage}
        - path: {prefix: /static}
      route:
        - destination: {service: reviews, subset: v1, port: 9080}
          weight: 75
        - destination: {service: reviews, subset: v2}
          weight: 25
        - destination: {service: reviews, subset: v3}
          weight: 0
      timeout: 2s
      retries:
        attempts: 3
        perTryTimeout: 500ms
        retryOn: [5xx, gateway-error, connect-failure, reset, retriable-4xx, refused-stream, unavailable, cancelled, deadline-exceeded, resource-exhausted]
      fault:
        delay: {percent: 0.5, fixedDelay: 100ms}
        abort: {percent: 1.25, grpcStatus: UNAVAILABLE}
      mirror:
        destination: {service: reviews-shadow}
        percent: 12.5
      headers:
        request:
          add: {x-routed-by: trellis}
          remove: [x-internal]
        response:
          remove: [server]
    - name: tripped
      match:
        - path: {exact: /broken}
      fault:
        abort: {percent: 100, grpcStatus: 8}
      degrade:
        status: 200
        body: "[]"
        headers: {content-type: application/json}
    - route:
        - destination: {service: reviews}
  tcp:
    - port: 7000
      route:
        - destination: {service: reviews, subset: v1}
          weight: 50
        - destination: {service: reviews, subset: v2}
          weight: 50
"#;

const POLICY: &str = r#"
apiVersion: trellis/v1
kind: DestinationPolicy
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2, track: stable}
  loadBalancer:
    policy: consistentHash
    hashHeader: x-user
  locality:
    preferLocal: false
    failover:
      - from: us-east-1a
        to: [us-east-1b, us-west-2a]
  connectionPool:
    maxConnections: 10
    maxPendingRequests: 20
    maxConcurrentRequests: 30
  outlierDetection:
    consecutive5xxErrors: 7
    consecutiveGatewayErrors: 2
    interval: 5s
    baseEjectionTime: 1m
    maxEjectionPercent: 100
  healthCheck:
    tcp: {}
    interval: 2s
    timeout: 500ms
    healthyThreshold: 1
    unhealthyThreshold: 4
  backupRequest:
    afterPercentile: 99.9
    maxPercent: 2.5
  retryBudget:
    percent: 10
    minPerSecond: 3
"#;

const QUOTA: &str = r#"
apiVersion: trellis/v1
kind: Quota
metadata:
  name: request-count
spec:
  maxAmount: 5000
  validDuration: 1s
  overrides:
    - dimensions: {source: reviews, sourceVersion: v3, destination: ratings, destinationVersion: v1, sourceNamespace: default}
      maxAmount: 1
      validDuration: 5s
    - dimensions: {destination: ratings}
      maxAmount: 5
"#;

const ACCESS: &str = r#"
apiVersion: trellis/v1
kind: AccessPolicy
metadata:
  name: ratings
spec:
  defaultAction: deny
  rules:
    - name: from-reviews
      action: allow
      sources:
        - identity: spiffe://cluster.local/ns/default/svc/reviews
        - service: reviews
          namespace: default
          labels: {version: v2}
      destinations: [ratings]
      methods: [GET]
      paths:
        - prefix: /ratings/
        - regex: "/health(z)?"
    - action: deny
      sources:
        - namespace: untrusted
"#;

fn one(text: &str) -> Resource {
    let mut all = parse_documents("test.yaml", text).unwrap_or_else(|errs| {
        panic!(
            "{}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert_eq!(all.len(), 1);
    all.remove(0)
}

#[test]
fn every_kind_round_trips() {
    let mut kinds = Vec::new();
    for text in [SERVICE, INSTANCE, ROUTE, POLICY, QUOTA, ACCESS] {
        let parsed = one(text);
        kinds.push(parsed.kind());
        let json = parsed.to_json();
        let from_json = Resource::from_json(&json).unwrap();
        assert_eq!(
            from_json,
            parsed,
            "json round trip of {}",
            parsed.display_name()
        );
        assert_eq!(from_json.to_json(), json, "canonical json is stable");
        let yaml = from_json.to_yaml();
        let again = one(&yaml);
        assert_eq!(
            again,
            parsed,
            "yaml round trip of {}:\n{yaml}",
            parsed.display_name()
        );
        assert_eq!(again.to_json(), json);
        // JSON input goes through parse_documents too.
        let via_text = one(std::str::from_utf8(&json).unwrap());
        assert_eq!(via_text, parsed);
    }
    assert_eq!(kinds, Kind::ALL.to_vec());
}

#[test]
fn canonical_json_shape() {
    let r = one(SERVICE);
    assert_eq!(
        String::from_utf8(r.to_json()).unwrap(),
        r#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"reviews","namespace":"default","labels":{"team":"books"}},"spec":{"ports":[{"name":"http","port":9080,"protocol":"http"},{"name":"grpc","port":9090,"protocol":"grpc"},{"name":"raw","port":7000,"protocol":"tcp"},{"name":"h2","port":8443,"protocol":"http2"}]}}"#
    );
    assert_eq!(r.key(), "/service/default/reviews");
    assert_eq!(r.display_name(), "Service default/reviews");
}

#[test]
fn defaults_are_applied_and_left_out_of_output() {
    let r = one(
        "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - route:\n        - destination: {service: a}\n",
    );
    let Spec::Route(spec) = &r.spec else { panic!() };
    assert_eq!(
        spec.http[0].timeout,
        trellis_resources::route::DEFAULT_TIMEOUT
    );
    assert_eq!(spec.http[0].route[0].effective_weight(), 100);
    assert_eq!(r.metadata.namespace, "default");
    assert_eq!(
        String::from_utf8(r.to_json()).unwrap(),
        r#"{"apiVersion":"trellis/v1","kind":"Route","metadata":{"name":"r","namespace":"default"},"spec":{"hosts":["a"],"http":[{"route":[{"destination":{"service":"a"}}]}]}}"#
    );
}

#[test]
fn grpc_status_by_code_is_written_as_name() {
    let r = one(ROUTE);
    let json = String::from_utf8(r.to_json()).unwrap();
    assert!(
        json.contains(r#""grpcStatus":"RESOURCE_EXHAUSTED""#),
        "{json}"
    );
}

#[test]
fn several_documents_and_json_arrays() {
    let text = format!("# leading comment\n---\n{SERVICE}\n---\n---\n# empty\n---\n{QUOTA}...\n");
    let all = parse_documents("multi.yaml", &text).unwrap();
    assert_eq!(
        all.iter().map(Resource::kind).collect::<Vec<_>>(),
        [Kind::Service, Kind::Quota]
    );

    let array = format!(
        "[\n  {},\n  {}\n]",
        String::from_utf8(all[0].to_json()).unwrap(),
        String::from_utf8(all[1].to_json()).unwrap()
    );
    assert_eq!(parse_documents("all.json", &array).unwrap(), all);
    assert_eq!(parse_documents("empty.json", "[]").unwrap(), vec![]);
    assert_eq!(parse_documents("empty.yaml", "").unwrap(), vec![]);
    assert_eq!(
        parse_documents("empty.yaml", "# nothing\n---\n~\n").unwrap(),
        vec![]
    );
}
