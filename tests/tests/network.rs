//! TCP and UDP: connections inside the job keep every byte in flight; listeners and bound sockets come back on
//! their ports with their options; outside clients see a reset and reconnect, or (`--tcp-established`) keep
//! their connection.

use std::net::{TcpStream, UdpSocket};
use std::time::Duration;
use vos_tests::*;

/// A port for this test: distinct per test and per run.
fn port(base: u16) -> u16 {
    base + (std::process::id() % 500) as u16
}

#[test]
fn tcp_connection_inside_the_job() {
    let w = Work::new("tcp");
    let prog = gcc("tcp_pingpong");
    let p = port(21000).to_string();
    // The program itself checks that its listener is back on its port with its options.
    twice("tcp", &[prog.to_str().unwrap(), &p, "200"], 200, &w);
}

fn udp_inc(port: u16) -> i64 {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.send_to(b"inc", ("127.0.0.1", port)).unwrap();
    let mut b = [0u8; 64];
    let n = u.recv(&mut b).unwrap();
    String::from_utf8_lossy(&b[..n]).trim().parse().unwrap()
}

/// Wait until something listens on `port` again (the restored job's sockets exist).
fn wait_listening(port: u16) {
    let t = std::time::Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing listens on {port} after the restore");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn server(w: &Work, name: &str, port: u16) -> Running {
    let prog = gcc("counter_server");
    let out = w.path("out.txt");
    let job = launch(w, name, &[prog.to_str().unwrap(), &port.to_string()], &out);
    wait_for(&out, "the server listening", Duration::from_secs(10), |s| s.contains("listening"));
    job
}

#[test]
fn outside_client_sees_a_reset_and_reconnects() {
    let w = Work::new("tcp-reset");
    let port = port(21500);
    let name = w.name("counter");
    let mut job = server(&w, &name, port);
    let mut c = LineClient::connect(&format!("127.0.0.1:{port}"));
    let opts = c.ask("opt").unwrap();
    let mut expect = 1;
    for round in 1..=2 {
        for _ in 0..3 {
            assert_eq!(c.inc(), expect);
            expect += 1;
        }
        assert_eq!(udp_inc(port), expect);
        expect += 1;
        let img = job.checkpoint_kill();
        job = restore(&w, &name, &img, &w.path(&format!("restore{round}.out")));
        // The old connection is gone: the client sees it reset or closed, then reconnects to the same port.
        assert!(c.ask("inc").is_err(), "the connection to the old server still answers");
        wait_listening(port);
        c = LineClient::connect(&format!("127.0.0.1:{port}"));
        assert_eq!(c.ask("opt").unwrap(), opts, "the listener's or connection's options changed");
        assert_eq!(c.inc(), expect, "the counter did not go on where it was");
        expect += 1;
        assert_eq!(udp_inc(port), expect, "the UDP socket did not come back on its port");
        expect += 1;
    }
    drop(job);
}

#[test]
fn tcp_established_keeps_the_connection() {
    let w = Work::new("tcp-established");
    let port = port(22000);
    let name = w.name("counter");
    let mut job = server(&w, &name, port);
    let mut c = LineClient::connect(&format!("127.0.0.1:{port}"));
    let mut expect = 1;
    for round in 1..=2 {
        for _ in 0..3 {
            assert_eq!(c.inc(), expect);
            expect += 1;
        }
        // On one host nothing holds the connection between the checkpoint and the restore: a segment of the
        // client's then (even a delayed ACK) would be answered by a reset. Let the connection go quiet first;
        // a migration withdraws the job's address instead, and needs no such pause.
        std::thread::sleep(Duration::from_millis(300));
        let img = job.checkpoint_kill_with(&["--tcp-established"]);
        job = restore(&w, &name, &img, &w.path(&format!("restore{round}.out")));
        wait_listening(port);
        // The same connection goes on: no request lost or repeated.
        assert_eq!(c.inc(), expect, "the kept connection lost its place");
        expect += 1;
        assert_eq!(c.ask("opt").unwrap().split(' ').next_back(), Some("1"), "TCP_NODELAY was lost");
    }
    drop(job);
}

#[test]
fn map_addr_moves_the_listener() {
    let w = Work::new("map-addr");
    let (old, new) = (port(23000), port(23000) + 600);
    let name = w.name("counter");
    let job = server(&w, &name, old);
    let mut c = LineClient::connect(&format!("127.0.0.1:{old}"));
    assert_eq!(c.inc(), 1);
    let img = job.checkpoint_kill();
    let mut cmd = vrun();
    cmd.args(["restore", "--name", &name, "--dir"]).arg(&w.dir);
    // The TCP listener is on [::] and the UDP socket on 0.0.0.0: one map each.
    cmd.args(["--map-addr", &format!("[::]:{old}=[::]:{new}"), "--map-addr", &format!("0.0.0.0:{old}=0.0.0.0:{new}")]).arg(&img);
    let job = spawn(cmd, &name, &w.path("restore.out"), &w.path("vrun.err"));
    wait_listening(new);
    assert_eq!(LineClient::connect(&format!("127.0.0.1:{new}")).inc(), 2, "the counter did not go on at the new port");
    assert_eq!(udp_inc(new), 3, "the UDP socket did not move to the new port");
    assert!(TcpStream::connect(("127.0.0.1", old)).is_err(), "something still listens on the old port");
    drop(job);
}
