//! `lb-podserver`: the backend run inside pod namespaces. HTTP answers every GET with
//! `NAME\n` (`GET /bytes/N`: N bytes of `a`..`z` repeating, up to 16 MiB), UDP echoes `NAME:` + payload, the line server answers each line with
//! `NAME:` + line. Prints `ready` once every socket is bound; exits 0 on SIGTERM/SIGINT and
//! when its parent goes away.
//!
//! Usage: `lb-podserver --name NAME [--http PORT]... [--udp PORT]... [--line PORT]...`
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Idle connections are closed after this long without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Concurrent TCP connections (HTTP and line) beyond this are closed at once.
const MAX_CONNS: usize = 1024;
/// Longest request line, header line or echo line accepted.
const MAX_LINE: u64 = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Largest `GET /bytes/N` answer.
const MAX_BYTES_BODY: usize = 16 << 20;

/// `n` bytes of a fixed pattern (`a`..`z` repeating), which a client can check byte by byte.
fn bytes_body(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// Largest request body read (and discarded).
const MAX_BODY: u64 = 1 << 20;

static STOP: AtomicBool = AtomicBool::new(false);
static CONNS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(Debug, Default)]
struct Args {
    name: String,
    http: Vec<u16>,
    udp: Vec<u16>,
    line: Vec<u16>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args::default();
    let mut name = None;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let port = || {
            value
                .parse::<u16>()
                .map_err(|_| format!("{flag}: bad port {value:?}"))
        };
        match flag.as_str() {
            "--name" => name = Some(value.clone()),
            "--http" => args.http.push(port()?),
            "--udp" => args.udp.push(port()?),
            "--line" => args.line.push(port()?),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    args.name = name.ok_or("--name is required")?;
    if args.name.contains(['\n', '\r']) {
        return Err("--name must be one line".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lb-podserver: {e}");
            eprintln!(
                "usage: lb-podserver --name NAME [--http PORT]... [--udp PORT]... [--line PORT]..."
            );
            exit(2);
        }
    };
    install_signal_handlers();
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let name: Arc<str> = Arc::from(args.name.as_str());

    let bind_tcp = |port: u16| {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| {
            eprintln!("lb-podserver {name}: bind tcp/{port}: {e}");
            exit(1);
        })
    };
    let http: Vec<TcpListener> = args.http.iter().map(|&p| bind_tcp(p)).collect();
    let line: Vec<TcpListener> = args.line.iter().map(|&p| bind_tcp(p)).collect();
    let udp: Vec<UdpSocket> = args
        .udp
        .iter()
        .map(|&p| {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p)).unwrap_or_else(|e| {
                eprintln!("lb-podserver {name}: bind udp/{p}: {e}");
                exit(1);
            })
        })
        .collect();

    for l in http {
        let name = Arc::clone(&name);
        thread::spawn(move || accept_loop(l, name, serve_http));
    }
    for l in line {
        let name = Arc::clone(&name);
        thread::spawn(move || accept_loop(l, name, serve_lines));
    }
    for s in udp {
        let name = Arc::clone(&name);
        thread::spawn(move || serve_udp(s, &name));
    }

    let mut out = io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        exit(1);
    }
    drop(out);

    loop {
        thread::sleep(Duration::from_millis(100));
        if STOP.load(Ordering::SeqCst) {
            eprintln!("lb-podserver {name}: stopping on signal");
            exit(0);
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            eprintln!("lb-podserver {name}: parent exited, stopping");
            exit(0);
        }
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised (zeroed, then the fields we need).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                eprintln!("lb-podserver: sigaction: {}", io::Error::last_os_error());
                exit(1);
            }
        }
    }
}

/// Decrements the connection count when a connection thread ends.
struct ConnSlot;

impl Drop for ConnSlot {
    fn drop(&mut self) {
        CONNS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    serve: fn(TcpStream, SocketAddr, &str) -> io::Result<()>,
) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("lb-podserver {name}: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if CONNS.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
            CONNS.fetch_sub(1, Ordering::SeqCst);
            eprintln!("lb-podserver {name}: too many connections, closing {peer}");
            continue;
        }
        let slot = ConnSlot;
        let conn_name = Arc::clone(&name);
        let spawned = thread::Builder::new().spawn(move || {
            let _slot = slot;
            let name = conn_name;
            if let Err(e) = configure(&stream).and_then(|()| serve(stream, peer, &name)) {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("lb-podserver {name}: connection from {peer}: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("lb-podserver {name}: spawning a connection thread: {e}");
        }
    }
}

fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)
}

/// Reads one line (at most [`MAX_LINE`] bytes) without its line ending; `None` at a clean
/// EOF.
fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut buf = String::new();
    let n = reader.by_ref().take(MAX_LINE).read_line(&mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if n as u64 >= MAX_LINE {
                "line too long"
            } else {
                "EOF in the middle of a line"
            },
        ));
    }
    let trimmed = buf.trim_end_matches(['\r', '\n']).len();
    buf.truncate(trimmed);
    Ok(Some(buf))
}

fn serve_http(stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = HttpOut { stream, peer, name };
    loop {
        let Some(request_line) = read_line(&mut reader)? else {
            return Ok(());
        };
        if request_line.is_empty() {
            continue; // stray CRLF between requests (RFC 9112 section 2.2)
        }
        let mut parts = request_line.split_whitespace();
        let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(t), Some(v)) => (m.to_owned(), t.to_owned(), v.to_owned()),
            _ => {
                out.respond(400, "Bad Request", "bad request line\n", false, false)?;
                return Ok(());
            }
        };
        let mut content_length: u64 = 0;
        let mut conn_close = false;
        let mut conn_keep_alive = false;
        let mut chunked = false;
        let mut headers = 0;
        loop {
            let Some(h) = read_line(&mut reader)? else {
                return Ok(()); // EOF inside the headers
            };
            if h.is_empty() {
                break;
            }
            headers += 1;
            if headers > MAX_HEADERS {
                out.respond(
                    431,
                    "Request Header Fields Too Large",
                    "too many headers\n",
                    false,
                    false,
                )?;
                return Ok(());
            }
            let Some((k, v)) = h.split_once(':') else {
                out.respond(400, "Bad Request", "bad header\n", false, false)?;
                return Ok(());
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                content_length = match v.parse() {
                    Ok(n) if n <= MAX_BODY => n,
                    _ => {
                        out.respond(400, "Bad Request", "bad content-length\n", false, false)?;
                        return Ok(());
                    }
                };
            } else if k.eq_ignore_ascii_case("connection") {
                for token in v.split(',').map(str::trim) {
                    conn_close |= token.eq_ignore_ascii_case("close");
                    conn_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        if chunked {
            out.respond(
                501,
                "Not Implemented",
                "chunked requests unsupported\n",
                false,
                false,
            )?;
            return Ok(());
        }
        io::copy(&mut reader.by_ref().take(content_length), &mut io::sink())?;
        let keep_alive = match version.as_str() {
            "HTTP/1.1" => !conn_close,
            "HTTP/1.0" => conn_keep_alive && !conn_close,
            _ => false,
        };
        let body = match target.strip_prefix("/bytes/").map(str::parse::<usize>) {
            Some(Ok(n)) if n <= MAX_BYTES_BODY => bytes_body(n),
            Some(_) => {
                out.respond(400, "Bad Request", "bad /bytes/N\n", false, false)?;
                return Ok(());
            }
            None => format!("{name}\n"),
        };
        match method.as_str() {
            "GET" => out.respond(200, "OK", &body, keep_alive, false)?,
            "HEAD" => out.respond(200, "OK", &body, keep_alive, true)?,
            _ => {
                out.respond(
                    405,
                    "Method Not Allowed",
                    "only GET and HEAD\n",
                    false,
                    false,
                )?;
                return Ok(());
            }
        }
        if !keep_alive {
            return Ok(());
        }
    }
}

/// The writing half of an HTTP connection.
struct HttpOut<'a> {
    stream: TcpStream,
    peer: SocketAddr,
    name: &'a str,
}

impl HttpOut<'_> {
    /// Writes one response; `X-Served-By` and `X-Peer` (the client address as the pod
    /// sees it) help tests check where a request went and whether it was SNATed.
    fn respond(
        &mut self,
        status: u16,
        reason: &str,
        body: &str,
        keep_alive: bool,
        head_only: bool,
    ) -> io::Result<()> {
        let (name, peer) = (self.name, self.peer);
        let mut msg = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: {}\r\nX-Served-By: {name}\r\nX-Peer: {peer}\r\n\r\n",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        );
        if !head_only {
            msg.push_str(body);
        }
        self.stream.write_all(msg.as_bytes())?;
        self.stream.flush()
    }
}

fn serve_lines(stream: TcpStream, _peer: SocketAddr, name: &str) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(line) = read_line(&mut reader)? {
        out.write_all(format!("{name}:{line}\n").as_bytes())?;
    }
    Ok(())
}

fn serve_udp(sock: UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65_536];
    let prefix = format!("{name}:");
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("lb-podserver {name}: udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut reply = Vec::with_capacity(prefix.len() + n);
        reply.extend_from_slice(prefix.as_bytes());
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = sock.send_to(&reply, peer) {
            eprintln!("lb-podserver {name}: udp reply to {peer}: {e}");
        }
    }
}
