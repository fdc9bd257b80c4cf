//! `lb-sockclient`: the socket-level load-balancing probe, run as its own process inside a
//! lab node's or pod's namespace and cgroup (the socket hooks act on the cgroup of the
//! process that makes the socket, so a thread of the test process would not do).
//!
//! * `tcp --target IP:PORT --count N [--max-seconds S] [--interval-ms I] [--timeout-ms T]`:
//!   N connections, one `GET /` each to an `lb-podserver`; per connection it records who
//!   answered (the body), what `getpeername` said, and whether it failed.
//! * `udp --target IP:PORT --count N [--connected] [--timeout-ms T]`: N datagrams; the
//!   unconnected form uses `sendto`/`recvfrom` and records each reply's source address;
//!   the connected form records `getpeername`.
//! * `refused --target IP:PORT [--timeout-ms T]`: one connect; records the error and how
//!   long it took.
//!
//! Each prints one line `RESULT {json}`. Every loop is bounded by a count and a duration.
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("tcp") => flags(&args[1..]).and_then(|f| tcp(&f)),
        Some("udp") => flags(&args[1..]).and_then(|f| udp(&f)),
        Some("refused") => flags(&args[1..]).and_then(|f| refused(&f)),
        _ => Err(usage()),
    };
    match result {
        Ok(json) => {
            println!("RESULT {json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb-sockclient: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage() -> String {
    "usage: lb-sockclient tcp --target IP:PORT --count N [--max-seconds S] [--interval-ms I] [--timeout-ms T]\n       \
     lb-sockclient udp --target IP:PORT --count N [--connected true] [--timeout-ms T]\n       \
     lb-sockclient refused --target IP:PORT [--timeout-ms T]"
        .into()
}

/// `--flag value` pairs.
fn flags(args: &[String]) -> Result<BTreeMap<String, String>, String> {
    lb_testkit::cli::flags(args, &usage())
}

fn get<T: std::str::FromStr>(
    f: &BTreeMap<String, String>,
    name: &str,
    default: Option<T>,
) -> Result<T, String> {
    match (f.get(name), default) {
        (Some(v), _) => v
            .parse()
            .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(format!("--{name} is required")),
    }
}

/// Tallies of one run.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    answered_by: BTreeMap<String, u64>,
    peers: BTreeMap<String, u64>,
}

impl Tally {
    fn fail(&mut self, e: &io::Error) {
        self.failed += 1;
        *self.errors.entry(e.to_string()).or_default() += 1;
    }

    fn json(&self, extra: serde_json::Value) -> String {
        let mut v = serde_json::json!({
            "ok": self.ok,
            "failed": self.failed,
            "errors": self.errors,
            "answered_by": self.answered_by,
            "peers": self.peers,
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v.to_string()
    }
}

fn tcp(f: &BTreeMap<String, String>) -> Result<String, String> {
    let target: SocketAddrV4 = get(f, "target", None)?;
    let count: u64 = get(f, "count", None)?;
    let max = Duration::from_secs(get(f, "max-seconds", Some(30))?);
    let interval = Duration::from_millis(get(f, "interval-ms", Some(0))?);
    let timeout = Duration::from_millis(get(f, "timeout-ms", Some(2000))?);
    let started = Instant::now();
    let mut t = Tally::default();
    let mut attempts = 0u64;
    while attempts < count && started.elapsed() < max {
        attempts += 1;
        match tcp_once(target, timeout) {
            Ok((body, peer)) => {
                t.ok += 1;
                *t.answered_by.entry(body).or_default() += 1;
                *t.peers.entry(peer.to_string()).or_default() += 1;
            }
            Err(e) => t.fail(&e),
        }
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    Ok(t.json(serde_json::json!({
        "attempts": attempts,
        "seconds": started.elapsed().as_secs_f64(),
    })))
}

/// One connection: `GET /`, the body (the pod's name) and `getpeername`.
fn tcp_once(target: SocketAddrV4, timeout: Duration) -> io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&target.into(), timeout)?;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(64 * 1024).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(io::Error::other(format!(
            "bad status: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok((body.trim().to_string(), peer))
}

fn udp(f: &BTreeMap<String, String>) -> Result<String, String> {
    let target: SocketAddrV4 = get(f, "target", None)?;
    let count: u64 = get(f, "count", None)?;
    let connected: bool = get(f, "connected", Some(false))?;
    let timeout = Duration::from_millis(get(f, "timeout-ms", Some(1000))?);
    let max = Duration::from_secs(get(f, "max-seconds", Some(30))?);
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    if connected {
        sock.connect(target).map_err(|e| format!("connect: {e}"))?;
    }
    let started = Instant::now();
    let mut t = Tally::default();
    let mut buf = [0u8; 2048];
    let mut attempts = 0u64;
    while attempts < count && started.elapsed() < max {
        attempts += 1;
        let payload = format!("probe-{attempts}");
        let r = if connected {
            sock.send(payload.as_bytes())
                .and_then(|_| sock.recv(&mut buf))
                .and_then(|n| Ok((n, sock.peer_addr()?)))
        } else {
            sock.send_to(payload.as_bytes(), target)
                .and_then(|_| sock.recv_from(&mut buf))
        };
        match r {
            Ok((n, from)) => {
                let reply = String::from_utf8_lossy(&buf[..n]);
                match reply.split_once(':') {
                    Some((name, echoed)) if echoed == payload => {
                        t.ok += 1;
                        *t.answered_by.entry(name.to_string()).or_default() += 1;
                        *t.peers.entry(from.to_string()).or_default() += 1;
                    }
                    _ => t.fail(&io::Error::other(format!("unexpected reply {reply:?}"))),
                }
            }
            Err(e) => t.fail(&e),
        }
    }
    Ok(t.json(serde_json::json!({
        "attempts": attempts,
        "seconds": started.elapsed().as_secs_f64(),
    })))
}

fn refused(f: &BTreeMap<String, String>) -> Result<String, String> {
    let target: SocketAddrV4 = get(f, "target", None)?;
    let timeout = Duration::from_millis(get(f, "timeout-ms", Some(2000))?);
    let started = Instant::now();
    let r = TcpStream::connect_timeout(&target.into(), timeout);
    let micros = started.elapsed().as_micros() as u64;
    let (error, errno) = match &r {
        Ok(_) => (None, 0),
        Err(e) => (Some(e.to_string()), e.raw_os_error().unwrap_or(0)),
    };
    Ok(serde_json::json!({
        "connected": r.is_ok(),
        "error": error,
        "errno": errno,
        "micros": micros,
    })
    .to_string())
}
