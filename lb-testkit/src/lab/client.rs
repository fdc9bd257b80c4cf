//! Small real clients (HTTP/1.1 GET, UDP request/reply, line-oriented TCP, ICMP echo),
//! plain std and blocking, meant to run inside [`super::Netns::enter`].
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Largest HTTP response [`http_request`] accepts.
const MAX_RESPONSE: u64 = 16 << 20;

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn timed_out(what: &str, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: no answer within {timeout:?}"),
    )
}

/// Maps the platform's "read timed out" (`WouldBlock` for SO_RCVTIMEO) to `TimedOut`.
fn map_timeout(e: io::Error, what: &str, timeout: Duration) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(what, timeout),
        _ => io::Error::new(e.kind(), format!("{what}: {e}")),
    }
}

/// `GET path` over a fresh HTTP/1.1 connection with `Connection: close`; returns the
/// parsed response whatever its status. The whole exchange is bounded by `timeout`.
pub fn http_request(addr: SocketAddrV4, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    let what = format!("GET http://{addr}{path}");
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)
        .map_err(|e| map_timeout(e, &what, timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| map_timeout(e, &what, timeout))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(&what, timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream
            .read(&mut buf)
            .map_err(|e| map_timeout(e, &what, timeout))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() as u64 > MAX_RESPONSE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what}: response larger than {MAX_RESPONSE} bytes"),
            ));
        }
    }
    parse_response(&raw)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
}

/// [`http_request`] that fails unless the status is 200; returns the body.
pub fn http_get(addr: SocketAddrV4, path: &str, timeout: Duration) -> io::Result<String> {
    let resp = http_request(addr, path, timeout)?;
    if resp.status != 200 {
        return Err(io::Error::other(format!(
            "GET http://{addr}{path}: status {} (body {:?})",
            resp.status, resp.body
        )));
    }
    Ok(resp.body)
}

/// Parses a complete HTTP/1.x response (the connection was read to EOF).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let rest = &raw[head_end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad content-length {len:?}"))?;
        if rest.len() < len {
            return Err(format!("body truncated: {} of {len} bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without CRLF")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunk truncated".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Sends `payload` in one datagram from an ephemeral port and returns the first reply.
/// The socket is connected, so only a reply whose source is exactly `addr` counts.
pub fn udp_request(addr: SocketAddrV4, payload: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let what = format!("UDP {addr}");
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(payload)
        .map_err(|e| map_timeout(e, &what, timeout))?;
    let mut buf = vec![0u8; 65_536];
    let n = sock
        .recv(&mut buf)
        .map_err(|e| map_timeout(e, &what, timeout))?;
    buf.truncate(n);
    Ok(buf)
}

/// A long-lived TCP connection speaking one line per request and one line per reply.
#[derive(Debug)]
pub struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    peer: SocketAddrV4,
}

impl LineConn {
    /// Connects to `addr`; `timeout` bounds the connect and each later read and write.
    pub fn connect(addr: SocketAddrV4, timeout: Duration) -> io::Result<LineConn> {
        let what = format!("TCP {addr}");
        let stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)
            .map_err(|e| map_timeout(e, &what, timeout))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(LineConn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            peer: addr,
        })
    }

    /// Sends `line` (which must not contain a newline) and returns the reply line without
    /// its line ending. EOF before a full reply is `UnexpectedEof`.
    pub fn request(&mut self, line: &str) -> io::Result<String> {
        if line.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "LineConn::request: the line contains a newline",
            ));
        }
        let what = format!("TCP {}", self.peer);
        let timeout = self.writer.read_timeout()?.unwrap_or_default();
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| map_timeout(e, &what, timeout))?;
        let mut reply = String::new();
        let n = self
            .reader
            .by_ref()
            .take(1 << 20)
            .read_line(&mut reply)
            .map_err(|e| map_timeout(e, &what, timeout))?;
        if n == 0 || !reply.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{what}: connection closed before a full reply line (got {reply:?})"),
            ));
        }
        Ok(reply.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Our side of the connection (the client tuple the datapath sees).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddrV4 {
        self.peer
    }

    /// Changes the bound on later reads and writes.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.writer.set_read_timeout(Some(timeout))?;
        self.writer.set_write_timeout(Some(timeout))
    }
}

/// Internet checksum (RFC 1071) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

static PING_SEQ: AtomicU16 = AtomicU16::new(1);

/// Sends one ICMP echo request to `dst` over a raw socket (needs CAP_NET_RAW) and waits up
/// to `timeout` for the matching reply; returns the round-trip time. No `ping` binary needed.
pub fn ping(dst: Ipv4Addr, timeout: Duration) -> io::Result<Duration> {
    let what = format!("ping {dst}");
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("{what}: raw ICMP socket: {e}"),
        ));
    }
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // Connecting a raw socket makes the kernel deliver only packets from `dst` to it.
    // SAFETY: `sin` is a valid sockaddr_in of the size passed.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: connect: {e}")));
    }
    let ident = (std::process::id() as u16) ^ 0x5a5a;
    let seq = PING_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut req = [0u8; 8 + 24];
    req[0] = 8; // echo request
    req[4..6].copy_from_slice(&ident.to_be_bytes());
    req[6..8].copy_from_slice(&seq.to_be_bytes());
    req[8..].copy_from_slice(b"lb-tests lab ping probe!");
    let csum = inet_checksum(&req);
    req[2..4].copy_from_slice(&csum.to_be_bytes());
    let start = Instant::now();
    // SAFETY: `req` is valid for reads of its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: send: {e}")));
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(timed_out(&what, timeout));
        }
        set_rcvtimeo(&sock, left)?;
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(map_timeout(e, &what, timeout));
        }
        // Raw IPv4 sockets receive the IP header too.
        let pkt = &buf[..n as usize];
        let Some(&vihl) = pkt.first() else { continue };
        let icmp = &pkt[usize::from(vihl & 0x0f) * 4..];
        if icmp.len() >= 8
            && icmp[0] == 0
            && icmp[4..6] == ident.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(start.elapsed());
        }
    }
}

fn set_rcvtimeo(sock: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros().max(1) as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\npod0\nextra")
                .expect("parse");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "pod0\n");
        assert_eq!(r.header("x-a"), Some("b"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("parse");
        assert_eq!(r.status, 404);
        assert_eq!(r.body, "abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn checksum_matches_known_value() {
        // Example from RFC 1071 section 3: sum 0xddf2, checksum 0x220d.
        assert_eq!(
            inet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }
}
