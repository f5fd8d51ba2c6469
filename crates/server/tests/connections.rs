//! Clients cannot hold the server: headers sent a byte at a time (slowloris) and connections
//! that send nothing (fresh, or kept alive after a request) are closed after the header
//! timeout, and connections past the cap are closed on arrival while the ones inside it are
//! served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use gemma_server::ServerConfig;

/// Reads until the server closes the connection (or `limit` passes); returns how long it took.
fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

fn open(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}

#[test]
fn slow_headers_idle_connections_and_too_many_connections_are_closed() {
    let server = start_server_with(ServerConfig {
        port: 0,
        parallel: 1,
        ctx_size: 512,
        max_connections: 2,
        header_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    });
    let addr = server.addr;

    // Slowloris: a header byte every 300 ms never completes; the server hangs up after ~2 s.
    let mut slow = open(addr);
    let sender = {
        let mut writer = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Pad: aaaaaaaaaaaa"
            {
                if writer.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let waited = time_to_close(&mut slow, Duration::from_secs(15));
    assert!(
        waited < Duration::from_secs(6),
        "a slow client held on for {waited:?}"
    );
    sender.join().unwrap();

    // Two idle connections fill the cap: a third is closed at once...
    let mut idle = [open(addr), open(addr)];
    std::thread::sleep(Duration::from_millis(200));
    let mut third = open(addr);
    let waited = time_to_close(&mut third, Duration::from_secs(10));
    assert!(
        waited < Duration::from_secs(1),
        "over the cap, closed after {waited:?}"
    );
    // ...the idle ones are dropped after the header timeout, and then requests are served.
    for conn in &mut idle {
        let waited = time_to_close(conn, Duration::from_secs(15));
        assert!(
            waited < Duration::from_secs(6),
            "an idle client held on for {waited:?}"
        );
    }
    let r = post(addr, "/v1/chat/completions", &chat_body("Hi", 1));
    assert_eq!(r.status, 200, "{}", r.text());

    // A kept-alive connection that goes quiet after a request is closed the same way.
    let mut kept = open(addr);
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reader = std::io::BufReader::new(kept.try_clone().unwrap());
    let (status, headers) = read_head(&mut reader);
    assert_eq!(status, 200);
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close")),
        "the connection is kept alive: {headers:?}"
    );
    let started = Instant::now();
    let waited = time_to_close(&mut kept, Duration::from_secs(15));
    assert!(
        waited < Duration::from_secs(6) && started.elapsed() >= Duration::from_secs(1),
        "an idle kept-alive client held on for {waited:?}"
    );
    server.stop().unwrap();
}
