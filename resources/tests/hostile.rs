//! Inputs an attacker or a careless operator could send: every one gives
//! errors (or nothing), never a panic, a hang or a blow-up.

use trellis_resources::{parse_documents, Resource};

fn must_fail(what: &str, text: &str) {
    match parse_documents("h.yaml", text) {
        Ok(r) => panic!("{what}: parsed {} resources", r.len()),
        Err(errs) => assert!(!errs.is_empty(), "{what}"),
    }
}

#[test]
fn hostile_inputs_are_errors() {
    // Alias expansion bomb ("billion laughs") where the schema reads it.
    // Aliases are only replayed as far as the typed parser reads, and the
    // first item already has the wrong type, so this fails at once.
    let mut bomb = String::from(
        "apiVersion: trellis/v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports:\n    - &a [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..12u8 {
        bomb.push_str(&format!(
            "    - &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n",
            n = (b'a' + i) as char,
            p = (b'a' + i - 1) as char
        ));
    }
    let started = std::time::Instant::now();
    must_fail("alias bomb", &bomb);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));

    // Deep nesting.
    let deep = format!(
        "apiVersion: trellis/v1\nkind: Service\nmetadata: {{name: x}}\nspec: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    must_fail("deep yaml", &deep);
    must_fail(
        "deep json",
        &format!("[{}{}]", "[".repeat(10_000), "]".repeat(10_000)),
    );

    for (what, text) in [
        ("tab indentation", "apiVersion: trellis/v1\nkind: Service\nmetadata:\n\tname: x\n"),
        ("NaN percent", "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - fault: {delay: {percent: .nan, fixedDelay: 1s}}\n      route: [{destination: {service: a}}]\n"),
        ("infinite percent", "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - mirror: {destination: {service: b}, percent: .inf}\n      route: [{destination: {service: a}}]\n"),
        ("huge integer", "apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: q}\nspec: {maxAmount: 99999999999999999999999999, validDuration: 1s}\n"),
        ("negative integer", "apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: q}\nspec: {maxAmount: -1, validDuration: 1s}\n"),
        ("huge duration", "apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: q}\nspec: {maxAmount: 1, validDuration: 18446744073709551616h}\n"),
        ("weights overflow", "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - route:\n        - {destination: {service: a}, weight: 4294967295}\n        - {destination: {service: b}, weight: 4294967295}\n"),
        ("bad address", "apiVersion: trellis/v1\nkind: Instance\nmetadata: {name: i}\nspec: {service: a, address: 10.0.0.256, port: 80}\n"),
        ("unspecified address", "apiVersion: trellis/v1\nkind: Instance\nmetadata: {name: i}\nspec: {service: a, address: 0.0.0.0, port: 80}\n"),
        ("regex bomb", "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - match: [{path: {regex: \"((a{100}){100}){100}\"}}]\n      route: [{destination: {service: a}}]\n"),
        ("duplicate key", "apiVersion: trellis/v1\nkind: Service\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{name: a, port: 1, protocol: tcp}]}\n"),
        ("json not a document", "[1, \"x\", null, {}]"),
        ("json trailing garbage", "{\"apiVersion\": \"trellis/v1\"} x"),
        ("unterminated quote", "apiVersion: \"trellis/v1\nkind: Service\n"),
        ("big degrade body", "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - degrade: {body: BODY}\n"),
        ("control characters in header values", "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n    - degrade: {headers: {x-a: \"a\\r\\nset-cookie: x\"}}\n"),
        ("binary tag", "apiVersion: !!binary aGVsbG8=\nkind: Service\n"),
        ("merge key", "base: &b {name: x}\napiVersion: trellis/v1\nkind: Service\nmetadata:\n  <<: *b\nspec: {ports: [{name: a, port: 1, protocol: tcp}]}\n"),
    ] {
        let text = text.replace("BODY", &"x".repeat(70_000));
        must_fail(what, &text);
    }
}

#[test]
fn odd_but_valid_inputs() {
    // CRLF line endings, a BOM, a document end marker, quoted keys.
    let text = "\u{feff}apiVersion: trellis/v1\r\nkind: Service\r\n\"metadata\": {name: x}\r\nspec: {ports: [{name: a, port: 1, protocol: tcp}]}\r\n...\r\n---\r\n";
    let r = parse_documents("crlf.yaml", text).unwrap();
    assert_eq!(r.len(), 1);
    // The stored form of a resource read from YAML reads back identically.
    assert_eq!(Resource::from_json(&r[0].to_json()).unwrap(), r[0]);
    assert_eq!(
        Resource::from_json(b"null").unwrap_err().to_string(),
        "<json>:1:4: invalid type: null, expected a resource document (a mapping with apiVersion, kind, metadata and spec)"
    );
}
