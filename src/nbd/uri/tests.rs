//! Unit and property tests of URI parsing, display and connecting.

use std::io::{Read, Write};
use std::net::Shutdown;

use super::*;
use proptest::prelude::*;

fn tcp(host: &str, port: u16, export: &str, tls: bool) -> NbdUri {
    NbdUri {
        transport: Transport::Tcp {
            host: host.into(),
            port,
        },
        export: export.into(),
        tls,
    }
}

fn unix(path: &str, export: &str, tls: bool) -> NbdUri {
    NbdUri {
        transport: Transport::Unix { path: path.into() },
        export: export.into(),
        tls,
    }
}

#[test]
fn tcp_forms() {
    assert_eq!(
        parse("nbd://example.com"),
        Ok(tcp("example.com", 10809, "", false))
    );
    assert_eq!(
        parse("nbd://example.com/"),
        Ok(tcp("example.com", 10809, "", false))
    );
    assert_eq!(
        parse("nbd://127.0.0.1:10810/disk0"),
        Ok(tcp("127.0.0.1", 10810, "disk0", false))
    );
    assert_eq!(
        parse("nbd://[::1]:2000/a/b"),
        Ok(tcp("::1", 2000, "a/b", false))
    );
    assert_eq!(parse("nbd://[::1]/x"), Ok(tcp("::1", 10809, "x", false)));
    assert_eq!(parse("nbd:///"), Ok(tcp("localhost", 10809, "", false)));
    assert_eq!(parse("NBD://h//abs"), Ok(tcp("h", 10809, "/abs", false)));
    assert_eq!(
        parse("nbds://alice@h:1/e?tls-psk-file=k.psk"),
        Ok(tcp("h", 1, "e", true))
    );
    assert_eq!(parse("nbd+tcp://h:7"), Ok(tcp("h", 7, "", false)));
}

#[test]
fn unix_forms_and_percent_decoding() {
    assert_eq!(
        parse("nbd+unix:///?socket=/tmp/s.sock"),
        Ok(unix("/tmp/s.sock", "", false))
    );
    assert_eq!(
        parse("nbd+unix:///my%20disk?socket=/tmp/a%26b.sock"),
        Ok(unix("/tmp/a&b.sock", "my disk", false))
    );
    assert_eq!(
        parse("nbds+unix:///e?socket=s&tls-certificates=/c"),
        Ok(unix("s", "e", true))
    );
    assert_eq!(
        parse("nbd://h/%e2%82%ac"),
        Ok(tcp("h", 10809, "\u{20ac}", false))
    );
}

#[track_caller]
fn refused(uri: &str, needle: &str) {
    let why = parse(uri).expect_err(uri);
    assert!(
        why.contains(needle),
        "{uri}: {why:?} should mention {needle:?}"
    );
}

#[test]
fn refusals_say_what_is_wrong() {
    refused("http://h/", "unknown scheme");
    refused("nbd+vsock://2:10809", "vsock");
    refused("nbd+unix:///e", "missing ?socket");
    refused("nbd+unix:///e?socket=", "empty");
    refused("nbd+unix://host/e?socket=/s", "no host");
    refused("nbd://h:0/", "port");
    refused("nbd://h:65536/", "port");
    refused("nbd://h:+1/", "port");
    refused("nbd://h:x/", "port");
    refused("nbd://h/?foo=1", "unsupported query parameter");
    refused("nbd://h/?socket=/s", "only applies");
    refused("nbd://h/a%zz", "percent escape");
    refused("nbd://h/a%4", "percent escape");
    refused("nbd://h/%ff", "UTF-8");
    refused("nbd://h/#frag", "fragment");
    refused("nbd://[::1/", "closing");
    refused("nbd://[nope]/", "IPv6");
    refused("nbd://::1/", "IPv6");
    refused("/dev/sda", "not a URI");
    refused(&format!("nbd://h/{}", "a".repeat(MAX_URI_BYTES)), "limit");
    refused(&format!("nbd://h/{}", "a".repeat(4097)), "longer than 4096");
}

#[test]
fn recognises_nbd_uris_only() {
    assert!(is_nbd_uri("nbd://h"));
    assert!(is_nbd_uri("NBDS+unix:///?socket=x"));
    assert!(is_nbd_uri("nbd+vsock://1"));
    assert!(!is_nbd_uri("/tmp/nbd://x"));
    assert!(!is_nbd_uri("disk.qcow2"));
    assert!(!is_nbd_uri("http://h"));
    assert!(!is_nbd_uri("nbd:foo"));
}

#[test]
fn connect_sets_nodelay_and_names_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stream = tcp("127.0.0.1", port, "", false).connect().unwrap();
    let NbdStream::Tcp(ref tcp_stream) = stream else {
        panic!("expected TCP")
    };
    assert!(tcp_stream.nodelay().unwrap());
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(b"NBDMAGIC").unwrap();
    let mut reader = stream.try_clone().unwrap();
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"NBDMAGIC");
    stream.shutdown(Shutdown::Both).unwrap();
    assert_eq!(
        server.read(&mut magic).unwrap(),
        0,
        "peer should see EOF after shutdown"
    );
    drop(listener);
    let err = tcp("127.0.0.1", port, "", false).connect().unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    let err = unix("/nonexistent/dir/s.sock", "", false)
        .connect()
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/dir/s.sock"), "{err}");
}

proptest! {
    #[test]
    fn parse_never_panics(s in "\\PC{0,64}") {
        let _ = parse(&s);
        let _ = is_nbd_uri(&s);
    }

    #[test]
    fn parse_never_panics_on_nbd_like(
        scheme in "(nbd|nbds|nbd\\+unix|nbds\\+unix|nbd\\+vsock)",
        rest in "[a-z0-9:/?&=%\\[\\]@.#-]{0,40}",
    ) {
        let _ = parse(&format!("{scheme}://{rest}"));
    }

    #[test]
    fn display_round_trips(
        host in "[a-z][a-z0-9.-]{0,15}",
        port in 1u16..,
        export in "\\PC{0,20}",
        socket in "/[^\\x00]{1,30}",
        tls: bool,
    ) {
        let a = tcp(&host, port, &export, tls);
        prop_assert_eq!(parse(&a.to_string()), Ok(a));
        let b = unix(&socket, &export, tls);
        prop_assert_eq!(parse(&b.to_string()), Ok(b));
        let c = tcp("::1", port, &export, tls);
        prop_assert_eq!(parse(&c.to_string()), Ok(c));
    }
}
