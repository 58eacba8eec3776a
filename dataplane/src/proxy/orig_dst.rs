//! The original destination of a connection that iptables redirected to
//! the outbound listener (`trellis-sidecar iptables`, see
//! [`crate::iptables`]).
//!
//! A `REDIRECT --to-ports 15001` rewrites the destination of the app's
//! connection to the sidecar's outbound port; the kernel's connection
//! tracking still holds the address the app dialled, and
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv4) or
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (IPv6) on the accepted
//! socket returns it. The calls go through `socket2`'s safe wrappers
//! (`original_dst_v4` / `original_dst_v6`): the workspace forbids
//! `unsafe`, and they are exactly those getsockopt calls.
//!
//! A connection that was not redirected answers `ENOENT` (no conntrack
//! entry: nothing NATed it, or conntrack is not loaded), or, when conntrack
//! tracks it without NAT, the socket's own local address; both mean "not
//! redirected", i.e. the app dialled the outbound listener itself, and
//! [`original_dst`] returns `None`.

use std::net::{IpAddr, SocketAddr};

use socket2::SockRef;
use tokio::net::TcpStream;

/// The destination the connection had before an iptables REDIRECT, if it was redirected:
/// getsockopt SOL_IP/SO_ORIGINAL_DST (IPv4) or SOL_IPV6/IP6T_SO_ORIGINAL_DST (IPv6, value 80).
/// None when the socket was not redirected (ENOENT / the option fails) or the original
/// destination equals the socket's own local address.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = canonical(stream.local_addr().ok()?);
    let sock = SockRef::from(stream);
    // An IPv4 connection accepted on a dual-stack IPv6 socket is tracked by
    // IPv4 conntrack: ask that family, and the IPv6 one for the rest.
    let raw = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6().or_else(|_| sock.original_dst_v4()),
    };
    let dst = canonical(raw.ok()?.as_socket()?);
    (dst != local).then_some(dst)
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, so both sides of the comparison agree.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Accepts one connection to `connect_to` on `listener`; returns the
    /// server side (and keeps the client open while it is inspected).
    async fn accept_one(listener: &TcpListener, connect_to: SocketAddr) -> (TcpStream, TcpStream) {
        let (client, server) = tokio::join!(TcpStream::connect(connect_to), listener.accept());
        let client = client.expect("connect");
        let (server, _) = server.expect("accept");
        (server, client)
    }

    #[tokio::test]
    async fn plain_loopback_connection_is_not_redirected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (server, _client) = accept_one(&listener, addr).await;
        assert_eq!(original_dst(&server), None);
    }

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().expect("addr");
        assert_eq!(canonical(mapped), "127.0.0.1:80".parse().expect("addr"));
        let v6: SocketAddr = "[::1]:80".parse().expect("addr");
        assert_eq!(canonical(v6), v6);
    }

    /// Set by [`redirected_connection_reports_where_it_was_going`] for the
    /// copy of this test binary it runs in a fresh network namespace.
    const IN_NETNS: &str = "TRELLIS_ORIG_DST_IN_NETNS";

    /// The real thing needs root, `unshare` and `iptables`: this test runs
    /// [`in_netns_redirect`] in a new network namespace (only loopback, its
    /// own NAT table, nothing leaves), and fails saying what is missing.
    #[test]
    fn redirected_connection_reports_where_it_was_going() {
        let exe = std::env::current_exe().expect("current_exe");
        let out = std::process::Command::new("unshare")
            .arg("--net")
            .arg(&exe)
            .args([
                "--exact",
                "proxy::orig_dst::tests::in_netns_redirect",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(IN_NETNS, "1")
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `unshare --net` ({e}); this test needs util-linux's unshare")
            });
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the in-namespace test failed ({}); it needs root (unshare --net), `ip` \
             (iproute2) and `iptables`/`ip6tables`:\n{stdout}\n{stderr}",
            out.status
        );
    }

    fn run(cmd: &str, args: &[&str]) {
        let out = std::process::Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// In the namespace: a NAT rule sends port 9 of each loopback address
    /// to a listener; the accepted socket reports port 9, while a direct
    /// (tracked, not NATed) connection still reports None.
    #[tokio::test]
    #[ignore = "run by redirected_connection_reports_where_it_was_going in a network namespace"]
    async fn in_netns_redirect() {
        assert!(
            std::env::var_os(IN_NETNS).is_some(),
            "only runs inside the namespace its outer test makes (it changes the NAT table)"
        );
        run("ip", &["link", "set", "lo", "up"]);
        for (tool, ip) in [("iptables", "127.0.0.1"), ("ip6tables", "::1")] {
            let listener = TcpListener::bind(SocketAddr::new(ip.parse().expect("ip"), 0))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let port = addr.port().to_string();
            run(
                tool,
                &[
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-d",
                    ip,
                    "--dport",
                    "9",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &port,
                ],
            );
            let dialled = SocketAddr::new(addr.ip(), 9);
            let (server, _client) = accept_one(&listener, dialled).await;
            assert_eq!(original_dst(&server), Some(dialled), "{tool}");
            let (direct, _client) = accept_one(&listener, addr).await;
            assert_eq!(original_dst(&direct), None, "{tool}: direct connection");
        }
    }
}
