//! Route selection: host → Route rules (or the Service's default route) →
//! one weighted destination. Reads only the [`MeshConfig`] snapshot the
//! request took; allocates nothing but the answer's strings.
//!
//! * The host is the request's authority or `Host` header without its port,
//!   `svc` (the caller's namespace) or `svc.ns`.
//! * Routes listing the host in that namespace are tried in key order, their
//!   rules in order; the first rule whose `match` list matches wins (an
//!   empty list matches everything). No matching rule: 404.
//! * No Route but a Service of that name: every instance of the service,
//!   default timeout.
//! * A rule's destinations are picked at random by weight.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hyper::http::request::Parts;
use regex::Regex;
use trellis_resources::matching::{compile_regex, HeaderMatch, StringMatch};
use trellis_resources::route::{
    Degrade, Fault, HeaderOperations, HttpMatch, RetryPolicy, WeightedDestination, DEFAULT_TIMEOUT,
};

use super::error::ProxyError;
use crate::mesh::MeshConfig;

/// Where a request goes, borrowed from the config snapshot.
#[derive(Debug)]
pub struct Target<'a> {
    /// Namespace of the destination service.
    pub namespace: &'a str,
    /// Destination service.
    pub service: &'a str,
    /// Subset (`None`: every instance).
    pub subset: Option<&'a str>,
    /// The matched rule's name (`-` for an unnamed rule or no Route), for
    /// metrics and the access log.
    pub rule: &'a str,
    /// The request's deadline.
    pub timeout: Duration,
    /// Header edits of the rule.
    pub headers: Option<&'a HeaderOperations>,
    /// The rule's retry policy (none: one try).
    pub retries: Option<&'a RetryPolicy>,
    /// The rule's fault injection (none: no faults).
    pub fault: Option<&'a Fault>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Forward to this destination.
    Forward(Target<'a>),
    /// Answer locally (the rule's degrade switch).
    Degrade(&'a Degrade),
}

/// Splits `host[:port]` into (service, namespace), the namespace defaulting
/// to `caller_ns`.
pub fn parse_host<'a>(host: &'a str, caller_ns: &'a str) -> (&'a str, &'a str) {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or(host);
    match labels.next() {
        Some(ns) if !ns.is_empty() => (name, ns),
        _ => (name, caller_ns),
    }
}

/// Chooses the destination of a request to `host`. `source_labels` are the
/// calling instance's labels (this sidecar's), for `sourceLabels` matches.
pub fn decide<'a>(
    cfg: &'a MeshConfig,
    host: &'a str,
    caller_ns: &'a str,
    req: &Parts,
    source_labels: &BTreeMap<String, String>,
) -> Result<Decision<'a>, ProxyError> {
    let (name, ns) = parse_host(host, caller_ns);
    let mut any_route = false;
    for (_, route) in cfg.routes_for_host(ns, name) {
        any_route = true;
        for rule in &route.http {
            if !(rule.matches.is_empty()
                || rule.matches.iter().any(|m| matches(m, req, source_labels)))
            {
                continue;
            }
            if let Some(d) = &rule.degrade {
                return Ok(Decision::Degrade(d));
            }
            let dest = pick_weighted(&rule.route);
            let Some(dest) = dest else { continue };
            return Ok(Decision::Forward(Target {
                namespace: ns,
                service: &dest.destination.service,
                subset: dest.destination.subset.as_deref(),
                rule: rule.name.as_deref().unwrap_or(NO_RULE),
                timeout: rule.timeout.as_std(),
                headers: rule.headers.as_ref(),
                retries: rule.retries.as_ref(),
                fault: rule.fault.as_ref(),
            }));
        }
    }
    if any_route {
        return Err(ProxyError::NoRuleMatched {
            host: host.to_string(),
        });
    }
    match cfg.service(ns, name) {
        Some((r, _)) => Ok(Decision::Forward(Target {
            namespace: ns,
            service: &r.metadata.name,
            subset: None,
            rule: NO_RULE,
            timeout: DEFAULT_TIMEOUT.as_std(),
            headers: None,
            retries: None,
            fault: None,
        })),
        None => Err(ProxyError::NoRoute {
            host: host.to_string(),
        }),
    }
}

/// The rule name metrics show when there is none.
pub const NO_RULE: &str = "-";

/// One of `dests` at random by weight (`None` if empty).
fn pick_weighted(dests: &[WeightedDestination]) -> Option<&WeightedDestination> {
    let total: u32 = dests.iter().map(|d| d.effective_weight()).sum();
    if total == 0 || dests.len() == 1 {
        return dests.first();
    }
    let mut pick = rand::random_range(0..total);
    dests.iter().find(|d| {
        let w = d.effective_weight();
        if pick < w {
            true
        } else {
            pick -= w;
            false
        }
    })
}

/// Chooses the destination of a TCP connection to service `name` in `ns`
/// on `port`: the `tcp` rule for that port of a Route listing the service
/// (weighted pick), else all instances of the Service. No timeout applies
/// to the connection's life (only to connecting).
pub fn decide_tcp<'a>(
    cfg: &'a MeshConfig,
    name: &'a str,
    ns: &'a str,
    port: u16,
) -> Result<Target<'a>, ProxyError> {
    let forward = |service: &'a str, subset: Option<&'a str>| Target {
        namespace: ns,
        service,
        subset,
        rule: NO_RULE,
        timeout: DEFAULT_TIMEOUT.as_std(),
        headers: None,
        retries: None,
        fault: None,
    };
    for (_, route) in cfg.routes_for_host(ns, name) {
        for rule in route.tcp.iter().filter(|r| r.port == port) {
            if let Some(d) = pick_weighted(&rule.route) {
                return Ok(forward(
                    &d.destination.service,
                    d.destination.subset.as_deref(),
                ));
            }
        }
    }
    match cfg.service(ns, name) {
        Some((r, _)) => Ok(forward(&r.metadata.name, None)),
        None => Err(ProxyError::NoRoute {
            host: format!("{name}.{ns}:{port}"),
        }),
    }
}

/// Does one `match` entry match (all its set fields)?
fn matches(m: &HttpMatch, req: &Parts, source_labels: &BTreeMap<String, String>) -> bool {
    if let Some(p) = &m.path {
        if !string_match(p, req.uri.path()) {
            return false;
        }
    }
    if !m.method.is_empty() && !m.method.iter().any(|x| x == req.method.as_str()) {
        return false;
    }
    for (name, hm) in &m.headers {
        let ok = match (hm, req.headers.get(name.as_str())) {
            (_, None) => false,
            (HeaderMatch::Present, Some(_)) => true,
            (HeaderMatch::Value(sm), Some(v)) => v.to_str().is_ok_and(|v| string_match(sm, v)),
        };
        if !ok {
            return false;
        }
    }
    m.source_labels
        .iter()
        .all(|(k, v)| source_labels.get(k) == Some(v))
}

/// Most regexes kept compiled per worker thread; the cache is cleared when
/// full (a config with more distinct patterns than this is unusual).
const REGEX_CACHE_ENTRIES: usize = 256;

thread_local! {
    static REGEXES: RefCell<HashMap<String, Option<Regex>>> = RefCell::new(HashMap::new());
}

fn string_match(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Exact(e) => value == e,
        StringMatch::Prefix(p) => value.starts_with(p.as_str()),
        StringMatch::Regex(pattern) => REGEXES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(re) = cache.get(pattern) {
                return re.as_ref().is_some_and(|re| re.is_match(value));
            }
            if cache.len() >= REGEX_CACHE_ENTRIES {
                cache.clear();
            }
            // A validated resource never has a bad regex; if one slips
            // through it matches nothing.
            let re = compile_regex(pattern).ok();
            let hit = re.as_ref().is_some_and(|re| re.is_match(value));
            cache.insert(pattern.clone(), re);
            hit
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{ConfigSource, Entry, RawState};
    use crate::proxy::balance;
    use std::sync::Arc;
    use trellis_proto::sidecar::KeyValue;
    use trellis_resources::Resource;

    fn config(docs: &[&str]) -> MeshConfig {
        let mut raw = RawState::new();
        for d in docs {
            let r = Resource::from_json(d.as_bytes()).unwrap();
            let key = r.key();
            let kv = KeyValue {
                key: key.clone(),
                value: d.as_bytes().to_vec(),
                mod_revision: 1,
                ..Default::default()
            };
            raw.insert(key, Arc::new(Entry::new(kv)));
        }
        MeshConfig::build(1, ConfigSource::Disk, Arc::new(raw))
    }

    const SVC: &str = r#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"reviews","namespace":"default"},"spec":{"ports":[{"name":"http","port":9080,"protocol":"http"}]}}"#;
    const DP: &str = r#"{"apiVersion":"trellis/v1","kind":"DestinationPolicy","metadata":{"name":"reviews","namespace":"default"},"spec":{"host":"reviews","subsets":[{"name":"v1","labels":{"version":"v1"}},{"name":"v2","labels":{"version":"v2"}}]}}"#;
    const ROUTE: &str = r#"{"apiVersion":"trellis/v1","kind":"Route","metadata":{"name":"reviews","namespace":"default"},"spec":{"hosts":["reviews"],"http":[
        {"match":[{"headers":{"x-canary":{"exact":"yes"}}}],"route":[{"destination":{"service":"reviews","subset":"v2"}}],"timeout":"2s"},
        {"match":[{"path":{"regex":"/api/[0-9]+"},"method":["GET"]}],"route":[{"destination":{"service":"reviews","subset":"v1"}}]}]}}"#;
    const I1: &str = r#"{"apiVersion":"trellis/v1","kind":"Instance","metadata":{"name":"r1","namespace":"default"},"spec":{"service":"reviews","address":"10.0.0.1","port":15006,"labels":{"version":"v1"}}}"#;
    const I2: &str = r#"{"apiVersion":"trellis/v1","kind":"Instance","metadata":{"name":"r2","namespace":"default"},"spec":{"service":"reviews","address":"10.0.0.2","port":15006,"labels":{"version":"v2"},"health":"unhealthy"}}"#;

    fn parts(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn forward<'a>(
        cfg: &'a MeshConfig,
        host: &'a str,
        p: &Parts,
    ) -> Result<Target<'a>, ProxyError> {
        match decide(cfg, host, "default", p, &BTreeMap::new())? {
            Decision::Forward(t) => Ok(t),
            Decision::Degrade(_) => panic!("degrade"),
        }
    }

    #[test]
    fn rules_in_order_then_404_and_default_route() {
        let cfg = config(&[SVC, DP, ROUTE, I1, I2]);
        let t = forward(&cfg, "reviews", &parts("GET", "/x", &[("x-canary", "yes")])).unwrap();
        assert_eq!((t.service, t.subset), ("reviews", Some("v2")));
        assert_eq!(t.timeout, Duration::from_secs(2));
        // v2's only instance reports itself unhealthy: panic routing still
        // uses it; a draining one, never.
        let eps = balance::endpoints(&cfg, &t, &Default::default()).unwrap();
        assert_eq!(eps.endpoints.len(), 1);
        let draining = I2.replace("unhealthy", "draining");
        let cfg2 = config(&[SVC, DP, ROUTE, I1, &draining]);
        let t2 = forward(
            &cfg2,
            "reviews",
            &parts("GET", "/x", &[("x-canary", "yes")]),
        )
        .unwrap();
        let e = balance::endpoints(&cfg2, &t2, &Default::default()).unwrap_err();
        assert_eq!(e.to_string(), "no healthy endpoint for reviews/v2");

        let t = forward(&cfg, "reviews.default:9080", &parts("GET", "/api/12", &[])).unwrap();
        assert_eq!(t.subset, Some("v1"));
        assert_eq!(t.timeout, DEFAULT_TIMEOUT.as_std());
        let eps = balance::endpoints(&cfg, &t, &Default::default()).unwrap();
        assert_eq!(
            eps.endpoints.iter().map(|e| e.addr).collect::<Vec<_>>(),
            vec!["10.0.0.1:15006".parse().unwrap()]
        );

        let e = forward(&cfg, "reviews", &parts("POST", "/api/12", &[])).unwrap_err();
        assert!(matches!(e, ProxyError::NoRuleMatched { .. }), "{e}");
        let e = forward(&cfg, "ratings", &parts("GET", "/", &[])).unwrap_err();
        assert_eq!(e.to_string(), "no route for host ratings");

        // No Route: the Service's instances, healthy ones (the unhealthy
        // one is only a last resort).
        let cfg = config(&[SVC, I1, I2]);
        let t = forward(&cfg, "reviews", &parts("GET", "/", &[])).unwrap();
        assert_eq!(t.subset, None);
        assert_eq!(
            balance::endpoints(&cfg, &t, &Default::default())
                .unwrap()
                .endpoints
                .len(),
            1
        );
    }

    #[test]
    fn endpoints_leave_out_ejected_ones_prefer_the_zone_and_panic_when_all_are_out() {
        use crate::proxy::outlier::{Observed, Outliers};
        const ZI1: &str = r#"{"apiVersion":"trellis/v1","kind":"Instance","metadata":{"name":"z1","namespace":"default"},"spec":{"service":"reviews","address":"10.0.1.1","port":15006,"labels":{"zone":"a"}}}"#;
        const ZI2: &str = r#"{"apiVersion":"trellis/v1","kind":"Instance","metadata":{"name":"z2","namespace":"default"},"spec":{"service":"reviews","address":"10.0.1.2","port":15006,"labels":{"zone":"b"}}}"#;
        let cfg = config(&[SVC, ZI1, ZI2]);
        let t = forward(&cfg, "reviews", &parts("GET", "/", &[])).unwrap();
        let addrs = |p: balance::Pool| {
            p.endpoints
                .iter()
                .map(|e| e.addr.to_string())
                .collect::<Vec<_>>()
        };
        let outliers = Outliers::default();
        let view = balance::View {
            caller_zone: Some("a"),
            health_checks: None,
            outliers: Some(&outliers),
        };
        let pool = balance::endpoints(&cfg, &t, &view).unwrap();
        assert_eq!(pool.size, 2);
        assert_eq!(addrs(pool), ["10.0.1.1:15006"]);
        // Zone a's only endpoint ejected: zone b.
        let od = trellis_resources::policy::OutlierDetection {
            consecutive_5xx_errors: 1,
            consecutive_gateway_errors: 0,
            interval: trellis_resources::Duration::from_secs(10),
            base_ejection_time: trellis_resources::Duration::from_secs(30),
            max_ejection_percent: 100,
            max_ejection_time: trellis_resources::Duration::from_secs(300),
        };
        let ep = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(outliers
            .record(
                "default/reviews",
                ep("10.0.1.1:15006"),
                Observed::ServerError,
                &od,
                2
            )
            .is_some());
        assert_eq!(
            addrs(balance::endpoints(&cfg, &t, &view).unwrap()),
            ["10.0.1.2:15006"]
        );
        // Both ejected: every registered-healthy instance (panic routing).
        outliers.record(
            "default/reviews",
            ep("10.0.1.2:15006"),
            Observed::GatewayError,
            &od,
            2,
        );
        assert_eq!(
            addrs(balance::endpoints(&cfg, &t, &view).unwrap()),
            ["10.0.1.1:15006", "10.0.1.2:15006"]
        );
    }

    #[test]
    fn tcp_rules_by_port_then_the_service() {
        const DB: &str = r#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"db","namespace":"default"},"spec":{"ports":[{"name":"pg","port":5432,"protocol":"tcp"},{"name":"admin","port":8080,"protocol":"http"}]}}"#;
        const DB_ROUTE: &str = r#"{"apiVersion":"trellis/v1","kind":"Route","metadata":{"name":"db","namespace":"default"},"spec":{"hosts":["db"],"tcp":[{"port":5432,"route":[{"destination":{"service":"db","subset":"primary"}}]}]}}"#;
        let cfg = config(&[SVC, DB, DB_ROUTE]);
        let t = decide_tcp(&cfg, "db", "default", 5432).unwrap();
        assert_eq!((t.service, t.subset), ("db", Some("primary")));
        // Another port: no rule, every instance.
        let t = decide_tcp(&cfg, "db", "default", 6000).unwrap();
        assert_eq!((t.service, t.subset), ("db", None));
        let e = decide_tcp(&cfg, "nosuch", "default", 1).unwrap_err();
        assert_eq!(e.to_string(), "no route for host nosuch.default:1");
        // Ports name services only when exactly one declares them.
        assert_eq!(
            cfg.service_for_port("default", 5432),
            Some(("db", trellis_resources::Protocol::Tcp))
        );
        assert_eq!(
            cfg.service_for_port("default", 9080),
            Some(("reviews", trellis_resources::Protocol::Http))
        );
        assert_eq!(cfg.service_for_port("default", 1), None);
        assert_eq!(cfg.service_for_port("other", 5432), None);
        // An intercepted destination is a mesh service only on loopback or
        // at one of its instances' addresses.
        let cfg2 = config(&[SVC, DB, I1]);
        let md = |a: &str| {
            crate::proxy::outbound::mesh_destination(&cfg2, "default", a.parse().unwrap())
        };
        assert_eq!(
            md("127.0.0.1:9080"),
            Some(("reviews".to_string(), trellis_resources::Protocol::Http))
        );
        assert_eq!(
            md("10.0.0.1:9080"),
            Some(("reviews".to_string(), trellis_resources::Protocol::Http))
        );
        assert_eq!(md("10.0.0.9:9080"), None, "another host on the same port");
        assert_eq!(
            md("[::1]:5432").map(|x| x.1),
            Some(trellis_resources::Protocol::Tcp)
        );
        const WEB: &str = r#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"web","namespace":"default"},"spec":{"ports":[{"name":"http","port":8080,"protocol":"http2"}]}}"#;
        let cfg = config(&[SVC, DB, WEB]);
        assert_eq!(cfg.service_for_port("default", 8080), None, "ambiguous");
    }

    #[test]
    fn hosts() {
        assert_eq!(parse_host("reviews", "default"), ("reviews", "default"));
        assert_eq!(
            parse_host("reviews:9080", "default"),
            ("reviews", "default")
        );
        assert_eq!(parse_host("reviews.shop", "default"), ("reviews", "shop"));
        assert_eq!(
            parse_host("reviews.shop:80", "default"),
            ("reviews", "shop")
        );
    }

    #[test]
    fn string_matches() {
        assert!(string_match(&StringMatch::Prefix("/a".into()), "/ab"));
        assert!(string_match(
            &StringMatch::Regex("/u/[0-9]+".into()),
            "/u/12"
        ));
        assert!(!string_match(
            &StringMatch::Regex("/u/[0-9]+".into()),
            "/u/12/x"
        ));
        assert!(!string_match(&StringMatch::Exact("/a".into()), "/ab"));
    }
}
