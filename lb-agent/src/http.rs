//! A minimal HTTP/1.1 responder for the agent's own small endpoints (metrics, health checks):
//! one request per connection, bounded read and time, `Connection: close`.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a request that is read (its request line is all that is used).
const MAX_REQUEST: usize = 4096;

/// A response: status code, reason phrase, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: String) -> Self {
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            503 => "Service Unavailable",
            _ => "",
        };
        Self {
            status,
            reason,
            content_type,
            body,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// The future a handler returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;
/// A handler: the request path (`/metrics`, `/healthz?x=1`, ...) to a response.
pub type Handler = Arc<dyn Fn(String) -> ResponseFuture + Send + Sync>;

/// The path of a request's first line (`GET /path HTTP/1.1`), if it is one.
pub fn request_path(request: &str) -> Option<&str> {
    let line = request.lines().next()?;
    let mut parts = line.split(' ');
    let (_method, path) = (parts.next()?, parts.next()?);
    path.starts_with('/').then_some(path)
}

/// Serves `handler` on `listener` until the returned task is aborted.
pub fn serve(listener: TcpListener, handler: Handler) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_REQUEST];
                let n = match tokio::time::timeout(READ_TIMEOUT, sock.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let resp = match request_path(&req) {
                    Some(path) => handler(path.to_string()).await,
                    None => Response::new(404, "text/plain", "bad request\n".into()),
                };
                let _ = sock.write_all(&resp.to_bytes()).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths() {
        assert_eq!(
            request_path("GET /healthz HTTP/1.1\r\nHost: x\r\n"),
            Some("/healthz")
        );
        assert_eq!(request_path("GET / HTTP/1.0\r\n"), Some("/"));
        assert_eq!(request_path("garbage"), None);
        assert_eq!(request_path(""), None);
    }

    #[test]
    fn response_bytes_have_the_length_and_status() {
        let r = Response::new(503, "application/json", "{}".into()).to_bytes();
        let text = String::from_utf8(r).expect("utf-8");
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 2\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{}"), "{text}");
    }
}
