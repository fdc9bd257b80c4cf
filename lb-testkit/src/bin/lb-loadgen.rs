//! `lb-loadgen`: the benchmark's load generator and server, run inside lab namespaces.
//!
//! * `server --id N --tcp PORTS --udp PORTS`: answers every byte received on a TCP
//!   connection with one byte `N` (ping-pong), every UDP datagram with one byte `N`, except
//!   datagrams starting with `F` (flood: counted, not answered), `Q` (answers
//!   `flood=<packets> bytes=<bytes>`) and `Z` (resets the flood counters). PORTS is `P` or
//!   `P-Q`. Prints `ready` once bound; exits when its parent goes away or after
//!   `--max-seconds`.
//! * `client --mode tcp_rr|tcp_crr|udp_rr --target IP:PORT --count N --max-seconds S`: runs
//!   N transactions (1-byte request, 1-byte reply; `tcp_crr` opens a new connection for
//!   each), times each with the monotonic clock and prints one line
//!   `RESULT {json}` with the percentiles, transactions/s, errors and replies per server id.
//! * `flood --target IP:PORT --count N --max-seconds S --flows F --size B`: sends small UDP
//!   datagrams (`F` + padding) as fast as it can over F connected sockets and prints
//!   `RESULT {json}` with the count sent.
//!
//! * `synflood --iface IF --dst-mac MAC --target IP:PORT --count N --max-seconds S`: TCP
//!   SYNs from spoofed sources as raw frames (the SYN-flood test), `RESULT {json}`.
//!
//! Every loop is bounded by a count and a duration.
use std::collections::BTreeMap;

use lb_testkit::cli::{get, get_or};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Longest a server lives when nobody stops it.
const DEFAULT_SERVER_SECONDS: u64 = 3600;
/// Datagrams per `sendmmsg`/`recvmmsg` call.
const BATCH: usize = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("server") => server(&args[1..]),
        Some("client") => client(&args[1..]),
        Some("flood") => flood(&args[1..]),
        Some("synflood") => synflood(&args[1..]),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage() -> String {
    "usage: lb-loadgen server --id N --tcp PORTS --udp PORTS [--max-seconds S]\n       \
     lb-loadgen client --mode tcp_rr|tcp_crr|udp_rr --target IP:PORT --count N --max-seconds S [--warmup W] [--timeout-ms T]\n       \
     lb-loadgen flood --target IP:PORT --count N --max-seconds S [--flows F] [--size B]\n       \
     lb-loadgen synflood --iface IF --dst-mac MAC --target IP:PORT --count N --max-seconds S [--src-net A.B]"
        .into()
}

/// `--flag value` pairs.
fn flags(args: &[String]) -> Result<BTreeMap<String, String>, String> {
    lb_testkit::cli::flags(args, &usage())
}

/// `P` or `P-Q` (inclusive).
fn port_range(s: &str) -> Result<Vec<u16>, String> {
    let bad = || format!("bad port range {s:?}");
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b): (u16, u16) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            Ok((a..=b).collect())
        }
        None => Ok(vec![s.parse().map_err(|_| bad())?]),
    }
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

// ---------------------------------------------------------------------------------------------
// server

fn server(args: &[String]) -> Result<(), String> {
    let f = flags(args)?;
    let id: u8 = get(&f, "id")?;
    let tcp_ports = port_range(&get::<String>(&f, "tcp")?)?;
    let udp_ports = port_range(&get::<String>(&f, "udp")?)?;
    let max = Duration::from_secs(get_or(&f, "max-seconds", DEFAULT_SERVER_SECONDS)?);
    let listeners = tcp_ports
        .iter()
        .map(|p| {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, *p))
                .map_err(io_err(&format!("bind TCP {p}")))?;
            l.set_nonblocking(true).map_err(io_err("nonblocking"))?;
            Ok(l)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let udps = udp_ports
        .iter()
        .map(|p| {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, *p))
                .map_err(io_err(&format!("bind UDP {p}")))?;
            s.set_nonblocking(true).map_err(io_err("nonblocking"))?;
            set_rcvbuf(&s, 8 << 20);
            Ok(s)
        })
        .collect::<Result<Vec<_>, String>>()?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let deadline = Instant::now() + max;
    println!("ready");
    let _ = io::stdout().flush();
    let flag = AtomicBool::new(false);
    let stop = Stop {
        flag: &flag,
        parent,
        deadline,
    };
    std::thread::scope(|s| {
        s.spawn(|| tcp_loop(&listeners, id, &stop));
        udp_loop(&udps, id, &stop);
    });
    Ok(())
}

/// When the server loops end: `stop` set, `deadline` passed, or the parent gone.
struct Stop<'a> {
    flag: &'a AtomicBool,
    parent: libc::pid_t,
    deadline: Instant,
}

impl Stop<'_> {
    fn now(&self) -> bool {
        // SAFETY: getppid has no preconditions.
        self.flag.load(Ordering::Relaxed)
            || Instant::now() >= self.deadline
            || unsafe { libc::getppid() } != self.parent
    }
}

fn set_rcvbuf(s: &impl AsRawFd, bytes: libc::c_int) {
    // SAFETY: setsockopt with a valid int option value; failure only leaves the default.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> usize {
    // SAFETY: `fds` is a valid array of pollfd of the length passed.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    n.max(0) as usize
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// One thread serves every TCP connection with poll(2): ping-pong needs no per-connection
/// thread, and a new connection costs no thread start (which would add to TCP_CRR).
fn tcp_loop(listeners: &[TcpListener], id: u8, stop: &Stop) {
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 256];
    let reply = [id; 256];
    while !stop.now() {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| pollfd(l.as_raw_fd()))
            .chain(conns.iter().map(|c| pollfd(c.as_raw_fd())))
            .collect();
        if poll(&mut fds, 200) == 0 {
            continue;
        }
        let mut closed = Vec::new();
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            if i < listeners.len() {
                while let Ok((c, _)) = listeners[i].accept() {
                    let _ = c.set_nodelay(true);
                    let _ = c.set_nonblocking(true);
                    conns.push(c);
                }
                continue;
            }
            let ci = i - listeners.len();
            match conns[ci].read(&mut buf) {
                Ok(0) => closed.push(ci),
                Ok(n) => {
                    // One reply byte per request byte; a short write only happens with a
                    // full send buffer, which 1-byte ping-pong never fills.
                    if conns[ci].write_all(&reply[..n]).is_err() {
                        closed.push(ci);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => closed.push(ci),
            }
        }
        for ci in closed.into_iter().rev() {
            conns.swap_remove(ci);
        }
    }
}

fn udp_loop(socks: &[UdpSocket], id: u8, stop: &Stop) {
    let (mut flood_pkts, mut flood_bytes) = (0u64, 0u64);
    let mut bufs = vec![[0u8; 2048]; BATCH];
    while !stop.now() {
        let mut fds: Vec<libc::pollfd> = socks.iter().map(|s| pollfd(s.as_raw_fd())).collect();
        if poll(&mut fds, 200) == 0 {
            continue;
        }
        for (s, fd) in socks.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            loop {
                let got = recv_batch(s, &mut bufs);
                if got.is_empty() {
                    break;
                }
                for (len, from, i) in got {
                    let msg = &bufs[i][..len];
                    match msg.first() {
                        Some(b'F') => {
                            flood_pkts += 1;
                            flood_bytes += len as u64;
                        }
                        Some(b'Q') => {
                            let r = format!("flood={flood_pkts} bytes={flood_bytes}");
                            let _ = s.send_to(r.as_bytes(), from);
                        }
                        Some(b'Z') => {
                            flood_pkts = 0;
                            flood_bytes = 0;
                            let _ = s.send_to(b"ok", from);
                        }
                        _ => {
                            let _ = s.send_to(&[id], from);
                        }
                    }
                }
            }
        }
    }
}

/// Up to [`BATCH`] datagrams with one `recvmmsg`: (length, sender, buffer index).
fn recv_batch(s: &UdpSocket, bufs: &mut [[u8; 2048]]) -> Vec<(usize, SocketAddr, usize)> {
    let n = bufs.len();
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; n];
    // SAFETY: mmsghdr is plain data; zeroed is a valid value, filled in below.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; n];
    for i in 0..n {
        msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
        msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every msghdr points at live buffers, addresses and iovecs of the sizes given.
    let got = unsafe {
        libc::recvmmsg(
            s.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got <= 0 {
        return Vec::new();
    }
    (0..got as usize)
        .map(|i| {
            let a = &addrs[i];
            let from = SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ));
            (msgs[i].msg_len as usize, from, i)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// client

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    TcpRr,
    TcpCrr,
    UdpRr,
}

struct Transactor {
    mode: Mode,
    target: SocketAddrV4,
    timeout: Duration,
    tcp: Option<TcpStream>,
    udp: Option<UdpSocket>,
}

impl Transactor {
    /// One request/response; returns the server id that answered.
    fn once(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        match self.mode {
            Mode::TcpCrr => {
                let mut c = TcpStream::connect_timeout(&SocketAddr::V4(self.target), self.timeout)?;
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(self.timeout))?;
                c.write_all(b"x")?;
                c.read_exact(&mut b)?;
                Ok(b[0])
            }
            Mode::TcpRr => {
                if self.tcp.is_none() {
                    let c = TcpStream::connect_timeout(&SocketAddr::V4(self.target), self.timeout)?;
                    c.set_nodelay(true)?;
                    c.set_read_timeout(Some(self.timeout))?;
                    c.set_write_timeout(Some(self.timeout))?;
                    self.tcp = Some(c);
                }
                let r = match self.tcp.as_mut() {
                    Some(c) => c.write_all(b"x").and_then(|()| c.read_exact(&mut b)),
                    None => Err(io::Error::other("no connection")),
                };
                if r.is_err() {
                    self.tcp = None; // reconnect on the next transaction
                }
                r.map(|()| b[0])
            }
            Mode::UdpRr => {
                if self.udp.is_none() {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    s.connect(self.target)?;
                    s.set_read_timeout(Some(self.timeout))?;
                    self.udp = Some(s);
                }
                let s = self
                    .udp
                    .as_ref()
                    .ok_or_else(|| io::Error::other("no socket"))?;
                s.send(b"x")?;
                // A reply that arrives after its request timed out would be read as the next
                // request's: skip anything that is not a 1-byte reply.
                loop {
                    let mut buf = [0u8; 64];
                    let n = s.recv(&mut buf)?;
                    if n == 1 {
                        return Ok(buf[0]);
                    }
                }
            }
        }
    }
}

fn client(args: &[String]) -> Result<(), String> {
    let f = flags(args)?;
    let mode = match get::<String>(&f, "mode")?.as_str() {
        "tcp_rr" => Mode::TcpRr,
        "tcp_crr" => Mode::TcpCrr,
        "udp_rr" => Mode::UdpRr,
        m => return Err(format!("unknown mode {m:?}")),
    };
    let target: SocketAddrV4 = get(&f, "target")?;
    let count: u64 = get(&f, "count")?;
    let max = Duration::from_secs_f64(get(&f, "max-seconds")?);
    let warmup: u64 = get_or(&f, "warmup", 50)?;
    let timeout = Duration::from_millis(get_or(&f, "timeout-ms", 1000)?);
    let mut t = Transactor {
        mode,
        target,
        timeout,
        tcp: None,
        udp: None,
    };
    let deadline = Instant::now() + max;
    for _ in 0..warmup {
        if Instant::now() >= deadline {
            break;
        }
        let _ = t.once();
    }
    let mut samples: Vec<u64> = Vec::with_capacity(count as usize);
    let mut by_id: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0u64;
    let mut last_error = String::new();
    let start = Instant::now();
    while (samples.len() as u64) < count && Instant::now() < deadline {
        let t0 = Instant::now();
        match t.once() {
            Ok(id) => {
                samples.push(t0.elapsed().as_nanos() as u64);
                *by_id.entry(id.to_string()).or_default() += 1;
            }
            Err(e) => {
                errors += 1;
                last_error = e.to_string();
                if errors > count / 10 + 10 {
                    break; // the path is broken; report what we have
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    let pct = |p: f64| percentile(&samples, p) as f64 / 1000.0;
    let mean = if samples.is_empty() {
        0.0
    } else {
        samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0
    };
    let out = serde_json::json!({
        "mode": get::<String>(&f, "mode")?,
        "target": target.to_string(),
        "count": samples.len(),
        "errors": errors,
        "last_error": last_error,
        "elapsed_s": elapsed,
        "tps": if elapsed > 0.0 { samples.len() as f64 / elapsed } else { 0.0 },
        "min_us": pct(0.0),
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "max_us": pct(100.0),
        "mean_us": mean,
        "replies_by_id": by_id,
    });
    println!("RESULT {out}");
    Ok(())
}

/// Nearest-rank percentile of sorted `v` (0 when empty).
fn percentile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// flood

fn flood(args: &[String]) -> Result<(), String> {
    let f = flags(args)?;
    let target: SocketAddrV4 = get(&f, "target")?;
    let count: u64 = get(&f, "count")?;
    let max = Duration::from_secs_f64(get(&f, "max-seconds")?);
    let flows: usize = get_or(&f, "flows", 16)?;
    let size: usize = get_or(&f, "size", 18)?;
    if flows == 0 || size == 0 || size > 1400 {
        return Err("--flows must be > 0 and --size in 1..=1400".into());
    }
    let socks = (0..flows)
        .map(|_| {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(io_err("bind"))?;
            s.connect(target).map_err(io_err("connect"))?;
            Ok(s)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut payload = vec![0u8; size];
    payload[0] = b'F';
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain data; zeroed is valid, then pointed at the one payload iovec.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let (mut sent, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + max;
    let mut k = 0usize;
    while sent < count && Instant::now() < deadline {
        let want = (count - sent).min(BATCH as u64) as usize;
        let s = &socks[k % flows];
        k += 1;
        // SAFETY: `msgs[..want]` are valid mmsghdrs pointing at `payload`.
        let n =
            unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), want as libc::c_uint, 0) };
        if n < 0 {
            errors += 1;
            if errors > 1_000_000 {
                break;
            }
        } else {
            sent += n as u64;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "sent": sent,
        "errors": errors,
        "elapsed_s": elapsed,
        "pps": if elapsed > 0.0 { sent as f64 / elapsed } else { 0.0 },
        "flows": flows,
        "size": size,
    });
    println!("RESULT {out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// synflood

/// `synflood --iface IF --dst-mac MAC --target IP:PORT --count N --max-seconds S
/// [--src-net A.B]`: N TCP SYNs with spoofed sources `A.B.x.y` (random ports), written as
/// raw Ethernet frames to `IF` (`AF_PACKET`). Prints `RESULT {"sent":..,"seconds":..}`.
fn synflood(args: &[String]) -> Result<(), String> {
    let f = flags(args)?;
    let iface: String = get(&f, "iface")?;
    let mac = parse_mac(&get::<String>(&f, "dst-mac")?)?;
    let target: SocketAddrV4 = get(&f, "target")?;
    let count: u64 = get(&f, "count")?;
    let max = Duration::from_secs_f64(get(&f, "max-seconds")?);
    let net: String = get_or(&f, "src-net", "10.250".to_string())?;
    let (a, b) = net
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u8>().ok()?, b.parse::<u8>().ok()?)))
        .ok_or("--src-net must be A.B")?;
    let cif = std::ffi::CString::new(iface.clone()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cif.as_ptr()) };
    if ifindex == 0 {
        return Err(format!("no interface {iface}"));
    }
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: fd is ours; OwnedFd closes it.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below complete it.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&mac);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < count && started.elapsed() < max {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let src = SocketAddrV4::new(
            Ipv4Addr::new(a, b, (rng >> 8) as u8, (rng >> 16) as u8 | 1),
            1024 + (rng >> 24) as u16 % 60000,
        );
        let mut p = lb_testkit::packet::Pkt::tcp(src, target, lb_testkit::packet::TCP_SYN);
        p.dst_mac = mac;
        let frame = p.build();
        // SAFETY: frame and sll are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            return Err(format!("sendto: {e}"));
        }
        sent += 1;
    }
    println!(
        "RESULT {}",
        serde_json::json!({"sent": sent, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("MAC {s:?}: {e}"))?;
    parts
        .try_into()
        .map_err(|_| format!("MAC {s:?}: need 6 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn parses_port_ranges() {
        assert_eq!(port_range("8080").expect("single"), vec![8080]);
        assert_eq!(
            port_range("8080-8082").expect("range"),
            vec![8080, 8081, 8082]
        );
        assert!(port_range("9-8").is_err());
        assert!(port_range("x").is_err());
    }

    #[test]
    fn loopback_round_trips() {
        // Server and clients over 127.0.0.1 in this process's namespace: no lab needed.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        u.set_nonblocking(true).expect("nonblocking");
        let uport = u.local_addr().expect("addr").port();
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        let flag = AtomicBool::new(false);
        let stop = Stop {
            flag: &flag,
            parent,
            deadline: Instant::now() + Duration::from_secs(30),
        };
        std::thread::scope(|s| {
            s.spawn(|| tcp_loop(std::slice::from_ref(&l), 7, &stop));
            s.spawn(|| udp_loop(std::slice::from_ref(&u), 7, &stop));
            for mode in [Mode::TcpRr, Mode::TcpCrr, Mode::UdpRr] {
                let p = if mode == Mode::UdpRr { uport } else { port };
                let mut t = Transactor {
                    mode,
                    target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, p),
                    timeout: Duration::from_secs(2),
                    tcp: None,
                    udp: None,
                };
                for _ in 0..3 {
                    assert_eq!(t.once().expect("transaction"), 7);
                }
            }
            let q = UdpSocket::bind("127.0.0.1:0").expect("bind");
            q.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            q.connect(("127.0.0.1", uport)).expect("connect");
            q.send(b"Fxx").expect("flood");
            q.send(b"Q").expect("query");
            let mut buf = [0u8; 64];
            let n = q.recv(&mut buf).expect("stats");
            assert_eq!(&buf[..n], b"flood=1 bytes=3");
            flag.store(true, Ordering::Relaxed);
        });
    }
}
