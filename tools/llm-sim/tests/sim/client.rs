//! A deliberately small HTTP/1.1 client over a raw TCP stream.
//!
//! Raw so that the tests can tell a clean end of a chunked body (the final
//! zero-size chunk) from a connection the server cut, and a refused connect
//! from an HTTP error: the distinctions the abort, refuse and die faults are
//! about. Every call is bounded by [`TIMEOUT`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on any one request in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A response as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended as HTTP says it should (length reached or final chunk seen).
    pub complete: bool,
    /// Time from sending the request to the end of the response.
    pub elapsed: Duration,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The SSE events of the body: (event name or "", parsed data or the raw string).
    pub fn sse(&self) -> Vec<(String, Value)> {
        let text = self.text();
        text.split("\n\n")
            .filter(|block| !block.trim().is_empty())
            .map(|block| {
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                let value = serde_json::from_str(&data).unwrap_or(Value::String(data));
                (name, value)
            })
            .collect()
    }
}

/// Sends one request with `Connection: close` and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    tokio::time::timeout(TIMEOUT, request_inner(addr, method, path, body))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))?
}

/// Sends `head` (request line and headers, each ending in CRLF, without
/// the blank line) then `body` exactly as given, on a new connection that
/// closes after the answer. For requests [`request`] cannot express:
/// chunked bodies, extra headers.
pub async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> HttpResponse {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let started = Instant::now();
        stream
            .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
            .await?;
        stream.write_all(body).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&raw, started.elapsed())
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("raw request timed out")
        .expect("raw request failed")
}

/// POSTs JSON with a chunked body (no content-length) and `extra` header lines.
pub async fn post_chunked(addr: SocketAddr, path: &str, body: &Value, extra: &str) -> HttpResponse {
    let json = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n{extra}"
    );
    let chunked = format!("{:x}\r\n{json}\r\n0\r\n\r\n", json.len());
    raw(addr, &head, chunked.as_bytes()).await
}

/// POSTs JSON with a content-length and `extra` header lines.
pub async fn post_with(addr: SocketAddr, path: &str, body: &Value, extra: &str) -> HttpResponse {
    let json = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n{extra}",
        json.len()
    );
    raw(addr, &head, json.as_bytes()).await
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A cut connection: keep what arrived, `complete` will say false.
            Err(_) => break,
        }
    }
    let elapsed = started.elapsed();
    parse(&raw, elapsed)
}

/// Parses a whole response read off the wire.
pub fn parse(raw: &[u8], elapsed: Duration) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no response head (connection closed early)"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let (body, complete) = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        (rest[..rest.len().min(len)].to_vec(), rest.len() >= len)
    } else {
        (rest.to_vec(), true)
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
        complete,
        elapsed,
    })
}

/// Decodes a chunked body; `true` when the final zero-size chunk was seen.
fn dechunk(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, false);
        };
        data = &data[eol + 2..];
        if size == 0 {
            return (body, true);
        }
        if data.len() < size {
            body.extend_from_slice(data);
            return (body, false);
        }
        body.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

/// POSTs JSON and expects a complete response.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    request(addr, "POST", path, Some(&body.to_string()))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// GETs a path and expects a complete response.
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    request(addr, "GET", path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}
