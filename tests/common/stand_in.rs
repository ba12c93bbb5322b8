//! A stand-in KMS endpoint for faults moto cannot model: it answers every request the same
//! way (an error status and body, or never), and counts requests. Loopback only; it stops
//! when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub enum Answer {
    /// HTTP status and a KMS JSON error body.
    Error {
        status: u16,
        error_type: &'static str,
    },
    /// Read the request, then never answer.
    Hang,
    /// Forward to a real endpoint (moto), misbehaving on a share of requests.
    Proxy(ProxyFaults),
}

/// What a proxying stand-in does to requests: per 1000, answer `ThrottlingException` or hang
/// (never answer); and from `down.0` after it started, for `down.1`, drop every connection
/// as a service that went away would.
#[derive(Clone)]
pub struct ProxyFaults {
    pub upstream: u16,
    pub throttle_per_mille: u64,
    pub hang_per_mille: u64,
    pub down: Option<(Duration, Duration)>,
    pub started: std::time::Instant,
}

pub struct StandIn {
    pub endpoint: String,
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl StandIn {
    pub fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, s, answer) = (r.clone(), s.clone(), answer.clone());
                std::thread::spawn(move || serve(conn, &answer, &r, &s));
            }
        });
        StandIn {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            requests,
            stop,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve(conn: TcpStream, answer: &Answer, requests: &AtomicUsize, stop: &AtomicBool) {
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    loop {
        // Headers, then a body of Content-Length bytes.
        let mut length = 0usize;
        let mut line = String::new();
        let mut head_lines = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head_lines.push_str(&line);
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let n = requests.fetch_add(1, Ordering::SeqCst) as u64;
        match answer {
            Answer::Proxy(f) => {
                let t = f.started.elapsed();
                if f.down.is_some_and(|(at, len)| t >= at && t < at + len) {
                    return; // the connection drops
                }
                // A fixed, spread pattern by request number (reproducible).
                let roll = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // 0..1023
                let roll = roll * 1000 / 1024;
                if roll < f.hang_per_mille {
                    while !stop.load(Ordering::SeqCst)
                        && f.started.elapsed() < t + Duration::from_secs(60)
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return;
                }
                if roll < f.hang_per_mille + f.throttle_per_mille {
                    if !reply_error(&mut writer, 400, "ThrottlingException") {
                        return;
                    }
                    continue;
                }
                match forward(f.upstream, &head_lines, &body) {
                    Some(response) => {
                        if writer.write_all(&response).is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
            Answer::Hang => {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Answer::Error { status, error_type } => {
                if !reply_error(&mut writer, *status, error_type) {
                    return;
                }
            }
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Answers with a KMS JSON error; false when the connection is gone.
fn reply_error(writer: &mut TcpStream, status: u16, error_type: &str) -> bool {
    let body =
        format!("{{\"__type\":\"{error_type}\",\"message\":\"stand-in says {error_type}\"}}");
    let head = format!(
        "HTTP/1.1 {status} Stand-in\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {error_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer
        .write_all(head.as_bytes())
        .and_then(|_| writer.write_all(body.as_bytes()))
        .is_ok()
}

/// Sends one request to the upstream on a fresh connection and returns its whole response.
fn forward(upstream: u16, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    up.set_read_timeout(Some(Duration::from_secs(30))).ok();
    // One request per upstream connection.
    let head: String = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    up.write_all(head.as_bytes()).ok()?;
    up.write_all(b"Connection: close\r\n\r\n").ok()?;
    up.write_all(body).ok()?;
    let mut reader = BufReader::new(up);
    let mut response = Vec::new();
    let mut length = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        let end = line == "\r\n";
        response.extend_from_slice(line.as_bytes());
        if end {
            break;
        }
    }
    match length {
        Some(n) => {
            let mut b = vec![0u8; n];
            reader.read_exact(&mut b).ok()?;
            response.extend_from_slice(&b);
        }
        None => {
            reader.read_to_end(&mut response).ok()?;
        }
    }
    Some(response)
}
